//! The rolling protocol behind `moectl bench --rolling K`: every policy replans K times in a
//! row on a drifting trace, each time from the placement it deployed the step before, as a
//! live loop does (the operator, vLLM's `EplbState`, vllm-ascend's EPLB worker).
//!
//! The one-shot protocol ([`super::run_shape`]) asks which plan is best for the next window
//! when every policy starts from the same placement. A deployment lives with its policy for
//! many rebalances: a policy that moves little each time, or keeps state across calls
//! (FlashLB's ring buffer of windows and its per-layer trigger), shows what it costs and what
//! it saves only over several steps. So here:
//! - the trace has `2H + (K - 1) T + 1` windows (T: the stride); the placement in use at
//!   step 0 is the `joint` plan of the first H windows (as in the one-shot protocol);
//! - at step `k` (0-based) each policy plans on the H windows that start at `H + kT`, with
//!   its own placement of step `k - 1`, and is scored on the window after them (and on
//!   [`super::NEXT_DRAWS`] draws of it from the generator's law, for the expected PAR). With T = H
//!   (the default of `moectl bench --rolling`) each step sees only the windows recorded since
//!   the step before, as the engines count: vLLM records the last `window_size` steps before
//!   each rearrangement, vllm-ascend clears its counters after each cycle, SGLang's rebalance
//!   interval is at least its recorder's buffer. T = 1 slides the history one window a step;
//! - every step's slots moved are counted against the placement that policy deployed before.
//!
//! The peers' policies run the same loop in Python (`eplb/peers/`): `moectl bench --export DIR
//! --rolling K` writes [`RollingPeerInputs`], the driver writes one [`RollingPeerPlan`] per
//! peer with the placement it deployed at every step, and [`run_rolling`] scores them here.

use std::time::Instant;

use serde::Serialize;

mod peers;
mod report;
mod sweep;
mod trigger;

pub use peers::{PeerStep, RollingOutcome, RollingPeerInputs, RollingPeerPlan, score_rolling_peer};
pub use report::{markdown_table, steps_table, summary};
use trigger::accepted;
pub use trigger::{OPERATOR_DEFAULTS, Trigger, replayed_triggers};

use super::{
    BenchOptions, BenchShape, NEXT_DRAWS, draw_next_windows, mean_lower_bound,
    mean_lower_bound_over, mean_par_over, next_draws_seed, starting_placement, trace_spec,
};
use crate::error::{EplbError, Result};
use crate::load::LoadHistory;
use crate::metrics::{migration_cost, score};
use crate::placement::Placement;
use crate::planner::{PlanRequest, planner_by_name};
use crate::synth::{TraceSpec, generate_with_expectation};
use crate::traffic::{cross_node_moves, mean_cross_node_share};

/// The most steps `--rolling` takes: each step plans every algorithm once.
pub const MAX_STEPS: usize = 64;
/// The largest stride: the trace holds `(K - 1) T` windows more than two histories.
pub const MAX_STRIDE: usize = 1024;

/// The generator's law behind a synthetic trace: what a window's draws, and so the expected
/// PAR, come from.
pub struct TraceLaw {
    pub spec: TraceSpec,
    /// The generator's expected counts of each window (its hidden state, no noise).
    pub expected: Vec<Vec<Vec<f64>>>,
}

/// What every policy of one shape's rolling run plans from and is scored on.
pub struct RollingInputs {
    /// The generator's law of a synthetic trace; `None` for a recorded one (`moectl
    /// backtest`), which has no law to draw from, so no expected PAR.
    pub law: Option<TraceLaw>,
    /// Windows of history each step plans on (H).
    pub history: usize,
    /// Replanning steps (K).
    pub steps: usize,
    /// Windows between consecutive steps (T).
    pub stride: usize,
    /// The first window step 0 plans on: H on a synthetic trace (the first H windows made the
    /// starting placement).
    pub offset: usize,
    /// The windows `[window][layer][expert]`, oldest first: `offset + H + (K - 1) T + 1` of
    /// them on a synthetic trace, at least that many on a recorded one.
    pub windows: Vec<Vec<Vec<f64>>>,
    /// The placement in use before step 0.
    pub start: Placement,
    /// When each window closed, in seconds on any one clock (a recording's), for the
    /// triggers' cooldown; `None` on a synthetic trace: no cooldown.
    pub window_ends: Option<Vec<f64>>,
}

impl RollingInputs {
    /// The trace of one shape and the starting placement (deterministic in the shape, the
    /// options' seed and history, `steps` and `stride`).
    pub fn generate(
        bs: &BenchShape,
        opts: &BenchOptions,
        steps: usize,
        stride: usize,
    ) -> Result<RollingInputs> {
        if steps == 0 || steps > MAX_STEPS {
            return Err(EplbError::Request(format!(
                "{steps} rolling steps: give between 1 and {MAX_STEPS}"
            )));
        }
        let h = opts.history.max(1);
        check_stride(stride)?;
        let spec = trace_spec(bs, opts, 2 * h + (steps - 1) * stride + 1);
        let (windows, expected) = generate_with_expectation(&spec);
        let start = starting_placement(bs, &LoadHistory::new(windows[..h].to_vec())?)?;
        Ok(RollingInputs {
            law: Some(TraceLaw { spec, expected }),
            history: h,
            steps,
            stride,
            offset: h,
            windows,
            start,
            window_ends: None,
        })
    }

    /// A recorded trace replayed (`moectl backtest`): as many steps as the windows allow, at
    /// most `max_steps` (the latest ones). With `start` (the placement in use when the trace
    /// begins) step 0 plans on the first H windows; without it the first H windows make the
    /// starting placement (`joint`'s plan of them, as on a synthetic trace) and step 0 plans on
    /// the next H. Skipped steps move the start later: the placement in use before the first
    /// step kept is `start`, or `joint`'s plan of the H windows before that step's.
    pub fn recorded(
        bs: &BenchShape,
        history: &LoadHistory,
        history_windows: usize,
        stride: usize,
        max_steps: usize,
        start: Option<Placement>,
    ) -> Result<RollingInputs> {
        Self::recorded_steps(
            bs,
            history,
            history_windows,
            stride,
            max_steps,
            start,
            false,
        )
    }

    /// [`RollingInputs::recorded`]; with `newest_last` the steps move later by the windows the
    /// stride leaves over at the end (`(W - first - H - 1) mod T`), so that the last step is
    /// scored on the trace's last window (those windows are then left out in front instead).
    fn recorded_steps(
        bs: &BenchShape,
        history: &LoadHistory,
        history_windows: usize,
        stride: usize,
        max_steps: usize,
        start: Option<Placement>,
        newest_last: bool,
    ) -> Result<RollingInputs> {
        let h = history_windows;
        if h == 0 {
            return Err(EplbError::Request(
                "a history of 0 windows: each step plans on at least one".into(),
            ));
        }
        check_stride(stride)?;
        if max_steps == 0 {
            return Err(EplbError::Request(
                "at most 0 steps: give at least 1".into(),
            ));
        }
        if let Some(p) = &start {
            p.check_shape(&bs.shape)?;
            if p.num_layers != history.num_layers() {
                return Err(EplbError::Mismatch(format!(
                    "the starting placement has {} layers, the load {}",
                    p.num_layers,
                    history.num_layers()
                )));
            }
        }
        let first = if start.is_some() { 0 } else { h };
        let w = history.num_windows();
        let Some(fit) = steps_that_fit(w, first, h, stride) else {
            let need = if start.is_some() {
                format!(
                    "{}: {h} to plan on and the next to score",
                    h.saturating_add(1)
                )
            } else {
                format!(
                    "{}: {h} that make the starting placement, {h} to plan on and the next to \
                     score (with the placement in use given, {})",
                    h.saturating_mul(2).saturating_add(1),
                    h.saturating_add(1)
                )
            };
            return Err(EplbError::Request(format!(
                "the load has {w} window{}: a replay planning on {h} window{} needs at least \
                 {need}; plan on fewer windows or record more",
                if w == 1 { "" } else { "s" },
                if h == 1 { "" } else { "s" },
            )));
        };
        let steps = fit.min(max_steps);
        // What the stride leaves over: `fit` steps end `left` windows before the last one.
        let left = if newest_last {
            (w - first - h - 1) % stride
        } else {
            0
        };
        let offset = first + left + (fit - steps) * stride;
        let windows = history.windows().to_vec();
        let start = match start {
            Some(p) => p,
            None => {
                starting_placement(bs, &LoadHistory::new(windows[offset - h..offset].to_vec())?)?
            }
        };
        Ok(RollingInputs {
            law: None,
            history: h,
            steps,
            stride,
            offset,
            windows,
            start,
            window_ends: None,
        })
    }

    /// The first window step `k` plans on.
    fn first_at(&self, k: usize) -> usize {
        self.offset + k * self.stride
    }

    /// The H windows step `k` plans on.
    pub fn history_at(&self, k: usize) -> Result<LoadHistory> {
        let first = self.first_at(k);
        LoadHistory::new(self.windows[first..first + self.history].to_vec())
    }

    /// When step `k` decides: the close of the last window it plans on (`None` without a
    /// clock).
    pub fn decided_at(&self, k: usize) -> Option<f64> {
        let ends = self.window_ends.as_ref()?;
        ends.get(self.first_at(k) + self.history - 1).copied()
    }

    /// Sets when each window closed (seconds, one per window).
    pub fn with_window_ends(mut self, ends: Vec<f64>) -> Result<Self> {
        if ends.len() != self.windows.len() {
            return Err(EplbError::Mismatch(format!(
                "{} window end times for {} windows",
                ends.len(),
                self.windows.len()
            )));
        }
        self.window_ends = Some(ends);
        Ok(self)
    }

    /// The index of the window step `k`'s plan is scored on.
    pub fn scored_at(&self, k: usize) -> usize {
        self.first_at(k) + self.history
    }

    /// The window step `k`'s plan is scored on.
    pub fn next_at(&self, k: usize) -> &[Vec<f64>] {
        &self.windows[self.scored_at(k)]
    }
}

/// Steps a replay of `windows` windows fits, planning on `h` windows, `stride` apart, from the
/// window `first` on (`None`: not even one; checked, so that a history of `usize::MAX` windows
/// is refused rather than wrapped around).
fn steps_that_fit(windows: usize, first: usize, h: usize, stride: usize) -> Option<usize> {
    let used = first.checked_add(h)?.checked_add(1)?;
    (windows >= used && stride > 0).then(|| (windows - used) / stride + 1)
}

fn check_stride(stride: usize) -> Result<()> {
    if stride == 0 || stride > MAX_STRIDE {
        return Err(EplbError::Request(format!(
            "a stride of {stride} windows: give between 1 and {MAX_STRIDE}"
        )));
    }
    Ok(())
}

/// One policy's rolling run: what each step deployed cost and gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollingRow {
    pub algorithm: String,
    pub shape: String,
    /// Per step: mean PAR over layers on the window that followed the plan.
    pub next_par: Vec<f64>,
    /// Per step: that PAR's mean over [`super::NEXT_DRAWS`] draws of the window.
    pub expected_par: Vec<f64>,
    /// Per step: slots whose expert differs from the policy's placement of the step before.
    pub slots_moved: Vec<usize>,
    /// Per step: layers whose placement changed.
    pub layers_changed: Vec<usize>,
    /// Per step: moved slots whose expert comes from another node.
    pub cross_node_moves: Vec<usize>,
    /// Per step: share of the next window's token-expert assignments that leave their node.
    pub cross_node_tokens: Vec<f64>,
    /// Per step: planning time in milliseconds (empty for rows that do not plan).
    pub plan_ms: Vec<f64>,
    /// Slots of one placement (all layers).
    pub slots_total: usize,
    pub threads: usize,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl RollingRow {
    /// Next-window mean PAR, averaged over the steps.
    pub fn mean_next(&self) -> f64 {
        mean(&self.next_par)
    }
    /// Expected next-window mean PAR, averaged over the steps.
    pub fn mean_expected(&self) -> f64 {
        mean(&self.expected_par)
    }
    /// The largest step's next-window mean PAR.
    pub fn worst_step(&self) -> f64 {
        self.next_par.iter().copied().fold(f64::NAN, f64::max)
    }
    /// Slots moved over all steps.
    pub fn moved_total(&self) -> usize {
        self.slots_moved.iter().sum()
    }
    /// Slots moved per step, as a share of the slots.
    pub fn moved_share_per_step(&self) -> f64 {
        self.moved_total() as f64 / (self.slots_total.max(1) * self.slots_moved.len().max(1)) as f64
    }
}

/// Scores the placements each step deploys, ours and the peers' alike.
pub struct RollingScorer<'a> {
    shape_name: &'a str,
    inputs: &'a RollingInputs,
    /// Per step, the draws of its next window (none on a recorded trace).
    draws: Vec<Vec<Vec<Vec<f64>>>>,
    slots_total: usize,
}

impl<'a> RollingScorer<'a> {
    pub fn new(
        bs: &'a BenchShape,
        inputs: &'a RollingInputs,
        opts: &BenchOptions,
    ) -> RollingScorer<'a> {
        let draws = match &inputs.law {
            Some(law) => (0..inputs.steps)
                .map(|k| {
                    draw_next_windows(
                        &law.expected[inputs.scored_at(k)],
                        &law.spec,
                        next_draws_seed(opts) ^ ((k as u64 + 1) << 32),
                        NEXT_DRAWS,
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        RollingScorer {
            shape_name: bs.name,
            inputs,
            draws,
            slots_total: bs.shape.slots() * bs.num_layers,
        }
    }

    fn empty_row(&self, name: &str, threads: usize) -> RollingRow {
        RollingRow {
            algorithm: name.to_string(),
            shape: self.shape_name.to_string(),
            next_par: Vec::new(),
            expected_par: Vec::new(),
            slots_moved: Vec::new(),
            layers_changed: Vec::new(),
            cross_node_moves: Vec::new(),
            cross_node_tokens: Vec::new(),
            plan_ms: Vec::new(),
            slots_total: self.slots_total,
            threads,
        }
    }

    /// Adds step `k`'s placement `p`, deployed over `before`, to `row`.
    fn push_step(
        &self,
        row: &mut RollingRow,
        k: usize,
        before: &Placement,
        p: &Placement,
    ) -> Result<()> {
        let next = self.inputs.next_at(k);
        row.next_par.push(score(p, next)?.mean);
        row.expected_par.push(match self.draws.get(k) {
            Some(draws) => mean_par_over(p, draws)?,
            None => f64::NAN,
        });
        row.slots_moved.push(migration_cost(before, p, 0)?.slots);
        row.layers_changed.push(
            before
                .phy2log
                .iter()
                .zip(&p.phy2log)
                .filter(|(a, b)| a != b)
                .count(),
        );
        row.cross_node_moves.push(cross_node_moves(before, p));
        row.cross_node_tokens.push(mean_cross_node_share(p, next));
        Ok(())
    }
}

/// One of our policies in the rolling run.
struct OurPolicy {
    label: String,
    algorithm: &'static str,
    threads: usize,
    max_moves: Option<usize>,
    /// Replan only the layers the operator's trigger picks.
    trigger: Option<Trigger>,
    /// [`PlanRequest::min_improvement`] when not the default.
    min_improvement: Option<f64>,
}

/// Runs `policy` for every step from the starting placement.
fn run_ours(
    scorer: &RollingScorer<'_>,
    shape: &BenchShape,
    policy: &OurPolicy,
) -> Result<RollingRow> {
    let inputs = scorer.inputs;
    let planner = planner_by_name(policy.algorithm)?;
    let mut row = scorer.empty_row(&policy.label, policy.threads);
    let mut deployed = inputs.start.clone();
    // When the last remap began, on the trace's clock (the trigger's cooldown).
    let mut last_remap = None;
    for k in 0..inputs.steps {
        let history = inputs.history_at(k)?;
        let mut req = PlanRequest::new(shape.shape, &history)
            .previous(&deployed)
            .threads(policy.threads);
        if let Some(b) = policy.max_moves {
            req = req.max_moves(b);
        }
        if let Some(m) = policy.min_improvement {
            req.min_improvement = m;
        }
        // The operator measures the window recorded under the placement in use, and decides
        // when it closes.
        let latest = &history.windows()[history.num_windows() - 1];
        let now = inputs.decided_at(k);
        let mut triggered = None;
        if let Some(trigger) = &policy.trigger {
            let pars = score(&deployed, latest)?.per_layer;
            let layers = trigger.layers(&pars);
            if layers.is_empty() || !trigger.cooled_down(now, last_remap) {
                row.plan_ms.push(0.0);
                scorer.push_step(&mut row, k, &deployed, &deployed)?;
                continue;
            }
            req = req.layers(layers.clone());
            triggered = Some((pars, layers));
        }
        // For a trigger row the time also counts its acceptance: scoring the plan and, where
        // a move cap held a layer back, the plan without the cap (as the operator plans it).
        let t0 = Instant::now();
        let plan = planner.plan(&req)?;
        let next = match (&policy.trigger, triggered) {
            (Some(trigger), Some((pars, layers))) => {
                let unpaced = || -> Result<Placement> {
                    let mut free = req.clone();
                    free.max_moves = None;
                    Ok(planner.plan(&free)?.placement)
                };
                let next = accepted(
                    &deployed,
                    plan.placement,
                    latest,
                    &pars,
                    &layers,
                    trigger,
                    unpaced,
                )?;
                if next != deployed {
                    last_remap = now;
                }
                next
            }
            _ => plan.placement,
        };
        row.plan_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        scorer.push_step(&mut row, k, &deployed, &next)?;
        deployed = next;
    }
    Ok(row)
}

/// Label of the row whose every step is the next window's lower bound.
pub const BOUND_ROW: &str = "lower bound (each next window)";

/// Runs the rolling protocol on one shape with `steps` steps `stride` windows apart; the
/// peers' runs are scored after ours, before the lower bound.
pub fn run_rolling(
    bs: &BenchShape,
    opts: &BenchOptions,
    steps: usize,
    stride: usize,
    peer_plans: Vec<RollingPeerPlan>,
) -> Result<(Vec<RollingRow>, Vec<RollingOutcome>)> {
    let inputs = RollingInputs::generate(bs, opts, steps, stride)?;
    run_on(bs, &inputs, opts, peer_plans)
}

/// Runs every policy (and the peers' runs, then the lower bound) over `inputs`, synthetic or
/// recorded; `opts` gives the budgets of the `joint (max B/layer)` rows and the seed of the
/// next windows' draws (synthetic traces only).
pub fn run_on(
    bs: &BenchShape,
    inputs: &RollingInputs,
    opts: &BenchOptions,
    peer_plans: Vec<RollingPeerPlan>,
) -> Result<(Vec<RollingRow>, Vec<RollingOutcome>)> {
    let steps = inputs.steps;
    let scorer = RollingScorer::new(bs, inputs, opts);
    let shape = bs.shape;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();

    let mut keep = scorer.empty_row("keep the starting placement", 0);
    for k in 0..steps {
        scorer.push_step(&mut keep, k, &inputs.start, &inputs.start)?;
    }
    rows.push(keep);
    let plain = |label: &str, algorithm: &'static str, threads: usize| OurPolicy {
        label: label.to_string(),
        algorithm,
        threads,
        max_moves: None,
        trigger: None,
        min_improvement: None,
    };
    let mut policies = vec![
        plain("greedy", "greedy", 1),
        plain("multi-episode-lpt", "multi-episode-lpt", threads),
        plain("flashlb-like", "flashlb-like", threads),
        plain("joint", "joint", threads),
        OurPolicy {
            min_improvement: Some(0.0),
            ..plain("joint (min improvement 0)", "joint", threads)
        },
    ];
    let mut budgets: Vec<usize> = Vec::new();
    for f in &opts.incremental_fractions {
        let budget = ((shape.slots() as f64 * f).ceil() as usize).max(1);
        // On a small layer two fractions can round to one budget: one row, not two alike.
        if budgets.contains(&budget) {
            continue;
        }
        budgets.push(budget);
        policies.push(OurPolicy {
            max_moves: Some(budget),
            ..plain(&format!("joint (max {budget}/layer)"), "joint", threads)
        });
    }
    for &trigger in &opts.triggers {
        policies.push(OurPolicy {
            trigger: Some(trigger),
            max_moves: trigger.layer_moves(shape.slots()),
            ..plain(&trigger.label(), trigger.algorithm, threads)
        });
    }
    for policy in &policies {
        rows.push(run_ours(&scorer, bs, policy)?);
    }
    let mut outcomes = Vec::new();
    for plan in peer_plans {
        let outcome = score_rolling_peer(&scorer, bs, plan);
        if let RollingOutcome::Scored { row, .. } = &outcome {
            rows.push(row.as_ref().clone());
        }
        outcomes.push(outcome);
    }
    let mut bound = scorer.empty_row(BOUND_ROW, 0);
    for k in 0..steps {
        bound
            .next_par
            .push(mean_lower_bound(&shape, inputs.next_at(k)));
        bound.expected_par.push(match scorer.draws.get(k) {
            Some(draws) => mean_lower_bound_over(&shape, draws),
            None => f64::NAN,
        });
    }
    rows.push(bound);
    Ok((rows, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::standard_shapes;

    pub(super) fn mixtral() -> BenchShape {
        standard_shapes()
            .into_iter()
            .find(|s| s.name == "Mixtral-like")
            .expect("Mixtral-like is a standard shape")
    }

    pub(super) fn small_opts() -> BenchOptions {
        BenchOptions {
            history: 2,
            repeats: 1,
            incremental_fractions: vec![0.125],
            ..Default::default()
        }
    }

    #[test]
    fn steps_slide_over_the_trace() {
        let bs = mixtral();
        for (stride, total) in [(1, 2 * 2 + 3), (2, 2 * 2 + 2 * 2 + 1)] {
            let inputs = RollingInputs::generate(&bs, &small_opts(), 3, stride).unwrap();
            assert_eq!(inputs.windows.len(), total);
            let h1 = inputs.history_at(1).unwrap();
            let first = 2 + stride;
            assert_eq!(h1.windows(), &inputs.windows[first..first + 2]);
            assert_eq!(inputs.next_at(1), inputs.windows[first + 2].as_slice());
            assert_eq!(inputs.next_at(2), inputs.windows[total - 1].as_slice());
            // The peers see exactly the windows the steps plan on, not the last one scored.
            let peer = RollingPeerInputs::new(&bs, &inputs);
            assert_eq!(peer.windows.len(), 2 + 2 * stride);
            assert_eq!(
                peer.windows[stride..stride + 2],
                inputs.windows[first..first + 2]
            );
            assert_eq!(peer.windows[..], inputs.windows[2..total - 1]);
            assert_eq!(peer.previous, inputs.start.phy2log);
        }
        assert!(RollingInputs::generate(&bs, &small_opts(), 0, 1).is_err());
        assert!(RollingInputs::generate(&bs, &small_opts(), MAX_STEPS + 1, 1).is_err());
        assert!(RollingInputs::generate(&bs, &small_opts(), 2, 0).is_err());
    }

    #[test]
    fn every_policy_is_scored_on_every_step_and_moves_count_from_its_own_placement() {
        let bs = mixtral();
        let opts = small_opts();
        let steps = 3;
        let (rows, _) = run_rolling(&bs, &opts, steps, 2, Vec::new()).unwrap();
        for r in &rows {
            assert_eq!(r.next_par.len(), steps, "{}", r.algorithm);
            assert_eq!(r.expected_par.len(), steps, "{}", r.algorithm);
        }
        let of = |n: &str| rows.iter().find(|r| r.algorithm == n).unwrap();
        assert_eq!(of("keep the starting placement").moved_total(), 0);
        // Replaying joint's own loop by hand gives the same PARs and moves.
        let inputs = RollingInputs::generate(&bs, &opts, steps, 2).unwrap();
        let mut deployed = inputs.start.clone();
        let joint = of("joint");
        for k in 0..steps {
            let h = inputs.history_at(k).unwrap();
            let p = planner_by_name("joint")
                .unwrap()
                .plan(
                    &PlanRequest::new(bs.shape, &h)
                        .previous(&deployed)
                        .threads(2),
                )
                .unwrap()
                .placement;
            assert_eq!(
                joint.next_par[k],
                score(&p, inputs.next_at(k)).unwrap().mean
            );
            assert_eq!(
                joint.slots_moved[k],
                migration_cost(&deployed, &p, 0).unwrap().slots
            );
            deployed = p;
        }
        // A budget holds at every step, not only over the run.
        let budgeted = rows
            .iter()
            .find(|r| r.algorithm.starts_with("joint (max"))
            .unwrap();
        let per_layer_cap = (bs.shape.slots() as f64 * 0.125).ceil() as usize;
        assert!(
            budgeted
                .slots_moved
                .iter()
                .all(|&m| m <= per_layer_cap * bs.num_layers)
        );
        let bound = of(BOUND_ROW);
        for r in rows.iter().filter(|r| r.algorithm != BOUND_ROW) {
            for k in 0..steps {
                assert!(r.next_par[k] >= bound.next_par[k] - 1e-9, "{}", r.algorithm);
            }
        }
    }

    #[test]
    fn a_synthetic_trace_replayed_as_recorded_gives_the_same_run_without_expectations() {
        let bs = mixtral();
        let opts = small_opts();
        let synthetic = RollingInputs::generate(&bs, &opts, 3, 2).unwrap();
        let trace = LoadHistory::new(synthetic.windows.clone()).unwrap();
        let recorded = RollingInputs::recorded(&bs, &trace, 2, 2, MAX_STEPS, None).unwrap();
        assert_eq!((recorded.steps, recorded.offset), (3, 2));
        assert_eq!(recorded.start, synthetic.start);
        let (ours, _) = run_on(&bs, &synthetic, &opts, Vec::new()).unwrap();
        let (replayed, _) = run_on(&bs, &recorded, &opts, Vec::new()).unwrap();
        assert_eq!(ours.len(), replayed.len());
        for (a, b) in ours.iter().zip(&replayed) {
            assert_eq!(a.algorithm, b.algorithm);
            assert_eq!(a.next_par, b.next_par, "{}", a.algorithm);
            assert_eq!(a.slots_moved, b.slots_moved, "{}", a.algorithm);
            assert!(a.expected_par.iter().all(|x| x.is_finite()));
            assert!(b.expected_par.iter().all(|x| x.is_nan()), "{}", b.algorithm);
        }
        let summary = summary(&replayed, &[]);
        assert!(!summary.contains("NaN"), "{summary}");
        assert!(markdown_table(&replayed).contains("| - |"));
    }

    #[test]
    fn a_recorded_replay_starts_from_the_placement_given_and_keeps_the_latest_steps() {
        let bs = mixtral();
        let synthetic = RollingInputs::generate(&bs, &small_opts(), 4, 1).unwrap();
        // 2 * 2 + 3 + 1 = 8 windows.
        let trace = LoadHistory::new(synthetic.windows.clone()).unwrap();
        let start = synthetic.start.clone();
        // From a placement in use, step 0 plans on windows 0..2: 8 - 2 = 6 steps fit.
        let given =
            RollingInputs::recorded(&bs, &trace, 2, 1, MAX_STEPS, Some(start.clone())).unwrap();
        assert_eq!((given.steps, given.offset), (6, 0));
        assert_eq!(
            given.history_at(0).unwrap().windows(),
            &trace.windows()[..2]
        );
        assert_eq!(given.next_at(5), trace.windows()[7].as_slice());
        // Keeping the latest 2 steps: they plan on windows 4..6 and 5..7.
        let latest = RollingInputs::recorded(&bs, &trace, 2, 1, 2, Some(start.clone())).unwrap();
        assert_eq!((latest.steps, latest.offset), (2, 4));
        assert_eq!(latest.start, start);
        // Without a placement in use, joint's plan of the two windows before the first step kept.
        let planned = RollingInputs::recorded(&bs, &trace, 2, 1, 2, None).unwrap();
        assert_eq!((planned.steps, planned.offset), (2, 4));
        let older = LoadHistory::new(trace.windows()[2..4].to_vec()).unwrap();
        assert_eq!(planned.start, starting_placement(&bs, &older).unwrap());
        // A stride of 3 from window 2: steps plan on 2..4 and 5..7.
        let strided = RollingInputs::recorded(&bs, &trace, 2, 3, MAX_STEPS, None).unwrap();
        assert_eq!((strided.steps, strided.offset), (2, 2));
        assert_eq!(strided.next_at(1), trace.windows()[7].as_slice());
    }

    #[test]
    fn a_recorded_replay_refuses_what_it_cannot_run() {
        let bs = mixtral();
        let synthetic = RollingInputs::generate(&bs, &small_opts(), 1, 1).unwrap();
        let five = LoadHistory::new(synthetic.windows[..5].to_vec()).unwrap();
        let err = |r: Result<RollingInputs>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let short = err(RollingInputs::recorded(&bs, &five, 3, 1, MAX_STEPS, None));
        assert!(
            short.contains("needs at least 7")
                && short.contains("with the placement in use given, 4"),
            "{short}"
        );
        assert!(
            RollingInputs::recorded(&bs, &five, 3, 1, MAX_STEPS, Some(synthetic.start.clone()))
                .is_ok()
        );
        assert!(
            err(RollingInputs::recorded(&bs, &five, 0, 1, MAX_STEPS, None)).contains("0 windows")
        );
        assert!(err(RollingInputs::recorded(&bs, &five, 1, 0, MAX_STEPS, None)).contains("stride"));
        assert!(
            err(RollingInputs::recorded(&bs, &five, 1, 1, 0, None)).contains("at most 0 steps")
        );
        let mut other = bs.shape;
        other.num_ranks = bs.shape.num_ranks / 2;
        let narrow = BenchShape {
            shape: other,
            ..mixtral()
        };
        assert!(
            err(RollingInputs::recorded(
                &narrow,
                &five,
                1,
                1,
                MAX_STEPS,
                Some(synthetic.start.clone())
            ))
            .contains("ranks")
        );
    }

    #[test]
    fn the_trigger_picks_layers_as_the_operator_does() {
        // Nothing until one layer is above the threshold, then every layer above threshold -
        // hysteresis, worst first (ties by index), capped.
        let t = OPERATOR_DEFAULTS;
        assert!(t.layers(&[1.19, 1.2, 1.0]).is_empty());
        assert_eq!(t.layers(&[1.16, 1.21, 1.0, 1.15, 1.16]), vec![1, 0, 4, 3]);
        let capped = Trigger {
            max_layers: Some(2),
            ..t
        };
        assert_eq!(capped.layers(&[1.16, 1.21, 1.0, 1.15, 1.16]), vec![1, 0]);
        let all: Vec<f64> = (0..20).map(|l| 1.3 + l as f64 / 100.0).collect();
        assert_eq!(t.layers(&all).len(), 8);
    }

    #[test]
    fn a_trigger_replays_its_planner_and_budgets_and_waits_out_its_cooldown() {
        let bs = mixtral();
        let eager = Trigger {
            threshold: 1.01,
            hysteresis: 0.0,
            max_layers: None,
            ..OPERATOR_DEFAULTS
        };
        let cooled = Trigger {
            cooldown_seconds: Some(250.0),
            ..eager
        };
        let budgeted = Trigger {
            algorithm: "incremental",
            max_moves: Some(2),
            max_slots_per_remap: Some(3),
            ..eager
        };
        let unbudgeted = Trigger {
            max_slots_per_remap: None,
            ..budgeted
        };
        let opts = BenchOptions {
            triggers: vec![eager, cooled, budgeted, unbudgeted],
            ..small_opts()
        };
        let steps = 8;
        let inputs = RollingInputs::generate(&bs, &opts, steps, 1).unwrap();
        // A window closes every 100 s: a remap blocks the next two steps.
        let ends: Vec<f64> = (0..inputs.windows.len())
            .map(|w| 100.0 * w as f64)
            .collect();
        let short = RollingInputs::generate(&bs, &opts, steps, 1).unwrap();
        assert!(short.with_window_ends(vec![0.0]).is_err());
        let inputs = inputs.with_window_ends(ends).unwrap();
        assert_eq!(
            inputs.decided_at(0),
            Some(100.0 * (inputs.offset + 1) as f64)
        );
        let (rows, _) = run_on(&bs, &inputs, &opts, Vec::new()).unwrap();
        let of = |t: &Trigger| rows.iter().find(|r| r.algorithm == t.label()).unwrap();
        let remapped = |t: &Trigger| -> Vec<usize> {
            (0..steps)
                .filter(|&k| of(t).layers_changed[k] > 0)
                .collect()
        };
        // Eager remaps every step. With the cooldown, 250 s after a remap at step k, steps
        // k + 1 (100 s) and k + 2 (200 s) hold.
        assert_eq!(
            remapped(&eager).len(),
            steps,
            "{:?}",
            of(&eager).layers_changed
        );
        assert_eq!(remapped(&cooled), vec![0, 3, 6]);
        // The budgets: at most 3 slots a step (each layer's plan held to 2).
        let g = of(&budgeted);
        assert!(g.algorithm.starts_with("incremental, operator trigger"));
        assert!(g.slots_moved.iter().all(|&m| m <= 3), "{:?}", g.slots_moved);
        assert!(g.slots_moved.iter().any(|&m| m > 0));
        // Without the byte budget the same planner moves more in a step.
        assert!(of(&unbudgeted).slots_moved.iter().any(|&m| m > 3));
    }
}
