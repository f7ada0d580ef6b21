//! Planning algorithms behind one trait, and the layer-selection policy.
//!
//! Every algorithm plans each selected layer independently (layers run in parallel threads;
//! results do not depend on the thread count). The common driver then:
//! * with a previous placement, re-labels the new ranks so that unchanged experts keep their
//!   slots (`joint`, `incremental`; `greedy` stays the faithful baseline and does not);
//! * enforces `max_moves` (slots changed per layer): `joint` keeps the better of two plans
//!   within the budget, the local search from the previous placement (as `incremental`) and
//!   its own fresh plan walked back to the budget revert by revert (cheapest in F per slot
//!   first) and searched on from there; with a budget it weighs recent windows as
//!   `incremental` does. `greedy` keeps the previous layer;
//! * keeps the previous layer unless the new one lowers the episode objective by at least
//!   `min_improvement` (relative), so a plan never moves weights for nothing; `joint` also
//!   undoes individual changes as long as its objective stays within `min_improvement / 2`.

mod acceptance;
mod blossom;
mod contents;
mod cover;
mod episodes;
mod exact;
mod greedy;
mod joint;
mod local_search;
mod lpt;
mod matching;
mod neighbourhood;
mod pair_caps;
mod pair_search;
mod pairs;
mod perfect;
mod polish;
mod problem;
mod prove;
mod ranks;
mod sieves;

use serde::{Deserialize, Serialize};

use crate::error::{EplbError, Result};
use crate::initial::{InitialStrategy, initial_row};
use crate::load::LoadHistory;
use crate::metrics::score_history;
use crate::placement::Placement;
use crate::shape::Shape;

pub use acceptance::{
    PlannedLayer, accept_layers, accept_paced, layer_move_cap, refused_improvement, within_budget,
    worst_first,
};
use local_search::State;
use problem::{Problem, slots_changed};

/// The algorithm `moectl plan` and the operator use when none is named.
pub const DEFAULT_ALGORITHM: &str = "joint";
/// Default episode recency of `joint` (and `flashlb-like`): on the synthetic drift traces
/// 0.5-0.6 gave the lowest next-window PAR, uniform weights (1.0) were 0.01-0.02 worse.
pub const DEFAULT_RECENCY: f64 = 0.6;
/// Default episode recency of `incremental`, and of `joint` given `max_moves` and a previous
/// placement: with few moves allowed, spending them on what is hot now paid off (0.35 beat 0.6
/// on 23 of 24 shape/seed/budget cases of the benchmark; for budgeted `joint`, 0.6 gave a
/// worse next-window PAR than `incremental` on Mixtral-like, 0.35 a better one).
pub const DEFAULT_RECENCY_INCREMENTAL: f64 = 0.35;
/// Names accepted by [`planner_by_name`].
pub const ALGORITHMS: [&str; 3] = ["greedy", "joint", "incremental"];
/// The benchmark's baselines, also accepted by [`planner_by_name`].
pub const BASELINES: [&str; 3] = ["greedy-global", "flashlb-like", "multi-episode-lpt"];

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    pub shape: Shape,
    /// Logical loads, oldest window first; each window is one episode of the objective.
    pub history: &'a LoadHistory,
    /// The placement in use now, if any.
    pub previous: Option<&'a Placement>,
    /// At most this many slots may change per layer (`incremental` defaults to 1/8 of the
    /// slots when unset).
    pub max_moves: Option<usize>,
    /// With a previous placement: only layers whose current PAR (mean over the history's
    /// windows) is above this are re-planned (see [`select_layers`]).
    pub threshold: Option<f64>,
    /// Hysteresis for [`select_layers`], used with `previously_imbalanced`.
    pub hysteresis: f64,
    /// Layers flagged imbalanced by the previous selection round (hysteresis state).
    pub previously_imbalanced: Option<&'a [bool]>,
    /// Restrict planning to these layers (the others keep the previous placement).
    pub layers: Option<Vec<usize>>,
    /// A re-planned layer replaces the previous one only if its objective is lower by at
    /// least this fraction (default 0.005).
    pub min_improvement: f64,
    /// Weight ratio between consecutive episodes: each window counts `1/recency` times its
    /// predecessor (1 = all windows equal). `None`: the algorithm's default
    /// ([`DEFAULT_RECENCY`], or [`DEFAULT_RECENCY_INCREMENTAL`] for `incremental`).
    pub recency: Option<f64>,
    /// Worker threads (0 = available parallelism).
    pub threads: usize,
    /// With several nodes, `joint` may raise its objective by up to this fraction to keep more
    /// tokens on their node (replicas of one expert spread over nodes; see [`crate::traffic`]).
    /// `None`: `min_improvement / 2`.
    pub node_slack: Option<f64>,
}

impl<'a> PlanRequest<'a> {
    pub fn new(shape: Shape, history: &'a LoadHistory) -> PlanRequest<'a> {
        PlanRequest {
            shape,
            history,
            previous: None,
            max_moves: None,
            threshold: None,
            hysteresis: 0.0,
            previously_imbalanced: None,
            layers: None,
            min_improvement: 0.005,
            recency: None,
            threads: 0,
            node_slack: None,
        }
    }
    pub fn previous(mut self, p: &'a Placement) -> Self {
        self.previous = Some(p);
        self
    }
    pub fn max_moves(mut self, m: usize) -> Self {
        self.max_moves = Some(m);
        self
    }
    pub fn threshold(mut self, t: f64) -> Self {
        self.threshold = Some(t);
        self
    }
    pub fn hysteresis(mut self, h: f64) -> Self {
        self.hysteresis = h;
        self
    }
    pub fn layers(mut self, l: Vec<usize>) -> Self {
        self.layers = Some(l);
        self
    }
    pub fn threads(mut self, t: usize) -> Self {
        self.threads = t;
        self
    }
    pub fn node_slack(mut self, s: f64) -> Self {
        self.node_slack = Some(s);
        self
    }
}

/// Per-layer outcome of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub layer: usize,
    /// Selected for re-planning (by `layers`, the threshold, or because there was no previous).
    pub considered: bool,
    /// The layer's placement differs from the previous one.
    pub changed: bool,
    /// PAR on the planning load (mean over the history's windows) under the new placement.
    pub par: f64,
    /// The same for the previous placement, when there is one.
    pub previous_par: Option<f64>,
    /// The episode-weighted objective (weighted mean PAR over windows) of the new placement.
    pub objective: f64,
    /// A lower bound on that objective over all placements of the shape (computed by
    /// `joint` for the layers it planned).
    pub lower_bound: Option<f64>,
    /// The objective is proven optimal (exact search finished).
    pub optimal: bool,
    /// The objective is proven within this relative distance of the optimum (0 when optimal):
    /// set on the layers `joint`'s exact search ran on (small layers), from the lower bound its
    /// full proof or its bisection probes established (`planner/prove.rs`).
    #[serde(default)]
    pub proven_gap: Option<f64>,
    /// Slots whose expert changed versus the previous placement.
    pub slots_moved: usize,
}

/// The result of planning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub algorithm: String,
    pub placement: Placement,
    pub layers: Vec<LayerPlan>,
    pub changed_layers: Vec<usize>,
    pub slots_moved: usize,
}

impl Plan {
    /// Predicted PAR per layer (mean over the history's windows).
    pub fn predicted_par(&self) -> Vec<f64> {
        self.layers.iter().map(|l| l.par).collect()
    }
    pub fn mean_par(&self) -> f64 {
        self.layers.iter().map(|l| l.par).sum::<f64>() / self.layers.len().max(1) as f64
    }
    pub fn worst_par(&self) -> f64 {
        self.layers.iter().map(|l| l.par).fold(1.0, f64::max)
    }
    /// Mean relative gap `objective / lower_bound - 1` over the layers with a bound.
    pub fn mean_gap(&self) -> f64 {
        let gaps: Vec<f64> = self
            .layers
            .iter()
            .filter_map(|l| l.lower_bound.map(|b| l.objective / b.max(1e-12) - 1.0))
            .collect();
        gaps.iter().sum::<f64>() / gaps.len().max(1) as f64
    }

    /// Largest relative gap `objective / lower_bound - 1` over the layers with a bound.
    pub fn max_gap(&self) -> f64 {
        self.layers
            .iter()
            .filter_map(|l| l.lower_bound.map(|b| l.objective / b.max(1e-12) - 1.0))
            .fold(0.0, f64::max)
    }
}

/// A planning algorithm.
pub trait Planner: Send + Sync {
    fn name(&self) -> &'static str;
    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    Greedy,
    /// Greedy without the hierarchical variant (DeepSeek's choice for decode).
    GreedyGlobal,
    /// Joint's construction step alone (no local search, no exact search).
    JointConstruct,
    Joint,
    Incremental,
    /// Multi-episode LPT: water-filling on the window average, then per-episode-peak packing.
    MultiEpisodeLpt,
}

struct AlgoPlanner(Algo);

impl Planner for AlgoPlanner {
    fn name(&self) -> &'static str {
        match self.0 {
            Algo::Greedy => "greedy",
            Algo::GreedyGlobal => "greedy-global",
            Algo::JointConstruct => "flashlb-like",
            Algo::Joint => "joint",
            Algo::Incremental => "incremental",
            Algo::MultiEpisodeLpt => "multi-episode-lpt",
        }
    }
    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan> {
        run(req, self.0, self.name())
    }
}

/// `greedy`, `joint` (the default) or `incremental`. Two baselines for comparisons:
/// `greedy-global` (greedy without its hierarchical node/group variant, stronger on shapes with
/// one group per node) and `flashlb-like` (joint's construction alone: episode-weighted min-max
/// replication and episode-aware packing, matched to the previous ranks and cherry-picked like
/// joint, but without local search or exact search; our reading of FlashLB's published design,
/// not its code), and `multi-episode-lpt` (window-average water-filling, then each replica,
/// heaviest first, to the rank whose largest per-episode load after adding it is smallest;
/// matched to the previous ranks and cherry-picked like joint).
pub fn planner_by_name(name: &str) -> Result<Box<dyn Planner>> {
    let algo = match name {
        "greedy" => Algo::Greedy,
        "greedy-global" => Algo::GreedyGlobal,
        "flashlb-like" => Algo::JointConstruct,
        "joint" => Algo::Joint,
        "incremental" => Algo::Incremental,
        "multi-episode-lpt" => Algo::MultiEpisodeLpt,
        other => return Err(EplbError::UnknownAlgorithm(other.to_string())),
    };
    Ok(Box::new(AlgoPlanner(algo)))
}

/// A lower bound on the PAR any placement of `shape` can reach under one layer's `load`
/// (the larger of 1 and the largest replica load after water-filling the replica counts).
pub fn par_lower_bound(shape: &Shape, load: &[f64]) -> f64 {
    Problem::new(
        &[load],
        shape.num_ranks,
        shape.slots(),
        1.0,
        shape.max_replicas(),
    )
    .lower_bound()
}

/// Result of [`select_layers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSelection {
    /// Layers to re-plan, ascending.
    pub layers: Vec<usize>,
    /// Per layer, the imbalance flag to pass to the next call.
    pub imbalanced: Vec<bool>,
}

/// Threshold with hysteresis (a Schmitt trigger per layer): a layer becomes imbalanced when
/// its PAR exceeds `threshold`, and stays imbalanced (is selected again) until its PAR falls
/// to `threshold - hysteresis` or below. Without previous flags this is a plain threshold.
pub fn select_layers(
    pars: &[f64],
    threshold: f64,
    hysteresis: f64,
    previously_imbalanced: Option<&[bool]>,
) -> LayerSelection {
    let imbalanced: Vec<bool> = pars
        .iter()
        .enumerate()
        .map(|(l, &p)| {
            let was = previously_imbalanced
                .and_then(|v| v.get(l).copied())
                .unwrap_or(false);
            p > threshold || (was && p > threshold - hysteresis)
        })
        .collect();
    LayerSelection {
        layers: (0..pars.len()).filter(|&l| imbalanced[l]).collect(),
        imbalanced,
    }
}

fn validate(req: &PlanRequest<'_>, algo: Algo) -> Result<()> {
    let shape = &req.shape;
    shape.validate()?;
    let h = req.history;
    if h.num_experts() != shape.num_experts {
        return Err(EplbError::Mismatch(format!(
            "the load has {} experts per layer, the shape has {}",
            h.num_experts(),
            shape.num_experts
        )));
    }
    if let Some(prev) = req.previous {
        prev.validate()?;
        prev.check_shape(shape)?;
        if prev.num_layers != h.num_layers() {
            return Err(EplbError::Mismatch(format!(
                "the previous placement has {} layers, the load has {}",
                prev.num_layers,
                h.num_layers()
            )));
        }
    } else if algo == Algo::Incremental {
        return Err(EplbError::Request(
            "incremental needs the previous placement".into(),
        ));
    }
    if let Some(t) = req.threshold
        && !(t.is_finite() && t >= 1.0)
    {
        return Err(EplbError::Request(format!(
            "threshold {t} must be a PAR of at least 1"
        )));
    }
    if !(req.hysteresis.is_finite() && req.hysteresis >= 0.0) {
        return Err(EplbError::Request(format!(
            "hysteresis {} must be non-negative",
            req.hysteresis
        )));
    }
    if let Some(r) = req.recency
        && !(r.is_finite() && r > 0.0 && r <= 1.0)
    {
        return Err(EplbError::Request(format!("recency {r} must be in (0, 1]")));
    }
    if let Some(s) = req.node_slack
        && !(s.is_finite() && s >= 0.0)
    {
        return Err(EplbError::Request(format!(
            "node slack {s} must be a non-negative fraction"
        )));
    }
    if !(req.min_improvement.is_finite() && req.min_improvement >= 0.0) {
        return Err(EplbError::Request(
            "min_improvement must be non-negative".into(),
        ));
    }
    if let Some(ls) = &req.layers
        && let Some(&bad) = ls.iter().find(|&&l| l >= h.num_layers())
    {
        return Err(EplbError::Request(format!(
            "layer {bad} out of range (the load has {} layers)",
            h.num_layers()
        )));
    }
    Ok(())
}

fn recency_for(req: &PlanRequest<'_>, algo: Algo) -> f64 {
    req.recency.unwrap_or(match algo {
        Algo::Incremental => DEFAULT_RECENCY_INCREMENTAL,
        Algo::Joint if req.max_moves.is_some() && req.previous.is_some() => {
            DEFAULT_RECENCY_INCREMENTAL
        }
        _ => DEFAULT_RECENCY,
    })
}

struct LayerOut {
    row: Vec<usize>,
    optimal: bool,
    objective: f64,
    lower_bound: Option<f64>,
    proven_gap: Option<f64>,
}

fn plan_one(
    req: &PlanRequest<'_>,
    algo: Algo,
    layer: usize,
    prev_row: Option<&[usize]>,
) -> LayerOut {
    let shape = &req.shape;
    let rows = req.history.layer(layer);
    let p = Problem::new(
        &rows,
        shape.num_ranks,
        shape.slots(),
        recency_for(req, algo),
        shape.max_replicas(),
    );
    // No move allowed: the previous layer is the plan, without searches whose result the
    // budget would discard.
    if let (Some(prev), Some(0)) = (prev_row, req.max_moves)
        && matches!(algo, Algo::Joint | Algo::Incremental)
    {
        let objective = p.episode_par(prev);
        return LayerOut {
            row: prev.to_vec(),
            optimal: false,
            objective,
            lower_bound: (algo == Algo::Joint).then(|| p.lower_bound().min(objective)),
            proven_gap: None,
        };
    }
    let default_budget = shape.slots().div_ceil(8).max(1);
    let mut search_bound: Option<f64> = None;
    let (mut row, mut optimal) = match algo {
        Algo::Greedy => (greedy::greedy_row(&p.raw_sum, shape, true), false),
        Algo::GreedyGlobal => (greedy::greedy_row(&p.raw_sum, shape, false), false),
        Algo::JointConstruct => (joint::construct_only(&p), false),
        Algo::MultiEpisodeLpt => (lpt::lpt_row(&p), false),
        Algo::Joint => {
            let r = joint::plan_layer(&p, shape, prev_row.is_some());
            // A finished search bounds the optimum from below, whatever row is kept later.
            search_bound = r.proven_gap.map(|t| p.episode_par(&r.row) / (1.0 + t));
            (r.row, r.optimal)
        }
        Algo::Incremental => {
            let prev = prev_row.unwrap_or(&[]);
            let budget = req.max_moves.unwrap_or(default_budget);
            (search_within(&p, prev.to_vec(), prev, budget), false)
        }
    };
    // Node-aware polish (joint, several nodes): spread replicas over nodes for at most
    // `node_slack` (default `min_improvement / 2`) of F.
    let spread = |row: Vec<usize>, optimal: &mut bool| -> Vec<usize> {
        if algo != Algo::Joint || shape.num_nodes <= 1 {
            return row;
        }
        let before = p.episode_par(&row);
        let out = polish::spread_over_nodes(
            &p,
            row,
            shape.num_nodes,
            before * (1.0 + req.node_slack.unwrap_or(req.min_improvement / 2.0)),
        );
        *optimal = *optimal && p.episode_par(&out) <= before + 1e-12;
        out
    };
    if prev_row.is_none() {
        row = spread(row, &mut optimal);
    }
    if let Some(prev) = prev_row {
        if matches!(algo, Algo::JointConstruct | Algo::MultiEpisodeLpt) {
            row = matching::align(&row, prev, shape.num_ranks, None);
        }
        if algo == Algo::Joint {
            row = matching::align(&row, prev, shape.num_ranks, None);
            // Warm start: the previous layer improved in place. Taken when it is within
            // `min_improvement` of the fresh plan, because it moves far fewer slots.
            let mut warm = State::new(&p, prev.to_vec());
            warm.improve(None, local_search::MAX_ITERS);
            let f_warm = warm.objective().0;
            let f_fresh = p.episode_par(&row);
            if f_warm <= f_fresh * (1.0 + req.min_improvement) {
                let moved_warm = slots_changed(&warm.row, prev);
                let moved_fresh = slots_changed(&row, prev);
                if moved_warm < moved_fresh || f_warm < f_fresh {
                    row = warm.row;
                    optimal = optimal && f_warm <= f_fresh;
                }
            }
        }
        if algo == Algo::Joint {
            // Undo changes worth less than half of `min_improvement` in total.
            let before = p.episode_par(&row);
            row = polish::revert_towards(&p, row, prev, req.min_improvement / 2.0);
            optimal = optimal && p.episode_par(&row) <= before + 1e-12;
            row = spread(row, &mut optimal);
        }
        let moved = slots_changed(&row, prev);
        if let Some(m) = req.max_moves
            && moved > m
        {
            match algo {
                Algo::Joint => {
                    // Two ways into the budget, the better kept: the search from the previous
                    // placement (as `incremental`), and the fresh plan walked back to the
                    // budget and then searched within it.
                    let from_prev = search_within(&p, prev.to_vec(), prev, m);
                    row = match polish::revert_within(&p, row, prev, m) {
                        Some(walked) => {
                            let walked = search_within(&p, walked, prev, m);
                            let (fw, fp) = (p.episode_par(&walked), p.episode_par(&from_prev));
                            if fw < fp - 1e-12 { walked } else { from_prev }
                        }
                        None => from_prev,
                    };
                    optimal = false;
                }
                _ => {
                    row = prev.to_vec();
                    optimal = false;
                }
            }
        }
        // greedy stays the faithful baseline: it replaces whatever it changed.
        if !matches!(algo, Algo::Greedy | Algo::GreedyGlobal) {
            let f_new = p.episode_par(&row);
            let f_old = p.episode_par(prev);
            if f_new > f_old * (1.0 - req.min_improvement) {
                row = prev.to_vec();
                optimal = optimal && f_old <= f_new;
            }
        }
    }
    let objective = p.episode_par(&row);
    if p.empty {
        // No load in any window: every placement is as good as any other.
        optimal = true;
        search_bound = Some(objective);
    }
    LayerOut {
        objective,
        lower_bound: (algo == Algo::Joint).then(|| {
            p.lower_bound()
                .max(search_bound.unwrap_or(0.0))
                .min(objective)
        }),
        proven_gap: search_bound.map(|b| (objective / b - 1.0).max(0.0)),
        row,
        optimal,
    }
}

/// The budgeted local search from `start`: moves ranked by F gained per slot changed, never
/// more than `max_moves` slots differing from `prev` (`incremental`, and `joint` under a
/// budget).
fn search_within(p: &Problem, start: Vec<usize>, prev: &[usize], max_moves: usize) -> Vec<usize> {
    let mut st = State::new(p, start);
    st.improve(Some((prev, max_moves)), 4 * max_moves + 8);
    st.row
}

fn run(req: &PlanRequest<'_>, algo: Algo, name: &str) -> Result<Plan> {
    validate(req, algo)?;
    let shape = &req.shape;
    let h = req.history;
    let nl = h.num_layers();
    let prev_score = match req.previous {
        Some(p) => Some(score_history(p, h)?),
        None => None,
    };
    let mut considered = vec![true; nl];
    if let Some(ls) = &req.layers {
        considered = vec![false; nl];
        for &l in ls {
            considered[l] = true;
        }
    }
    if let (Some(t), Some(ps)) = (req.threshold, &prev_score) {
        let sel = select_layers(&ps.per_layer, t, req.hysteresis, req.previously_imbalanced);
        for (c, s) in considered.iter_mut().zip(&sel.imbalanced) {
            *c = *c && *s;
        }
    }
    if req.previous.is_none() {
        // Without a placement in use, every layer needs one.
        considered = vec![true; nl];
    }
    let todo: Vec<usize> = (0..nl).filter(|&l| considered[l]).collect();
    let threads = if req.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        req.threads
    }
    .clamp(1, todo.len().max(1));
    let prev_row = |l: usize| req.previous.map(|p| p.phy2log[l].as_slice());
    let mut outs: Vec<Option<LayerOut>> = (0..nl).map(|_| None).collect();
    if threads <= 1 {
        for &l in &todo {
            outs[l] = Some(plan_one(req, algo, l, prev_row(l)));
        }
    } else {
        // Each thread takes the next layer not yet taken: a layer's cost varies by orders of
        // magnitude (an exact search that closes at once or spends its whole node budget), so
        // fixed shares would leave threads idle while one works through its expensive layers.
        // Every layer is planned the same way whichever thread takes it.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Vec<(usize, LayerOut)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (todo, next) = (&todo, &next);
                    sc.spawn(move || {
                        let mut done = Vec::new();
                        while let Some(&l) =
                            todo.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        {
                            done.push((l, plan_one(req, algo, l, prev_row(l))));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (l, o) in results.into_iter().flatten() {
            outs[l] = Some(o);
        }
    }
    let mut phy2log = Vec::with_capacity(nl);
    for (l, out) in outs.iter().enumerate() {
        match (out, req.previous) {
            (Some(o), _) => phy2log.push(o.row.clone()),
            (None, Some(p)) => phy2log.push(p.phy2log[l].clone()),
            (None, None) => phy2log.push(initial_row(InitialStrategy::Linear, shape)),
        }
    }
    if todo.len() != outs.iter().filter(|o| o.is_some()).count() {
        return Err(EplbError::Request("a planning thread failed".into()));
    }
    let placement =
        Placement::from_phy2log(shape.num_experts, shape.num_ranks, shape.num_nodes, phy2log)?;
    let score = score_history(&placement, h)?;
    let mut layers = Vec::with_capacity(nl);
    let mut changed_layers = Vec::new();
    let mut slots_moved = 0;
    for l in 0..nl {
        let moved = req.previous.map_or(shape.slots(), |p| {
            p.phy2log[l]
                .iter()
                .zip(&placement.phy2log[l])
                .filter(|(a, b)| a != b)
                .count()
        });
        let changed = req.previous.is_none() || moved > 0;
        if changed {
            changed_layers.push(l);
        }
        if req.previous.is_some() {
            slots_moved += moved;
        }
        let (objective, lower_bound, optimal, proven_gap) = match &outs[l] {
            Some(o) => (o.objective, o.lower_bound, o.optimal, o.proven_gap),
            None => {
                let rows = h.layer(l);
                let p = Problem::new(
                    &rows,
                    shape.num_ranks,
                    shape.slots(),
                    recency_for(req, algo),
                    shape.max_replicas(),
                );
                (p.episode_par(&placement.phy2log[l]), None, false, None)
            }
        };
        layers.push(LayerPlan {
            layer: l,
            considered: considered[l],
            changed,
            par: score.per_layer[l],
            previous_par: prev_score.as_ref().map(|s| s.per_layer[l]),
            objective,
            lower_bound,
            optimal,
            proven_gap,
            slots_moved: if req.previous.is_some() { moved } else { 0 },
        });
    }
    Ok(Plan {
        algorithm: name.to_string(),
        placement,
        layers,
        changed_layers,
        slots_moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_with_hysteresis() {
        let s = select_layers(&[1.05, 1.3, 1.15], 1.2, 0.1, None);
        assert_eq!(s.layers, vec![1]);
        let s2 = select_layers(&[1.05, 1.15, 1.15], 1.2, 0.1, Some(&s.imbalanced));
        assert_eq!(s2.layers, vec![1]);
        let s3 = select_layers(&[1.05, 1.09, 1.15], 1.2, 0.1, Some(&s2.imbalanced));
        assert!(s3.layers.is_empty());
    }

    /// A layer without load (all zeros, or counts so small that normalising them overflows)
    /// is planned as balanced and proven optimal: every placement is as good.
    #[test]
    fn a_layer_without_load_is_proven_optimal() {
        let shape = Shape::new(4, 4, 4, 1, 1).unwrap();
        for counts in [vec![0.0; 4], vec![1e-320, 0.0, 0.0, 0.0]] {
            let history = crate::LoadHistory::new(vec![vec![counts.clone()]]).unwrap();
            for name in ["joint", "greedy"] {
                let plan = planner_by_name(name)
                    .unwrap()
                    .plan(&PlanRequest::new(shape, &history))
                    .unwrap();
                let l = &plan.layers[0];
                assert_eq!(l.objective, 1.0, "{name} {counts:?}");
                assert!(l.optimal, "{name} {counts:?}");
                assert_eq!(l.proven_gap, Some(0.0), "{name} {counts:?}");
            }
        }
    }

    #[test]
    fn unknown_algorithm_is_an_error() {
        assert!(matches!(
            planner_by_name("magic"),
            Err(EplbError::UnknownAlgorithm(_))
        ));
        for n in ALGORITHMS {
            assert_eq!(planner_by_name(n).unwrap().name(), n);
        }
        // The message lists every name planner_by_name takes.
        let e = planner_by_name("magic").err().unwrap().to_string();
        for n in ALGORITHMS.iter().chain(&BASELINES) {
            assert!(e.contains(n), "{n} missing from: {e}");
            assert_eq!(planner_by_name(n).unwrap().name(), *n);
        }
    }
}
