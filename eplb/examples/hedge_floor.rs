//! How low can a plan's *expected* next-window PAR go on `moectl bench`'s traces, for a plan
//! that knows the next window's law exactly (not only its expectation)?
//!
//! The bench's "perfect prediction" row plans on the generator's expected next window, one
//! deterministic window. A plan could instead hedge against the unknown drift step: a rank
//! holding one heavy replica swings more than a rank of many light ones, so the plan with the
//! lowest *expected* maximum need not balance the expected window best. This example measures
//! what such hedging is worth. Per layer it starts from the perfect-prediction plan and runs a
//! local search straight on the quantity scored, the mean over `train` draws of the next
//! window (the generator's own law: drift step and counting noise) of the layer's PAR, with two
//! moves: swapping two replicas between ranks, and handing a slot of a replicated expert to
//! another expert (replica counts change). Every plan is then scored on `test` fresh draws and
//! on the bench's own draws (the table's "expected next PAR"). A sample-average plan fits its
//! training draws; the fresh draws say what it is worth.
//!
//! `cargo run --release -p eplb --example hedge_floor -- [seed] [train] [test] [shape filter]`
//! (defaults 2026, 256, 512, every shape).
use std::time::Instant;

use eplb::bench::{
    BenchInputs, BenchOptions, NEXT_DRAWS, draw_next_windows, mean_par_over, next_draws_seed,
    standard_shapes,
};
use eplb::load::LoadHistory;
use eplb::placement::Placement;
use eplb::planner::PlanRequest;
use eplb::planner_by_name;
use eplb::synth::Rng;

/// Draws `[draw][layer][expert]`.
type Draws = Vec<Vec<Vec<f64>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
    };
    let opts = BenchOptions {
        seed: num(0, 2026),
        ..BenchOptions::default()
    };
    let train = num(1, 256) as usize;
    let test = num(2, 512) as usize;
    let filter = args.get(3).map(|s| s.to_lowercase()).unwrap_or_default();
    println!(
        "seed {}, {train} training draws, {test} fresh test draws, {NEXT_DRAWS} bench draws",
        opts.seed
    );
    println!();
    println!(
        "| shape | plan | expected next PAR (bench's {NEXT_DRAWS} draws) | expected next PAR ({test} fresh draws) | below multi-episode-lpt (fresh) | training draws' PAR | ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for bs in standard_shapes()
        .into_iter()
        .filter(|s| s.name.to_lowercase().contains(&filter))
    {
        let inputs = BenchInputs::generate(&bs, &opts)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let bench_draws = draw_next_windows(
            &inputs.expected_next,
            &inputs.spec,
            next_draws_seed(&opts),
            NEXT_DRAWS,
        );
        // Seeds of their own, so that neither set is the other's nor the bench's.
        let train_draws = draw_next_windows(
            &inputs.expected_next,
            &inputs.spec,
            opts.seed ^ 0x7472,
            train,
        );
        let test_draws = draw_next_windows(
            &inputs.expected_next,
            &inputs.spec,
            opts.seed ^ 0x7465,
            test,
        );

        let lpt = planner_by_name("multi-episode-lpt")?
            .plan(&inputs.request(bs.shape, threads))?
            .placement;
        let joint = planner_by_name("joint")?
            .plan(&inputs.request(bs.shape, threads))?
            .placement;
        let predicted = planner_by_name("joint")?
            .plan(&PlanRequest::new(
                bs.shape,
                &LoadHistory::single(inputs.expected_next.clone())?,
            ))?
            .placement;
        let t0 = Instant::now();
        let hedged = hedge(&predicted, &train_draws, opts.seed, threads)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;

        let lpt_fresh = mean_par_over(&lpt, &test_draws)?;
        let rows = [
            ("multi-episode-lpt (from the history)", &lpt, None),
            ("joint (from the history)", &joint, None),
            (
                "joint with perfect prediction (expected next window)",
                &predicted,
                None,
            ),
            (
                "hedged: local search on the training draws",
                &hedged,
                Some(ms),
            ),
        ];
        for (name, p, ms) in rows {
            let fresh = mean_par_over(p, &test_draws)?;
            println!(
                "| {} | {name} | {:.4} | {fresh:.4} | {:.2}% | {:.4} | {} |",
                bs.name,
                mean_par_over(p, &bench_draws)?,
                100.0 * (1.0 - fresh / lpt_fresh),
                mean_par_over(p, &train_draws)?,
                ms.map_or("-".to_string(), |ms| format!("{ms:.0}")),
            );
        }
        println!(
            "| {} | 2% below multi-episode-lpt | - | {:.4} | 2.00% | - | - |",
            bs.name,
            0.98 * lpt_fresh
        );
    }
    Ok(())
}

/// The layers of `start` improved by [`LayerSearch`], `threads` layers at a time.
fn hedge(
    start: &Placement,
    draws: &Draws,
    seed: u64,
    threads: usize,
) -> Result<Placement, Box<dyn std::error::Error>> {
    let layers = start.num_layers;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); layers];
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let l = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if l >= layers {
                            return done;
                        }
                        let loads: Vec<&[f64]> = draws.iter().map(|d| d[l].as_slice()).collect();
                        let mut search = LayerSearch::new(
                            start.phy2log[l].clone(),
                            start.num_ranks,
                            start.num_logical_experts,
                            &loads,
                        );
                        search.run(seed ^ (l as u64) << 20);
                        done.push((l, search.slots));
                    }
                })
            })
            .collect();
        for h in handles {
            if let Ok(done) = h.join() {
                for (l, slots) in done {
                    rows[l] = slots;
                }
            }
        }
    });
    Ok(Placement::from_phy2log(
        start.num_logical_experts,
        start.num_ranks,
        start.num_nodes,
        rows,
    )?)
}

/// One layer's sample-average local search: slots `[physical slot] -> expert`, the replica
/// counts, and per draw the rank loads and their sum.
struct LayerSearch<'a> {
    slots: Vec<usize>,
    count: Vec<usize>,
    ranks: usize,
    per_rank: usize,
    loads: &'a [&'a [f64]],
    /// `[draw][rank]`.
    rank_load: Vec<Vec<f64>>,
    /// Each draw's total (every expert is placed, so moves keep it).
    total: Vec<f64>,
    objective: f64,
}

impl<'a> LayerSearch<'a> {
    fn new(
        slots: Vec<usize>,
        ranks: usize,
        experts: usize,
        loads: &'a [&'a [f64]],
    ) -> LayerSearch<'a> {
        let mut count = vec![0; experts];
        for &e in &slots {
            count[e] += 1;
        }
        let per_rank = slots.len() / ranks;
        let mut s = LayerSearch {
            slots,
            count,
            ranks,
            per_rank,
            loads,
            rank_load: Vec::new(),
            total: loads.iter().map(|x| x.iter().sum()).collect(),
            objective: 0.0,
        };
        s.rank_load = (0..loads.len()).map(|d| s.rank_loads(d)).collect();
        s.objective = s.mean_par(&s.rank_load);
        s
    }

    fn rank_loads(&self, d: usize) -> Vec<f64> {
        let mut r = vec![0.0; self.ranks];
        for (slot, &e) in self.slots.iter().enumerate() {
            r[slot / self.per_rank] += self.loads[d][e] / self.count[e] as f64;
        }
        r
    }

    fn mean_par(&self, rank_load: &[Vec<f64>]) -> f64 {
        let mut sum = 0.0;
        for (r, &t) in rank_load.iter().zip(&self.total) {
            let max = r.iter().copied().fold(0.0, f64::max);
            sum += if t > 0.0 {
                max * self.ranks as f64 / t
            } else {
                1.0
            };
        }
        sum / rank_load.len() as f64
    }

    fn holds(&self, rank: usize, e: usize) -> bool {
        self.slots[rank * self.per_rank..(rank + 1) * self.per_rank].contains(&e)
    }

    /// First-improvement search: random swaps and hand-overs, from the rank that is most often
    /// the heaviest; stops after `patience` moves in a row without a gain.
    fn run(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let patience = 4 * self.slots.len();
        let mut since = 0;
        while since < patience {
            since += 1;
            let a = self.heavy_rank(&mut rng);
            let i = a * self.per_rank + rng.below(self.per_rank);
            let j = rng.below(self.slots.len());
            let b = j / self.per_rank;
            let (e1, e2) = (self.slots[i], self.slots[j]);
            if a == b || e1 == e2 {
                continue;
            }
            let mut trial = self.slots.clone();
            let mut count = self.count.clone();
            if rng.below(4) == 0 {
                // Hand slot i's replica of e1 to e2 (e1 keeps at least one replica).
                if count[e1] < 2 || self.holds(a, e2) {
                    continue;
                }
                trial[i] = e2;
                count[e1] -= 1;
                count[e2] += 1;
            } else {
                if self.holds(a, e2) || self.holds(b, e1) {
                    continue;
                }
                trial.swap(i, j);
            }
            // Only the ranks holding e1 or e2 change (a and b for a swap).
            let affected: Vec<usize> = (0..self.ranks)
                .filter(|&q| {
                    let range = q * self.per_rank..(q + 1) * self.per_rank;
                    self.slots[range.clone()]
                        .iter()
                        .chain(&trial[range])
                        .any(|&e| e == e1 || e == e2)
                })
                .collect();
            let mut fresh = vec![vec![0.0; affected.len()]; self.loads.len()];
            let mut sum = 0.0;
            for (d, new) in fresh.iter_mut().enumerate() {
                let mut max: f64 = 0.0;
                for (q, &l) in self.rank_load[d].iter().enumerate() {
                    if !affected.contains(&q) {
                        max = max.max(l);
                    }
                }
                for (k, &q) in affected.iter().enumerate() {
                    new[k] = trial[q * self.per_rank..(q + 1) * self.per_rank]
                        .iter()
                        .map(|&e| self.loads[d][e] / count[e] as f64)
                        .sum();
                    max = max.max(new[k]);
                }
                let t = self.total[d];
                sum += if t > 0.0 {
                    max * self.ranks as f64 / t
                } else {
                    1.0
                };
            }
            let objective = sum / self.loads.len() as f64;
            if objective < self.objective - 1e-12 {
                self.objective = objective;
                self.slots = trial;
                self.count = count;
                for (d, new) in fresh.iter().enumerate() {
                    for (k, &q) in affected.iter().enumerate() {
                        self.rank_load[d][q] = new[k];
                    }
                }
                since = 0;
            }
        }
    }

    /// A rank drawn with weight the number of draws in which it carries the most.
    fn heavy_rank(&self, rng: &mut Rng) -> usize {
        let d = rng.below(self.rank_load.len());
        let r = &self.rank_load[d];
        (0..self.ranks)
            .max_by(|&x, &y| r[x].total_cmp(&r[y]))
            .unwrap_or(0)
    }
}
