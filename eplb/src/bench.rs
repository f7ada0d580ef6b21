//! The benchmark protocol behind `moectl bench`.
//!
//! For each shape a synthetic trace of `2H + 1` windows is generated. The placement in use
//! ("previous") is the `joint` plan of the first H windows. Every algorithm then plans on the
//! next H windows (the history) with that previous placement, and is scored on the history
//! (PAR of every window: mean over layers and windows, worst over both) and on the window that
//! follows (mean and worst over layers). `static round-robin` and `keep previous` are shown for
//! reference, and so are plans that know more than the history (the next window itself, the
//! generator's expected next window, draws from its distribution) and the next window's lower
//! bound: they show how much of the gap to PAR 1 any plan from history could close. Planning
//! time is the median of several runs; `greedy` runs on one thread.

use std::time::Instant;

pub mod peers;
pub mod rolling;

use crate::error::Result;
use crate::initial::{InitialStrategy, initial_placement};
use crate::load::LoadHistory;
use crate::metrics::{migration_cost, score, score_history};
use crate::placement::Placement;
use crate::planner::{PlanRequest, planner_by_name};
use crate::shape::Shape;
use crate::synth::{TraceSpec, generate_with_expectation};
use crate::traffic::{cross_node_moves, mean_cross_node_floor, mean_cross_node_share};

/// A benchmark shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchShape {
    pub name: &'static str,
    pub num_layers: usize,
    pub shape: Shape,
}

/// The four shapes of the issue.
pub fn standard_shapes() -> Vec<BenchShape> {
    let mk = |name, num_layers, e, r, g, n, k| BenchShape {
        name,
        num_layers,
        shape: Shape {
            num_experts: e,
            num_redundant: r,
            num_ranks: g,
            num_nodes: n,
            num_groups: k,
        },
    };
    vec![
        mk("DeepSeek-V3 prefill", 58, 256, 32, 32, 4, 8),
        mk("DeepSeek-V3 decode", 58, 256, 64, 64, 8, 8),
        mk("Qwen3-235B", 48, 128, 16, 16, 2, 1),
        mk("Mixtral-like", 32, 64, 8, 8, 1, 1),
    ]
}

/// Options of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Windows of history (H).
    pub history: usize,
    pub seed: u64,
    /// Timed repetitions (median reported).
    pub repeats: usize,
    /// `max_moves` given to `incremental` and to `joint` per layer, as fractions of the slots
    /// (one row each).
    pub incremental_fractions: Vec<f64>,
    /// Standard deviation of each expert's log-popularity step per window
    /// ([`TraceSpec::drift`]; [`DEFAULT_DRIFT`] unless a run asks for another).
    pub drift: f64,
    /// The operator triggers a rolling run replays, one `joint, operator trigger` row each
    /// (default: [`rolling::replayed_triggers`]).
    pub triggers: Vec<rolling::Trigger>,
}

/// The traces' drift unless a run asks for another: each expert's popularity moves by a
/// log-normal step of about 12% per window.
pub const DEFAULT_DRIFT: f64 = 0.12;

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            history: 8,
            seed: 2026,
            repeats: 5,
            incremental_fractions: vec![0.0625, 0.125],
            drift: DEFAULT_DRIFT,
            triggers: rolling::replayed_triggers().to_vec(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchRow {
    pub algorithm: String,
    pub shape: String,
    pub history_mean_par: f64,
    pub history_worst_par: f64,
    pub next_mean_par: f64,
    pub next_worst_par: f64,
    /// Mean over [`NEXT_DRAWS`] draws of the next window from the generator's own law (given
    /// everything before it) of the next-window mean PAR: the plan's expected next-window PAR,
    /// without the luck of the one window that happened.
    pub expected_next_par: f64,
    pub slots_moved: usize,
    pub slots_total: usize,
    /// Median planning time.
    pub plan_ms: f64,
    /// Fastest planning time.
    pub plan_ms_min: f64,
    /// Mean and largest relative gap of the plan's objective to its lower bound (joint only).
    pub gap: Option<(f64, f64)>,
    pub threads: usize,
    /// Share of the next window's token-expert assignments that leave their node
    /// ([`crate::traffic`]; 0 with one node).
    pub cross_node_tokens: f64,
    /// Moved slots whose expert must come from another node.
    pub cross_node_moves: usize,
    /// The smallest cross-node share the plan's replica counts allow.
    pub cross_node_floor: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The generator's settings of one shape's trace of `num_windows` windows: deterministic in the
/// shape and the options' seed (the one-shot and the rolling protocol draw from the same law).
fn trace_spec(bs: &BenchShape, opts: &BenchOptions, num_windows: usize) -> TraceSpec {
    let mut spec = TraceSpec::new(
        bs.num_layers,
        bs.shape.num_experts,
        bs.shape.num_groups,
        num_windows,
        opts.seed ^ (bs.shape.num_ranks as u64 * 1_000_003 + bs.num_layers as u64),
    );
    spec.drift = opts.drift;
    spec
}

/// The placement in use when a run starts: the `joint` plan of the windows before it.
fn starting_placement(bs: &BenchShape, older: &LoadHistory) -> Result<Placement> {
    Ok(planner_by_name("joint")?
        .plan(&PlanRequest::new(bs.shape, older))?
        .placement)
}

/// Mean over `draws` of `p`'s mean PAR over layers: a plan's expected PAR on a window drawn
/// from the generator's law.
pub fn mean_par_over(p: &Placement, draws: &[Vec<Vec<f64>>]) -> Result<f64> {
    let mut expected = 0.0;
    for d in draws {
        expected += score(p, d)?.mean / draws.len() as f64;
    }
    Ok(expected)
}

/// The lower bound of a window's PAR ([`crate::planner::par_lower_bound`]), mean over layers.
fn mean_lower_bound(shape: &Shape, window: &[Vec<f64>]) -> f64 {
    window
        .iter()
        .map(|layer| crate::planner::par_lower_bound(shape, layer))
        .sum::<f64>()
        / window.len() as f64
}

/// [`mean_lower_bound`] averaged over `draws`: the lower bound of a plan's expected PAR.
fn mean_lower_bound_over(shape: &Shape, draws: &[Vec<Vec<f64>>]) -> f64 {
    let mut b = 0.0;
    for d in draws {
        b += mean_lower_bound(shape, d) / draws.len() as f64;
    }
    b
}

/// What every algorithm of one shape's run plans from and is scored on.
pub struct BenchInputs {
    /// The trace's generator settings.
    pub spec: TraceSpec,
    /// The H windows every algorithm plans on.
    pub history: LoadHistory,
    /// The window that follows the history `[layer][expert]`.
    pub next: Vec<Vec<f64>>,
    /// The generator's expected next window `[layer][expert]` (its hidden state, no noise).
    pub expected_next: Vec<Vec<f64>>,
    /// The placement in use: the `joint` plan of the H windows before the history.
    pub previous: Placement,
}

impl BenchInputs {
    /// The trace of `2H + 1` windows of one shape and the placement in use (deterministic in
    /// the shape and the options' seed and history).
    pub fn generate(bs: &BenchShape, opts: &BenchOptions) -> Result<BenchInputs> {
        let h = opts.history.max(1);
        let spec = trace_spec(bs, opts, 2 * h + 1);
        let (windows, mut expected) = generate_with_expectation(&spec);
        let all = LoadHistory::new(windows)?;
        let history = all.slice(h..2 * h)?;
        let next = all.windows()[2 * h].clone();
        let previous = starting_placement(bs, &all.slice(0..h)?)?;
        Ok(BenchInputs {
            spec,
            history,
            next,
            expected_next: expected.swap_remove(2 * h),
            previous,
        })
    }

    /// The request every timed algorithm starts from: the history, the placement in use, and
    /// `threads` planning threads.
    pub fn request(&self, shape: Shape, threads: usize) -> PlanRequest<'_> {
        PlanRequest::new(shape, &self.history)
            .previous(&self.previous)
            .threads(threads)
    }
}

/// Scores placements of one shape's run: every row of the table comes from [`Scorer::row`],
/// ours and the peers' alike, so they are measured on the same windows the same way.
pub struct Scorer<'a> {
    shape_name: &'a str,
    inputs: &'a BenchInputs,
    /// [`NEXT_DRAWS`] draws of the next window behind [`BenchRow::expected_next_par`].
    next_draws: Vec<Vec<Vec<f64>>>,
    slots_total: usize,
}

impl<'a> Scorer<'a> {
    pub fn new(bs: &'a BenchShape, inputs: &'a BenchInputs, opts: &BenchOptions) -> Scorer<'a> {
        Scorer {
            shape_name: bs.name,
            inputs,
            next_draws: draw_next_windows(
                &inputs.expected_next,
                &inputs.spec,
                next_draws_seed(opts),
                NEXT_DRAWS,
            ),
            slots_total: bs.shape.slots() * bs.num_layers,
        }
    }

    /// The row of `placement`, planned in `ms` on `threads` threads (0: not a timed plan).
    pub fn row(
        &self,
        name: &str,
        p: &Placement,
        ms: f64,
        gap: Option<(f64, f64)>,
        threads: usize,
    ) -> Result<BenchRow> {
        let BenchInputs {
            history,
            next,
            previous,
            ..
        } = self.inputs;
        let hs = score_history(p, history)?;
        let ns = score(p, next)?;
        let expected_next_par = mean_par_over(p, &self.next_draws)?;
        Ok(BenchRow {
            algorithm: name.to_string(),
            shape: self.shape_name.to_string(),
            history_mean_par: hs.mean,
            history_worst_par: hs.worst,
            next_mean_par: ns.mean,
            next_worst_par: ns.worst,
            expected_next_par,
            slots_moved: migration_cost(previous, p, 0)?.slots,
            slots_total: self.slots_total,
            plan_ms: ms,
            plan_ms_min: ms,
            gap,
            threads,
            cross_node_tokens: mean_cross_node_share(p, next),
            cross_node_moves: cross_node_moves(previous, p),
            cross_node_floor: mean_cross_node_floor(p, next),
        })
    }
}

/// Runs the protocol on one shape.
pub fn run_shape(bs: &BenchShape, opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    Ok(run_shape_with_peers(bs, opts, Vec::new())?.0)
}

/// [`run_shape`] with the peers' plans of this shape scored beside ours (after our
/// algorithms, before the reference rows), and what became of each peer plan.
pub fn run_shape_with_peers(
    bs: &BenchShape,
    opts: &BenchOptions,
    peer_plans: Vec<peers::PeerPlan>,
) -> Result<(Vec<BenchRow>, Vec<peers::PeerOutcome>)> {
    let inputs = BenchInputs::generate(bs, opts)?;
    let BenchInputs {
        spec,
        history: _,
        next,
        expected_next,
        previous,
    } = &inputs;
    let scorer = Scorer::new(bs, &inputs, opts);
    let shape = bs.shape;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut rows = Vec::new();
    let rr = initial_placement(InitialStrategy::RoundRobin, bs.num_layers, &shape)?;
    rows.push(scorer.row("static round-robin", &rr, 0.0, None, 0)?);
    rows.push(scorer.row("keep previous", previous, 0.0, None, 0)?);
    // (algorithm, threads, max moves, node slack)
    type Run<'n> = (&'n str, usize, Option<usize>, Option<f64>);
    let mut algos: Vec<Run> = vec![("greedy", 1, None, None)];
    // Our DeepSeek re-implementation's plan, checked against the peers that run DeepSeek's.
    let mut greedy_plan = None;
    if shape.hierarchical() {
        algos.push(("greedy-global", 1, None, None));
    }
    algos.push(("multi-episode-lpt", threads, None, None));
    algos.push(("flashlb-like", threads, None, None));
    algos.push(("joint", threads, None, None));
    if shape.num_nodes > 1 {
        algos.push(("joint", threads, None, Some(NODE_SLACK_ROW)));
    }
    for f in &opts.incremental_fractions {
        let budget = ((shape.slots() as f64 * f).ceil() as usize).max(1);
        algos.push(("incremental", threads, Some(budget), None));
        algos.push(("joint", threads, Some(budget), None));
    }
    for (name, thr, budget, node_slack) in algos {
        let planner = planner_by_name(name)?;
        let mut req = inputs.request(shape, thr);
        if let Some(b) = budget {
            req = req.max_moves(b);
        }
        if let Some(s) = node_slack {
            req = req.node_slack(s);
        }
        let mut times = Vec::new();
        let mut plan = None;
        // Single-threaded baselines are cheap: time them more often for a stable minimum.
        let reps = if thr == 1 {
            opts.repeats.max(1) * 5
        } else {
            opts.repeats.max(1)
        };
        for _ in 0..reps {
            let t0 = Instant::now();
            let p = planner.plan(&req)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            plan = Some(p);
        }
        let Some(plan) = plan else { continue };
        if name == "greedy" {
            greedy_plan = Some(plan.placement.clone());
        }
        let gap = (name == "joint").then(|| (plan.mean_gap(), plan.max_gap()));
        let label = match (budget, node_slack) {
            (Some(b), _) => format!("{name} (max {b}/layer)"),
            (None, Some(s)) => format!("{name} (node slack {:.0}%)", 100.0 * s),
            (None, None) => name.to_string(),
        };
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let mut row = scorer.row(&label, &plan.placement, median(times), gap, thr)?;
        row.plan_ms_min = min;
        rows.push(row);
    }
    let mut outcomes = Vec::new();
    for plan in peer_plans {
        let outcome = peers::score_peer(&scorer, bs, plan, greedy_plan.as_ref());
        if let peers::PeerOutcome::Scored { row, .. } = &outcome {
            rows.push(row.as_ref().clone());
        }
        outcomes.push(outcome);
    }
    // Hindsight: joint planned on the next window itself (an empirical floor for plans made
    // from the history, not a bound).
    let hindsight = planner_by_name("joint")?
        .plan(&PlanRequest::new(
            shape,
            &LoadHistory::single(next.clone())?,
        ))?
        .placement;
    rows.push(scorer.row(HINDSIGHT_ROW, &hindsight, 0.0, None, 0)?);
    // Perfect prediction: joint planned on the generator's expected next window (it knows the
    // hidden state; only the next drift step and the counting noise are unknown to it).
    let predicted = planner_by_name("joint")?
        .plan(&PlanRequest::new(
            shape,
            &LoadHistory::single(expected_next.clone())?,
        ))?
        .placement;
    rows.push(scorer.row(PREDICTION_ROW, &predicted, 0.0, None, 0)?);
    // Perfect knowledge of the next window's distribution: 16 draws of the drift step around
    // the expected next window (the generator's own drift law), planned jointly as episodes.
    let mut rng = crate::synth::Rng::new(opts.seed ^ 0xd1f7);
    let draws: Vec<Vec<Vec<f64>>> = (0..16)
        .map(|_| {
            expected_next
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|&v| v * (spec.drift * rng.normal()).exp())
                        .collect()
                })
                .collect()
        })
        .collect();
    let draws = LoadHistory::new(draws)?;
    let mut req_draws = PlanRequest::new(shape, &draws);
    req_draws.recency = Some(1.0);
    let robust = planner_by_name("joint")?.plan(&req_draws)?.placement;
    rows.push(scorer.row(DISTRIBUTION_ROW, &robust, 0.0, None, 0)?);
    // What no plan made from the history can beat on the next window.
    let bound = mean_lower_bound(&shape, next);
    rows.push(BenchRow {
        algorithm: BOUND_ROW.to_string(),
        shape: bs.name.to_string(),
        history_mean_par: f64::NAN,
        history_worst_par: f64::NAN,
        next_mean_par: bound,
        next_worst_par: f64::NAN,
        expected_next_par: mean_lower_bound_over(&shape, &scorer.next_draws),
        slots_moved: 0,
        slots_total: scorer.slots_total,
        plan_ms: 0.0,
        plan_ms_min: 0.0,
        gap: None,
        threads: 0,
        cross_node_tokens: f64::NAN,
        cross_node_moves: 0,
        cross_node_floor: f64::NAN,
    });
    Ok((rows, outcomes))
}

/// Draws of the next window behind [`BenchRow::expected_next_par`].
pub const NEXT_DRAWS: usize = 32;

/// The seed of the [`NEXT_DRAWS`] draws behind [`BenchRow::expected_next_par`].
pub fn next_draws_seed(opts: &BenchOptions) -> u64 {
    opts.seed ^ 0x6e78_7464
}

/// `count` draws of the next window `[L][E]` from the generator's law given its state after
/// the history: expected counts (`expected`, one drift step ahead without its noise) times a
/// log-normal drift step per expert, renormalised to the window's tokens, then the
/// Poisson-like counting noise (as in [`crate::synth::generate`]). The table uses
/// [`NEXT_DRAWS`] of them; `examples/hedge_floor.rs` draws more.
pub fn draw_next_windows(
    expected: &[Vec<f64>],
    spec: &TraceSpec,
    seed: u64,
    count: usize,
) -> Vec<Vec<Vec<f64>>> {
    let mut rng = crate::synth::Rng::new(seed);
    (0..count)
        .map(|_| {
            expected
                .iter()
                .map(|row| {
                    let w: Vec<f64> = row
                        .iter()
                        .map(|&v| v * (spec.drift * rng.normal()).exp())
                        .collect();
                    let z: f64 = w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    w.iter()
                        .map(|&v| {
                            let lambda = spec.tokens_per_window * v / z;
                            (lambda + lambda.sqrt() * rng.normal()).round().max(0.0)
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Node slack of the extra `joint` row on shapes with several nodes (the default is 0.25%).
pub const NODE_SLACK_ROW: f64 = 0.03;

/// Label of the row planned on the next window itself.
pub const HINDSIGHT_ROW: &str = "joint in hindsight (planned on the next window)";
/// Label of the row planned on the generator's expected next window.
pub const PREDICTION_ROW: &str = "joint with perfect prediction (expected next window)";
/// Label of the row planned on draws from the next window's true distribution.
pub const DISTRIBUTION_ROW: &str = "joint knowing the next window's distribution";
/// Label of the row that holds the next window's lower bound (mean over layers).
pub const BOUND_ROW: &str = "lower bound (next window)";

/// A PAR in a report's table: four decimals, `-` where there is none (NaN).
fn par(x: f64) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.4}")
    }
}

/// Markdown table of benchmark rows.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| shape | algorithm | history mean PAR | history worst PAR | next mean PAR | next worst PAR | expected next PAR | slots moved | cross-node moves | cross-node tokens (next) | plan ms (min / median) | threads | gap to bound (mean / max) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (time, threads) = if r.threads == 0 {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.2} / {:.2}", r.plan_ms_min, r.plan_ms),
                r.threads.to_string(),
            )
        };
        let (moved, cross_moves, cross_tokens) = if r.algorithm == BOUND_ROW {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            (
                format!(
                    "{} ({:.1}%)",
                    r.slots_moved,
                    100.0 * r.slots_moved as f64 / r.slots_total.max(1) as f64
                ),
                r.cross_node_moves.to_string(),
                format!("{:.1}%", 100.0 * r.cross_node_tokens),
            )
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.shape,
            r.algorithm,
            par(r.history_mean_par),
            par(r.history_worst_par),
            par(r.next_mean_par),
            par(r.next_worst_par),
            par(r.expected_next_par),
            moved,
            cross_moves,
            cross_tokens,
            time,
            threads,
            r.gap.map_or("-".to_string(), |(m, x)| format!(
                "{:.2}% / {:.2}%",
                100.0 * m,
                100.0 * x
            )),
        ));
    }
    s
}

/// The distinct shape names of a report's rows, in the order they first appear.
fn in_order<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut shapes: Vec<&str> = Vec::new();
    for name in names {
        if !shapes.contains(&name) {
            shapes.push(name);
        }
    }
    shapes
}

/// Computed findings per shape: joint vs the greedy baselines on the next window, the share of
/// joint's gain that incremental reaches and at what migration, and the timing targets.
pub fn summary(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    for shape in in_order(rows.iter().map(|r| r.shape.as_str())) {
        let of = |name: &str| {
            rows.iter()
                .find(|r| r.shape == shape && r.algorithm == name)
        };
        let (Some(keep), Some(greedy), Some(joint)) =
            (of("keep previous"), of("greedy"), of("joint"))
        else {
            continue;
        };
        let global = of("greedy-global");
        let flash = of("flashlb-like");
        let lpt = of("multi-episode-lpt");
        let others: Vec<&BenchRow> = [Some(greedy), global, lpt, flash]
            .into_iter()
            .flatten()
            .collect();
        let best_other = others
            .iter()
            .map(|r| r.next_mean_par)
            .fold(f64::INFINITY, f64::min);
        let names: Vec<String> = others
            .iter()
            .map(|r| format!("{} {:.4}", r.algorithm, r.next_mean_par))
            .collect();
        out.push_str(&format!(
            "- **{shape}**: joint next-window mean PAR {:.4} vs {} -> {}; ",
            joint.next_mean_par,
            names.join(" / "),
            if joint.next_mean_par <= best_other {
                "joint lowest"
            } else {
                "joint NOT lowest"
            },
        ));
        if let Some(lpt) = of("multi-episode-lpt") {
            let below = 100.0 * (1.0 - joint.next_mean_par / lpt.next_mean_par);
            out.push_str(&format!(
                "joint {below:.2}% below multi-episode-lpt ({:.4}; target: at least 2%) moving {} slots (lpt: {}) -> {}; ",
                lpt.next_mean_par,
                joint.slots_moved,
                lpt.slots_moved,
                if below >= 2.0 && joint.slots_moved <= lpt.slots_moved {
                    "met"
                } else {
                    "NOT met"
                }
            ));
            for reference in [PREDICTION_ROW, DISTRIBUTION_ROW] {
                if let Some(r) = of(reference) {
                    out.push_str(&format!(
                        "{reference}: {:.4} ({:.2}% below lpt); ",
                        r.next_mean_par,
                        100.0 * (1.0 - r.next_mean_par / lpt.next_mean_par)
                    ));
                }
            }
            // The same in expectation over draws of the next window: what remains once the
            // luck of the one window that happened is averaged out.
            let below = |r: &BenchRow| 100.0 * (1.0 - r.expected_next_par / lpt.expected_next_par);
            out.push_str(&format!(
                "expected next-window PAR over {NEXT_DRAWS} draws: lpt {:.4}, joint {:.4} ({:.2}% below lpt)",
                lpt.expected_next_par,
                joint.expected_next_par,
                below(joint),
            ));
            for reference in [PREDICTION_ROW, DISTRIBUTION_ROW] {
                if let Some(r) = of(reference) {
                    out.push_str(&format!(
                        ", {reference} {:.4} ({:.2}% below lpt)",
                        r.expected_next_par,
                        below(r)
                    ));
                }
            }
            out.push_str("; ");
            if let Some(b) = of(BOUND_ROW) {
                out.push_str(&format!(
                    "next-window lower bound {:.4}: lpt is {:.2}% above it, joint {:.2}%; ",
                    b.next_mean_par,
                    100.0 * (lpt.next_mean_par / b.next_mean_par - 1.0),
                    100.0 * (joint.next_mean_par / b.next_mean_par - 1.0),
                ));
            }
        }
        if joint.cross_node_floor > 0.0 {
            out.push_str(&format!(
                "cross-node tokens: joint {:.1}% (its replica counts allow {:.1}%), lpt {}; ",
                100.0 * joint.cross_node_tokens,
                100.0 * joint.cross_node_floor,
                of("multi-episode-lpt").map_or("-".into(), |r| format!(
                    "{:.1}% ({:.1}%)",
                    100.0 * r.cross_node_tokens,
                    100.0 * r.cross_node_floor
                )),
            ));
        }
        let gain = keep.next_mean_par - joint.next_mean_par;
        for inc in rows.iter().filter(|r| {
            r.shape == shape
                && (r.algorithm.starts_with("incremental") || r.algorithm.starts_with("joint (max"))
        }) {
            let share = if gain > 0.0 {
                100.0 * (keep.next_mean_par - inc.next_mean_par) / gain
            } else {
                100.0
            };
            out.push_str(&format!(
                "{} reaches {:.0}% of joint's next-window gain over keeping the previous placement, moving {:.1}% of the slots (joint: {:.1}%); ",
                inc.algorithm,
                share,
                100.0 * inc.slots_moved as f64 / inc.slots_total.max(1) as f64,
                100.0 * joint.slots_moved as f64 / joint.slots_total.max(1) as f64,
            ));
        }
        out.push_str(&format!(
            "greedy {:.2} ms (fastest, 1 thread; target < 5 ms), joint {:.0} ms (fastest, {} threads; target < 1000 ms).\n",
            greedy.plan_ms_min, joint.plan_ms_min, joint.threads
        ));
    }
    out
}
