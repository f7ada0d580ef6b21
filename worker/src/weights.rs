//! Expert, router, correction-bias and shared-expert weights: synthetic (seeded, identical on
//! every rank) or a checkpoint read through its model description, of which a rank reads only
//! its slots' experts (plus every MoE layer's router, bias and shared experts).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use half::bf16;
use moe_model::ModelDescription;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, ModelShape, Scoring, WeightsSource};
use crate::placement::splitmix64;

pub use moe_kernels::ExpertWeights;
use moe_kernels::{Bf16Matrix, F32Matrix, Matrix};

fn bf16_bytes(out: &mut Vec<u8>, v: &[bf16]) {
    for x in v {
        out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
}

fn bf16_from_bytes(bytes: &[u8]) -> Vec<bf16> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

/// Builds the kernels' fused layout from the Hugging Face projections: `w1 = [gate; up]`
/// (`[2I, H]`), `w2 = down` (`[H, I]`).
pub fn expert_from_projections(
    gate: Vec<bf16>,
    up: Vec<bf16>,
    down: Vec<bf16>,
    shape: &ModelShape,
) -> Result<ExpertWeights> {
    let (h, i) = (shape.hidden, shape.intermediate);
    let mut w1 = gate;
    w1.extend(up);
    let w1 = Matrix::from_vec(2 * i, h, w1).map_err(|e| anyhow!("{e}"))?;
    let w2 = Matrix::from_vec(h, i, down).map_err(|e| anyhow!("{e}"))?;
    ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))
}

/// Little-endian bf16 bytes of `w1` then `w2`, then the fp32 biases `b1`, `b2` when the
/// expert has them (the transfer format).
pub fn expert_to_bytes(w: &ExpertWeights) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * (w.w1.as_slice().len() + w.w2.as_slice().len()));
    bf16_bytes(&mut out, w.w1.as_slice());
    bf16_bytes(&mut out, w.w2.as_slice());
    if let Some(b) = &w.bias {
        for v in b.b1.iter().chain(&b.b2) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

pub fn expert_from_bytes(bytes: &[u8], shape: &ModelShape) -> Result<ExpertWeights> {
    let (h, i) = (shape.hidden, shape.intermediate);
    if bytes.len() != shape.expert_bytes() {
        bail!(
            "expert payload has {} bytes, expected {}",
            bytes.len(),
            shape.expert_bytes()
        );
    }
    let split = 2 * (2 * i * h);
    let end = 2 * shape.expert_elems();
    let w1 =
        Matrix::from_vec(2 * i, h, bf16_from_bytes(&bytes[..split])).map_err(|e| anyhow!("{e}"))?;
    let w2 =
        Matrix::from_vec(h, i, bf16_from_bytes(&bytes[split..end])).map_err(|e| anyhow!("{e}"))?;
    let w = ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))?;
    if !shape.expert_bias {
        return Ok(w);
    }
    let f: Vec<f32> = bytes[end..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (b1, b2) = f.split_at(2 * i);
    w.with_bias(b1.to_vec(), b2.to_vec())
        .map_err(|e| anyhow!("{e}"))
}

fn seeded(seed: u64, a: u64, b: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix64(
        seed ^ splitmix64(a.wrapping_mul(0x1000_0001) ^ b),
    ))
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    fast_uniform(rng.random::<u64>(), n, scale)
}

/// `n` values uniform in `[-scale, scale)` (16-bit resolution), a pure function of `key`:
/// counter-based, four values per SplitMix64 output (fast enough for large synthetic models
/// and per-step traffic).
pub fn fast_uniform(key: u64, n: usize, scale: f32) -> Vec<bf16> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        let r = splitmix64(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for j in 0..4 {
            if out.len() == n {
                break;
            }
            let u = ((r >> (16 * j)) & 0xffff) as f32 * (1.0 / 65536.0);
            out.push(bf16::from_f32((u * 2.0 - 1.0) * scale));
        }
        i += 1;
    }
    out
}

/// Synthetic expert `expert` of `layer`: a pure function of (seed, layer, expert).
/// Synthetic expert `expert` of `layer` as Hugging Face projections `(gate, up, down)`: a pure
/// function of (seed, layer, expert).
pub fn synthetic_projections(
    seed: u64,
    layer: usize,
    expert: u32,
    shape: &ModelShape,
) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>) {
    let mut rng = seeded(seed, layer as u64, expert as u64);
    let (h, i) = (shape.hidden, shape.intermediate);
    let a = 1.0 / (h as f32).sqrt();
    let b = 1.0 / (i as f32).sqrt();
    let gate = uniform(&mut rng, i * h, a);
    let up = uniform(&mut rng, i * h, a);
    let down = uniform(&mut rng, h * i, b);
    (gate, up, down)
}

/// Synthetic expert `expert` of `layer`: a pure function of (seed, layer, expert).
pub fn synthetic_expert(seed: u64, layer: usize, expert: u32, shape: &ModelShape) -> ExpertWeights {
    let (g, u, d) = synthetic_projections(seed, layer, expert, shape);
    expert_from_projections(g, u, d, shape).expect("synthetic shapes are consistent")
}

/// Synthetic router of `layer`: `[experts][hidden]`.
pub fn synthetic_router(seed: u64, layer: usize, shape: &ModelShape) -> Vec<bf16> {
    let mut rng = seeded(seed, layer as u64, u64::MAX);
    uniform(
        &mut rng,
        shape.num_experts * shape.hidden,
        1.0 / (shape.hidden as f32).sqrt(),
    )
}

pub fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.gate.weight")
}

pub fn expert_name(layer: usize, expert: u32, proj: &str) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight")
}

/// An expert MLP of any size from Hugging Face projections (`gate`, `up`: `[I, H]`, `down`:
/// `[H, I]`).
fn mlp_from_projections(
    gate: Vec<bf16>,
    up: Vec<bf16>,
    down: Vec<bf16>,
    hidden: usize,
    intermediate: usize,
) -> Result<ExpertWeights> {
    let mut w1 = gate;
    w1.extend(up);
    let w1 = Matrix::from_vec(2 * intermediate, hidden, w1).map_err(|e| anyhow!("{e}"))?;
    let w2 = Matrix::from_vec(hidden, intermediate, down).map_err(|e| anyhow!("{e}"))?;
    ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))
}

/// The experts every token of a MoE layer goes through besides the routed ones (every rank
/// holds them; EPLB does not place them).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpert {
    /// The shared MLP (DeepSeek's `n_shared_experts` fused into one, as checkpoints store it).
    pub mlp: ExpertWeights,
    /// Qwen2-MoE's `shared_expert_gate` `[H]`: the MLP's output is scaled by
    /// `sigmoid(gate · x)`.
    pub gate: Option<Vec<f32>>,
}

/// Experts of one layer read at the same time by [`WeightStore::load_slots`].
pub const LOAD_THREADS: usize = 4;

/// Key of synthetic tensors that are not routed experts (never a real expert id).
const SHARED_KEY: u64 = u64::MAX - 1;
const BIAS_KEY: u64 = u64::MAX - 2;
const SHARED_GATE_KEY: u64 = u64::MAX - 3;

/// Loads weights on demand from the configured source. Layer `l` is MoE layer `l` (the
/// checkpoint's decoder layer `model.moe_layers[l]`).
pub enum WeightStore {
    Synthetic {
        seed: u64,
        shape: ModelShape,
        model: Arc<ModelDescription>,
    },
    Files {
        checkpoint: Arc<Checkpoint>,
        shape: ModelShape,
    },
}

impl WeightStore {
    /// The store of a validated configuration.
    pub fn from_config(config: &Config) -> Result<WeightStore> {
        Ok(match (&config.weights, &config.checkpoint) {
            (WeightsSource::Synthetic { seed }, _) => WeightStore::Synthetic {
                seed: *seed,
                shape: config.shape,
                model: config.model.clone(),
            },
            (WeightsSource::Safetensors { .. }, Some(ck)) => WeightStore::Files {
                checkpoint: ck.clone(),
                shape: config.shape,
            },
            (WeightsSource::Safetensors { dir }, None) => {
                bail!("the checkpoint {dir:?} was not opened")
            }
        })
    }

    /// A store for `shape` alone: synthetic weights gate as the shape's scoring says (no
    /// family); a directory is opened with its own config.json.
    pub fn open(source: &WeightsSource, shape: &ModelShape) -> Result<WeightStore> {
        Ok(match source {
            WeightsSource::Synthetic { seed } => WeightStore::Synthetic {
                seed: *seed,
                shape: *shape,
                model: Arc::new(crate::model::synthetic(
                    None,
                    crate::model::SyntheticShape {
                        num_layers: shape.num_layers,
                        num_experts: shape.num_experts,
                        hidden: shape.hidden,
                        intermediate: shape.intermediate,
                        top_k: shape.top_k,
                        expert_groups: shape.expert_groups,
                        topk_groups: shape.topk_groups,
                        scoring: match shape.scoring {
                            Scoring::Softmax => moe_model::Scoring::Softmax,
                            Scoring::Sigmoid => moe_model::Scoring::Sigmoid,
                        },
                    },
                )),
            },
            WeightsSource::Safetensors { dir } => {
                let desc = ModelDescription::from_path(dir)?;
                WeightStore::Files {
                    checkpoint: Arc::new(Checkpoint::open(dir, desc)?),
                    shape: *shape,
                }
            }
        })
    }

    /// The model description the weights belong to.
    pub fn model(&self) -> &ModelDescription {
        match self {
            WeightStore::Synthetic { model, .. } => model,
            WeightStore::Files { checkpoint, .. } => checkpoint.description(),
        }
    }

    fn shape(&self) -> &ModelShape {
        match self {
            WeightStore::Synthetic { shape, .. } | WeightStore::Files { shape, .. } => shape,
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        let n = self.model().num_moe_layers();
        if layer >= n {
            bail!("MoE layer {layer} does not exist (the model has {n})");
        }
        Ok(())
    }

    /// Router weight of `layer`, `[experts, hidden]`, in f32 as stored (DeepSeek keeps fp32
    /// routers).
    pub fn router_f32(&self, layer: usize) -> Result<F32Matrix> {
        self.check_layer(layer)?;
        let s = self.shape();
        let data = match self {
            WeightStore::Synthetic { seed, shape, .. } => synthetic_router(*seed, layer, shape)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            WeightStore::Files { checkpoint, .. } => checkpoint.router(layer)?,
        };
        Matrix::from_vec(s.num_experts, s.hidden, data).map_err(|e| anyhow!("{e}"))
    }

    /// Router weight of `layer` rounded to bf16 (the traffic generator and the CUDA backend).
    pub fn router(&self, layer: usize) -> Result<Bf16Matrix> {
        let r = self.router_f32(layer)?;
        Matrix::from_f32(r.rows(), r.cols(), r.as_slice()).map_err(|e| anyhow!("{e}"))
    }

    /// gpt-oss's router bias of `layer` (`[experts]`), added to the logits.
    pub fn router_bias(&self, layer: usize) -> Result<Option<Vec<f32>>> {
        self.check_layer(layer)?;
        match self {
            WeightStore::Synthetic { .. } => Ok(None),
            WeightStore::Files { checkpoint, .. } => Ok(checkpoint.router_bias(layer)?),
        }
    }

    /// DeepSeek-V3's score-correction bias of `layer` (`[experts]`), used for the choice only.
    pub fn correction_bias(&self, layer: usize) -> Result<Option<Vec<f32>>> {
        self.check_layer(layer)?;
        match self {
            WeightStore::Synthetic { seed, model, .. } => Ok(model.correction_bias.then(|| {
                let mut rng = seeded(*seed, layer as u64, BIAS_KEY);
                // Of the order of the sigmoid scores' spread, so it changes choices.
                uniform(&mut rng, model.num_experts, 0.1)
                    .iter()
                    .map(|v| v.to_f32())
                    .collect()
            })),
            WeightStore::Files { checkpoint, .. } => Ok(checkpoint.correction_bias(layer)?),
        }
    }

    /// The shared experts of `layer`, when the model has any.
    pub fn shared(&self, layer: usize) -> Result<Option<SharedExpert>> {
        self.check_layer(layer)?;
        let h = self.shape().hidden;
        match self {
            WeightStore::Synthetic { seed, model, .. } => {
                let Some(s) = model.shared else {
                    return Ok(None);
                };
                let i = s.intermediate;
                let mut rng = seeded(*seed, layer as u64, SHARED_KEY);
                let a = 1.0 / (h as f32).sqrt();
                let gate = uniform(&mut rng, i * h, a);
                let up = uniform(&mut rng, i * h, a);
                let down = uniform(&mut rng, h * i, 1.0 / (i as f32).sqrt());
                let sgate = s.gated.then(|| {
                    let mut rng = seeded(*seed, layer as u64, SHARED_GATE_KEY);
                    uniform(&mut rng, h, a).iter().map(|v| v.to_f32()).collect()
                });
                Ok(Some(SharedExpert {
                    mlp: mlp_from_projections(gate, up, down, h, i)?,
                    gate: sgate,
                }))
            }
            WeightStore::Files { checkpoint, .. } => {
                let Some(((g, u, d), gate)) = checkpoint.shared(layer)? else {
                    return Ok(None);
                };
                let i = g.len() / h;
                Ok(Some(SharedExpert {
                    mlp: mlp_from_projections(g, u, d, h, i)?,
                    gate,
                }))
            }
        }
    }

    /// Routed expert `expert` of `layer` (bf16; FP8 checkpoints are dequantised).
    pub fn expert(&self, layer: usize, expert: u32) -> Result<ExpertWeights> {
        self.check_layer(layer)?;
        match self {
            WeightStore::Synthetic { seed, shape, .. } => {
                Ok(synthetic_expert(*seed, layer, expert, shape))
            }
            WeightStore::Files { checkpoint, shape } => {
                let (h, i) = (shape.hidden, shape.intermediate);
                let (w1, w2) = checkpoint.expert(layer, expert as usize)?;
                let w1 = Matrix::from_vec(2 * i, h, w1).map_err(|e| anyhow!("{e}"))?;
                let w2 = Matrix::from_vec(h, i, w2).map_err(|e| anyhow!("{e}"))?;
                let w = ExpertWeights::new(w1, w2).map_err(|e| anyhow!("{e}"))?;
                match checkpoint.expert_bias(layer, expert as usize)? {
                    Some((b1, b2)) => w.with_bias(b1, b2).map_err(|e| anyhow!("{e}")),
                    None => Ok(w),
                }
            }
        }
    }

    /// Loads the experts of the given slots (`phy2log` of one layer restricted to a rank's
    /// slots), reading each distinct expert once. Up to [`LOAD_THREADS`] experts are read at a
    /// time, so the disk sees several requests in flight and decoding overlaps reading.
    pub fn load_slots(&self, layer: usize, experts: &[u32]) -> Result<Vec<Arc<ExpertWeights>>> {
        let mut distinct: Vec<u32> = experts.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let threads = LOAD_THREADS.min(distinct.len()).max(1);
        let chunk = distinct.len().div_ceil(threads).max(1);
        type Loaded = Result<Vec<(u32, Arc<ExpertWeights>)>>;
        let loaded: Vec<Loaded> = std::thread::scope(|sc| {
            let handles: Vec<_> = distinct
                .chunks(chunk)
                .map(|ids| {
                    sc.spawn(move || {
                        ids.iter()
                            .map(|&e| Ok((e, Arc::new(self.expert(layer, e)?))))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("a weight-loading thread panicked")))
                })
                .collect()
        });
        let mut by_id: HashMap<u32, Arc<ExpertWeights>> = HashMap::new();
        for part in loaded {
            by_id.extend(part?);
        }
        Ok(experts.iter().map(|e| by_id[e].clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    pub(crate) fn small_shape() -> ModelShape {
        ModelShape {
            num_layers: 2,
            num_experts: 4,
            hidden: 8,
            intermediate: 6,
            top_k: 2,
            expert_groups: 1,
            topk_groups: 1,
            scoring: Scoring::Softmax,
            redundant: 0,
            world_size: 2,
            expert_bias: false,
        }
    }

    #[test]
    fn synthetic_weights_are_deterministic_per_layer_and_expert() {
        let s = small_shape();
        assert_eq!(synthetic_expert(7, 1, 2, &s), synthetic_expert(7, 1, 2, &s));
        assert_ne!(synthetic_expert(7, 1, 2, &s), synthetic_expert(7, 1, 3, &s));
        assert_ne!(synthetic_expert(7, 0, 2, &s), synthetic_expert(7, 1, 2, &s));
        assert_ne!(synthetic_expert(8, 1, 2, &s), synthetic_expert(7, 1, 2, &s));
        let w = synthetic_expert(1, 0, 0, &s);
        assert_eq!(w.w1.rows(), 2 * s.intermediate);
        assert_eq!(expert_from_bytes(&expert_to_bytes(&w), &s).unwrap(), w);
        assert!(expert_from_bytes(&[0u8; 3], &s).is_err());
        // gpt-oss experts carry their biases through a remap.
        let b1: Vec<f32> = (0..2 * s.intermediate).map(|v| v as f32 * 0.5).collect();
        let b2: Vec<f32> = (0..s.hidden).map(|v| -(v as f32)).collect();
        let wb = w.with_bias(b1, b2).unwrap();
        let sb = ModelShape {
            expert_bias: true,
            ..s
        };
        let bytes = expert_to_bytes(&wb);
        assert_eq!(bytes.len(), sb.expert_bytes());
        assert_eq!(expert_from_bytes(&bytes, &sb).unwrap(), wb);
    }

    #[test]
    fn safetensors_directory_round_trip() {
        let s = small_shape();
        let dir = tempfile::tempdir().unwrap();
        // Write the synthetic model in the HF layout: layer 0 in bf16, layer 1 in f32, two files.
        for layer in 0..s.num_layers {
            let mut tensors: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = Vec::new();
            let enc = |v: &[bf16], dtype: Dtype| -> Vec<u8> {
                match dtype {
                    Dtype::F32 => v.iter().flat_map(|x| x.to_f32().to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                }
            };
            let dtype = if layer == 0 { Dtype::BF16 } else { Dtype::F32 };
            let r = synthetic_router(3, layer, &s);
            tensors.push((
                router_name(layer),
                enc(&r, dtype),
                dtype,
                vec![s.num_experts, s.hidden],
            ));
            for e in 0..s.num_experts as u32 {
                let (gate, up, down) = synthetic_projections(3, layer, e, &s);
                let (h, i) = (s.hidden, s.intermediate);
                for (proj, v, shp) in [
                    ("gate_proj", &gate, vec![i, h]),
                    ("up_proj", &up, vec![i, h]),
                    ("down_proj", &down, vec![h, i]),
                ] {
                    tensors.push((expert_name(layer, e, proj), enc(v, dtype), dtype, shp));
                }
            }
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
                .iter()
                .map(|(n, b, d, shp)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(*d, shp.clone(), b).unwrap(),
                    )
                })
                .collect();
            let path = dir.path().join(format!("model-{layer:05}.safetensors"));
            safetensors::serialize_to_file(views, None, &path).unwrap();
        }
        let config = |hidden: usize| {
            format!(
                r#"{{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "num_hidden_layers": {}, "num_experts": {}, "hidden_size": {hidden},
                "moe_intermediate_size": {}, "num_experts_per_tok": {}, "norm_topk_prob": true,
                "dtype": "bfloat16"}}"#,
                s.num_layers, s.num_experts, s.intermediate, s.top_k
            )
        };
        std::fs::write(dir.path().join("config.json"), config(s.hidden)).unwrap();
        let src = WeightsSource::Safetensors {
            dir: dir.path().to_path_buf(),
        };
        let store = WeightStore::open(&src, &s).unwrap();
        for layer in 0..s.num_layers {
            assert_eq!(
                store.router(layer).unwrap().as_slice(),
                &synthetic_router(3, layer, &s)[..]
            );
            let slots = store.load_slots(layer, &[3, 1, 3]).unwrap();
            assert_eq!(*slots[0], synthetic_expert(3, layer, 3, &s));
            assert_eq!(*slots[1], synthetic_expert(3, layer, 1, &s));
            assert!(Arc::ptr_eq(&slots[0], &slots[2]));
        }
        let err = store.expert(5, 0).unwrap_err().to_string();
        assert!(err.contains("MoE layer 5"), "{err}");
        std::fs::write(dir.path().join("config.json"), config(4)).unwrap();
        let err = WeightStore::open(&src, &s).err().unwrap().to_string();
        assert!(
            err.contains("model.layers.0.mlp.gate.weight") && err.contains("shape"),
            "{err}"
        );
    }
}
