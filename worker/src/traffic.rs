//! Traffic: the built-in generator (tokens per step, skew, drift, seed) and trace replay.
//!
//! The generator makes hidden states that lean towards one "preferred" expert per token, drawn
//! from a Zipf distribution over a seeded popularity ranking that rotates with `drift`. The
//! lean is along that expert's router rows (all layers), so the real router produces the skew.
//! Tokens are a pure function of (seed, step, rank).

use std::path::Path;
use std::sync::{Arc, mpsc};

use anyhow::{Context, Result, bail};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::ModelShape;
use crate::placement::splitmix64;
use moe_kernels::Bf16Matrix;

#[derive(Debug, Clone)]
pub struct GeneratorParams {
    pub tokens_per_step: usize,
    pub skew: f64,
    pub drift: f64,
    pub seed: u64,
}

/// One step of this rank's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub step: u64,
    /// `[tokens][hidden]`.
    pub x: Vec<bf16>,
    /// Routing decided by a replayed trace: `[layer][token][k]` ids (weights 1/k). `None`:
    /// the router decides.
    pub routing: Option<Vec<Vec<u32>>>,
}

pub struct Generator {
    params: GeneratorParams,
    hidden: usize,
    num_experts: usize,
    cdf: Vec<f64>,
    ranking: Vec<u32>,
    /// Unit-ish direction per expert along which its tokens lean.
    directions: Vec<Vec<f32>>,
    strength: f32,
}

impl Generator {
    /// `routers[layer]` is `[experts][hidden]`.
    pub fn new(params: GeneratorParams, shape: &ModelShape, routers: &[Bf16Matrix]) -> Generator {
        let e = shape.num_experts;
        let h = shape.hidden;
        let weights: Vec<f64> = (0..e)
            .map(|i| 1.0 / ((i + 1) as f64).powf(params.skew))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(params.seed ^ 0x5eed));
        let mut ranking: Vec<u32> = (0..e as u32).collect();
        for i in (1..e).rev() {
            let j = rng.random_range(0..=i);
            ranking.swap(i, j);
        }
        let mut directions = vec![vec![0.0f32; h]; e];
        for router in routers {
            for (x, row) in router.as_slice().chunks_exact(h).enumerate().take(e) {
                let norm = row
                    .iter()
                    .map(|v| v.to_f32() * v.to_f32())
                    .sum::<f32>()
                    .sqrt()
                    .max(1e-12);
                for (d, v) in directions[x].iter_mut().zip(row) {
                    *d += v.to_f32() / norm;
                }
            }
        }
        let layers = routers.len().max(1) as f32;
        for d in &mut directions {
            for v in d.iter_mut() {
                *v /= layers.sqrt();
            }
        }
        Generator {
            params,
            hidden: h,
            num_experts: e,
            cdf,
            ranking,
            directions,
            strength: 3.0 * layers.sqrt(),
        }
    }

    /// The preferred expert of one token under the popularity ranking at `step`.
    fn preferred(&self, u: f64, step: u64) -> u32 {
        let i = self
            .cdf
            .partition_point(|&c| c < u)
            .min(self.num_experts - 1);
        let shift = (step as f64 * self.params.drift).floor() as i64;
        let pos = (i as i64 + shift).rem_euclid(self.num_experts as i64) as usize;
        self.ranking[pos]
    }

    pub fn batch(&self, step: u64, rank: usize) -> Batch {
        let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(
            self.params.seed ^ splitmix64(step ^ splitmix64(rank as u64 + 1)),
        ));
        let (t, h) = (self.params.tokens_per_step, self.hidden);
        // Per token, in order: its preferred expert and the key of its noise. Rows are then
        // filled from these alone, so the batch is the same however many threads fill it.
        let rows: Vec<(u32, u64)> = (0..t)
            .map(|_| {
                let e = self.preferred(rng.random::<f64>(), step);
                (e, rng.random::<u64>())
            })
            .collect();
        let mut x = vec![bf16::ZERO; t * h];
        let fill = |out: &mut [bf16], rows: &[(u32, u64)]| {
            for (row, &(e, key)) in out.chunks_mut(h.max(1)).zip(rows) {
                self.fill_row(row, e, key);
            }
        };
        // Large batches (a DeepSeek-V3-sized step is 15M values) on several threads.
        let threads = if t * h >= 1 << 21 {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
        } else {
            1
        };
        if threads > 1 {
            let per = t.div_ceil(threads);
            std::thread::scope(|sc| {
                for (out, rows) in x.chunks_mut(per * h).zip(rows.chunks(per)) {
                    sc.spawn(move || fill(out, rows));
                }
            });
        } else {
            fill(&mut x, &rows);
        }
        Batch {
            step,
            x,
            routing: None,
        }
    }

    /// One token: uniform noise of variance 1 (16-bit lanes of `splitmix64(key + i * golden)`,
    /// the stream [`crate::weights::fast_uniform`] draws) plus the lean along `expert`'s
    /// direction, rounded to bf16 once.
    fn fill_row(&self, out: &mut [bf16], expert: u32, key: u64) {
        const SQRT3: f32 = 1.732_050_8;
        let dir = &self.directions[expert as usize];
        for (i, (o4, d4)) in out.chunks_mut(4).zip(dir.chunks(4)).enumerate() {
            let r = splitmix64(key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            for (j, (o, d)) in o4.iter_mut().zip(d4).enumerate() {
                let u = ((r >> (16 * j)) & 0xffff) as f32 * (1.0 / 65536.0);
                *o = bf16::from_f32((u * 2.0 - 1.0) * SQRT3 + self.strength * d);
            }
        }
    }
}

/// One line of a routing trace: the group's tokens of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceStep {
    /// `topk_ids[layer][token]` = the token's `top_k` expert ids.
    pub topk_ids: Vec<Vec<Vec<u32>>>,
}

/// Replays a routing trace (JSON lines of [`TraceStep`]), cycling when it ends. Each rank takes
/// its contiguous share of every step's tokens; hidden states come from the generator.
pub struct Trace {
    steps: Vec<TraceStep>,
}

impl Trace {
    pub fn load(path: &Path, shape: &ModelShape) -> Result<Trace> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading trace {path:?}"))?;
        let mut steps = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let s: TraceStep = serde_json::from_str(line)
                .with_context(|| format!("trace {path:?} line {}", n + 1))?;
            if s.topk_ids.len() != shape.num_layers {
                bail!(
                    "trace {path:?} line {}: {} layers, the model has {}",
                    n + 1,
                    s.topk_ids.len(),
                    shape.num_layers
                );
            }
            let tokens = s.topk_ids[0].len();
            for layer in &s.topk_ids {
                if layer.len() != tokens {
                    bail!("trace {path:?} line {}: ragged token count", n + 1);
                }
                for ids in layer {
                    if ids.len() != shape.top_k
                        || ids.iter().any(|&e| e as usize >= shape.num_experts)
                    {
                        bail!(
                            "trace {path:?} line {}: each token needs {} expert ids below {}",
                            n + 1,
                            shape.top_k,
                            shape.num_experts
                        );
                    }
                }
            }
            if tokens < shape.world_size {
                bail!(
                    "trace {path:?} line {}: {tokens} tokens cannot be shared by {} ranks",
                    n + 1,
                    shape.world_size
                );
            }
            steps.push(s);
        }
        if steps.is_empty() {
            bail!("trace {path:?} is empty");
        }
        Ok(Trace { steps })
    }

    /// This rank's routing at `step`: `[layer][token * k]` and its token count.
    pub fn routing(&self, step: u64, rank: usize, world: usize) -> (Vec<Vec<u32>>, usize) {
        let s = &self.steps[(step % self.steps.len() as u64) as usize];
        let total = s.topk_ids[0].len();
        let (lo, hi) = (rank * total / world, (rank + 1) * total / world);
        let routing = s
            .topk_ids
            .iter()
            .map(|layer| layer[lo..hi].iter().flatten().copied().collect())
            .collect();
        (routing, hi - lo)
    }
}

/// The traffic source of a rank.
pub struct Traffic {
    pub generator: Generator,
    pub trace: Option<Trace>,
    pub rank: usize,
    pub world: usize,
}

impl Traffic {
    pub fn batch(&self, step: u64) -> Batch {
        match &self.trace {
            None => self.generator.batch(step, self.rank),
            Some(trace) => {
                let (routing, tokens) = trace.routing(step, self.rank, self.world);
                let mut b = self.generator.batch(step, self.rank);
                b.x.resize(tokens * self.generator.hidden, bf16::ZERO);
                if tokens > self.generator.params.tokens_per_step {
                    // Extra tokens beyond the generator's batch: reuse its rows cyclically.
                    let base = self.generator.params.tokens_per_step * self.generator.hidden;
                    for i in base..b.x.len() {
                        b.x[i] = b.x[i % base.max(1)];
                    }
                }
                b.routing = Some(routing);
                b
            }
        }
    }
}

/// Batches drawn ahead of the engine on a thread of their own, in step order with at most
/// `depth` waiting, so that drawing step s+1's tokens overlaps step s's forward pass. A batch
/// is a pure function of (seed, step, rank): prefetching changes timing, never data.
pub struct Prefetch {
    rx: mpsc::Receiver<Batch>,
    traffic: Arc<Traffic>,
}

impl Prefetch {
    /// Starts drawing batches from step `first` on.
    pub fn start(traffic: Arc<Traffic>, first: u64, depth: usize) -> Result<Prefetch> {
        let (tx, rx) = mpsc::sync_channel(depth.max(1));
        let t = traffic.clone();
        std::thread::Builder::new()
            .name(format!("traffic-rank-{}", traffic.rank))
            .spawn(move || {
                // Ends when the engine drops its end of the channel.
                for step in first.. {
                    if tx.send(t.batch(step)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Prefetch { rx, traffic })
    }

    /// The batch of `step` (steps are asked for in order; any other step is drawn here).
    pub fn batch(&self, step: u64) -> Batch {
        match self.rx.recv() {
            Ok(b) if b.step == step => b,
            _ => self.traffic.batch(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scoring;
    use crate::config::WeightsSource;
    use crate::weights::WeightStore;
    use moe_kernels::{GatingConfig, Matrix, cpu};

    fn shape() -> ModelShape {
        ModelShape {
            num_layers: 2,
            num_experts: 8,
            hidden: 32,
            intermediate: 16,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: 0,
            world_size: 2,
            expert_bias: false,
        }
    }

    fn routers(s: &ModelShape) -> Vec<Bf16Matrix> {
        let store = WeightStore::open(&WeightsSource::Synthetic { seed: 1 }, s).unwrap();
        (0..2).map(|l| store.router(l).unwrap()).collect()
    }

    fn top1_histogram(
        g: &Generator,
        s: &ModelShape,
        routers: &[Bf16Matrix],
        step: u64,
    ) -> Vec<usize> {
        let b = g.batch(step, 0);
        let x = Matrix::from_vec(b.x.len() / s.hidden, s.hidden, b.x).unwrap();
        let logits = cpu::router_logits(&x, &routers[1]).unwrap();
        let ids = cpu::gating_topk(
            &logits,
            &GatingConfig::softmax(s.num_experts, s.top_k, true),
            None,
        )
        .unwrap()
        .ids;
        let mut h = vec![0; s.num_experts];
        for t in ids.chunks(s.top_k) {
            h[t[0] as usize] += 1;
        }
        h
    }

    #[test]
    fn deterministic_and_skewed() {
        let s = shape();
        let routers = routers(&s);
        let p = GeneratorParams {
            tokens_per_step: 400,
            skew: 1.5,
            drift: 0.0,
            seed: 9,
        };
        let g = Generator::new(p.clone(), &s, &routers);
        assert_eq!(g.batch(3, 1), Generator::new(p, &s, &routers).batch(3, 1));
        assert_ne!(g.batch(3, 1), g.batch(3, 0));
        assert_ne!(g.batch(3, 1), g.batch(4, 1));
        let h = top1_histogram(&g, &s, &routers, 0);
        let max = *h.iter().max().unwrap() as f64;
        let mean = 400.0 / 8.0;
        assert!(max / mean > 2.0, "skewed routing expected (layer 1): {h:?}");
        let flat = Generator::new(
            GeneratorParams {
                tokens_per_step: 400,
                skew: 0.0,
                drift: 0.0,
                seed: 9,
            },
            &s,
            &routers,
        );
        let h = top1_histogram(&flat, &s, &routers, 0);
        let max = *h.iter().max().unwrap() as f64;
        assert!(max / mean < 1.8, "uniform routing expected: {h:?}");
    }

    #[test]
    fn drift_moves_the_hot_expert() {
        let s = shape();
        let routers = routers(&s);
        let g = Generator::new(
            GeneratorParams {
                tokens_per_step: 400,
                skew: 2.0,
                drift: 1.0,
                seed: 2,
            },
            &s,
            &routers,
        );
        let hot = |step| {
            let h = top1_histogram(&g, &s, &routers, step);
            h.iter().enumerate().max_by_key(|(_, c)| **c).unwrap().0
        };
        assert_ne!(hot(0), hot(1));
    }

    #[test]
    fn trace_splits_tokens_over_ranks() {
        let s = shape();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let step = TraceStep {
            topk_ids: vec![vec![vec![0, 1], vec![2, 3], vec![4, 5]]; 2],
        };
        std::fs::write(&path, serde_json::to_string(&step).unwrap() + "\n").unwrap();
        let t = Trace::load(&path, &s).unwrap();
        assert_eq!(t.routing(0, 0, 2), (vec![vec![0, 1]; 2], 1));
        assert_eq!(t.routing(5, 1, 2), (vec![vec![2, 3, 4, 5]; 2], 2));
        std::fs::write(&path, r#"{"topkIds":[[[0,9]]]}"#).unwrap();
        assert!(Trace::load(&path, &s).is_err());
    }
}
