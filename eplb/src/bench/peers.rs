//! The peers' own EPLB policies in the benchmark: vLLM's, SGLang's and vllm-ascend's code, as
//! they ship it, planning on the very inputs our algorithms plan on.
//!
//! The peers are Python, so the run goes in three steps (`scripts/bench-peers` drives them):
//! `moectl bench --export DIR` writes each shape's [`PeerInputs`] (the history every algorithm
//! plans on and the placement in use), `eplb/peers/run_peers.py` runs each peer's entry point on
//! them and writes one [`PeerPlan`] per peer, and `moectl bench --peers DIR` regenerates the same
//! run (it is deterministic in the seed and the history) and scores those plans with
//! [`Scorer::row`], beside our rows.
//!
//! A peer's placement may hold one expert twice on one rank: vLLM's and SGLang's packing allow
//! it and their engines serve it, so it is scored as it is (each replica takes an equal share of
//! its expert's tokens, as in every other row) and counted, not refused as our own planners'
//! placements would be.

use serde::{Deserialize, Serialize};

use super::{BenchInputs, BenchRow, BenchShape, Scorer, median};
use crate::error::{EplbError, Result};
use crate::metrics::rank_loads;
use crate::placement::{Placement, find_duplicate};

/// A shape in the peers' own terms (experts per layer, ranks, slots per rank, nodes, groups),
/// as every input file for them starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerShape {
    /// The shape's name in the table.
    pub shape: String,
    pub num_layers: usize,
    pub num_experts: usize,
    pub num_ranks: usize,
    pub slots_per_rank: usize,
    pub num_nodes: usize,
    /// Expert groups (DeepSeek's group-limited routing; 1 for the others).
    pub num_groups: usize,
}

impl PeerShape {
    pub fn new(bs: &BenchShape) -> PeerShape {
        PeerShape {
            shape: bs.name.to_string(),
            num_layers: bs.num_layers,
            num_experts: bs.shape.num_experts,
            num_ranks: bs.shape.num_ranks,
            slots_per_rank: bs.shape.slots() / bs.shape.num_ranks.max(1),
            num_nodes: bs.shape.num_nodes,
            num_groups: bs.shape.num_groups,
        }
    }
}

/// What a peer plans from: one shape's history and the placement in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInputs {
    #[serde(flatten)]
    pub of: PeerShape,
    /// `[window][layer][expert]` token counts, oldest window first: the H windows every
    /// algorithm of the run plans on.
    pub history: Vec<Vec<Vec<f64>>>,
    /// `[layer][slot]` expert of each slot of the placement in use (rank `r` holds slots
    /// `r * S .. (r + 1) * S`).
    pub previous: Vec<Vec<usize>>,
}

impl PeerInputs {
    pub fn new(bs: &BenchShape, inputs: &BenchInputs) -> PeerInputs {
        PeerInputs {
            of: PeerShape::new(bs),
            history: inputs.history.windows().to_vec(),
            previous: inputs.previous.phy2log.clone(),
        }
    }
}

/// The folder name of a shape in an export: its name in lower case, every run of other
/// characters than letters and digits made one `-` ("DeepSeek-V3 prefill" ->
/// "deepseek-v3-prefill").
pub fn slug(shape_name: &str) -> String {
    let mut out = String::new();
    for c in shape_name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// Who a peer is and how its run went: how every file the driver (`eplb/peers/`) writes for a
/// peer starts, one-shot ([`PeerPlan`]) or rolling ([`super::rolling::RollingPeerPlan`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRun {
    /// Short name (`vllm-default`, `ascend-flashlb`, ...).
    pub id: String,
    /// The row's name in the table.
    pub label: String,
    /// The package and version the code came from (`vllm==0.34.0`).
    pub package: String,
    /// The file of the package whose entry point ran.
    pub source: String,
    /// What the peer was given, in a line.
    #[serde(default)]
    pub input: String,
    /// Threads the peer's torch used.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub note: String,
    /// Why the peer produced no plan (a rolling run: why it stopped).
    #[serde(default)]
    pub error: Option<String>,
}

/// One peer's plan of one shape, as `eplb/peers/run_peers.py` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerPlan {
    #[serde(flatten)]
    pub run: PeerRun,
    /// `[layer][slot]` expert of each slot; absent when the peer failed.
    #[serde(default)]
    pub phy2log: Option<Vec<Vec<i64>>>,
    /// Planning time of each repetition, in milliseconds.
    #[serde(default)]
    pub plan_ms: Vec<f64>,
}

/// What became of one peer plan.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerOutcome {
    /// Scored: its row, and how many layers hold an expert twice on one rank.
    Scored {
        id: String,
        row: Box<BenchRow>,
        package: String,
        source: String,
        duplicate_layers: usize,
        /// For the peers that run DeepSeek's algorithm: the layers, among those where the peer
        /// holds no expert twice on a rank, on which our `greedy` gives the same heaviest rank
        /// load under the summed history, and how many such layers there are.
        greedy_agreement: Option<(usize, usize)>,
    },
    /// No row: the peer failed, or its plan does not fit the shape.
    Failed {
        id: String,
        label: String,
        reason: String,
    },
}

/// The peers whose entry point runs DeepSeek's EPLB algorithm, which our `greedy`
/// re-implements (without ever putting an expert twice on one rank).
pub const DEEPSEEK_PEERS: [&str; 2] = ["vllm-default", "sglang-deepseek"];

/// Scores a peer's plan with `scorer`, or says why it cannot be; `greedy` is our `greedy`'s
/// plan of the same run, compared layer by layer with the peers of [`DEEPSEEK_PEERS`].
pub fn score_peer(
    scorer: &Scorer<'_>,
    bs: &BenchShape,
    plan: PeerPlan,
    greedy: Option<&Placement>,
) -> PeerOutcome {
    let PeerPlan {
        run,
        phy2log,
        plan_ms,
    } = plan;
    let failed = |reason: String| PeerOutcome::Failed {
        id: run.id.clone(),
        label: run.label.clone(),
        reason,
    };
    if let Some(e) = &run.error {
        return failed(format!("the peer failed: {e}"));
    }
    let Some(phy2log) = phy2log else {
        return failed("the plan has neither a phy2log nor an error".into());
    };
    let (placement, duplicate_layers) = match peer_placement(bs, &phy2log) {
        Ok(p) => p,
        Err(e) => return failed(format!("its plan does not fit the shape: {e}")),
    };
    let times: Vec<f64> = plan_ms.iter().copied().filter(|t| t.is_finite()).collect();
    let (ms, min) = if times.is_empty() {
        (0.0, 0.0)
    } else {
        (
            median(times.clone()),
            times.iter().copied().fold(f64::INFINITY, f64::min),
        )
    };
    // A row with 0 threads reads as "not a timed plan"; a peer always is one.
    match scorer.row(&run.label, &placement, ms, None, run.threads.max(1)) {
        Ok(mut row) => {
            row.plan_ms_min = min;
            let greedy_agreement = greedy
                .filter(|_| DEEPSEEK_PEERS.contains(&run.id.as_str()))
                .map(|g| heaviest_rank_agreement(g, &placement, &scorer.inputs.history.total()));
            PeerOutcome::Scored {
                id: run.id,
                row: Box::new(row),
                package: run.package,
                source: run.source,
                duplicate_layers,
                greedy_agreement,
            }
        }
        Err(e) => failed(format!("scoring failed: {e}")),
    }
}

/// A peer's `phy2log` as a placement of the shape, and the number of layers where one rank
/// holds an expert twice. Every invariant of [`Placement::validate`] is checked except that
/// one (see the module's note): sizes, expert ids in range, every expert served.
pub(super) fn peer_placement(bs: &BenchShape, phy2log: &[Vec<i64>]) -> Result<(Placement, usize)> {
    let bad = |m: String| Err(EplbError::Placement(m));
    let shape = bs.shape;
    let slots = shape.slots();
    if phy2log.len() != bs.num_layers {
        return bad(format!(
            "{} layers, the shape has {}",
            phy2log.len(),
            bs.num_layers
        ));
    }
    let mut rows = Vec::with_capacity(phy2log.len());
    let mut duplicate_layers = 0;
    for (layer, row) in phy2log.iter().enumerate() {
        if row.len() != slots {
            return bad(format!(
                "layer {layer} has {} slots, the shape has {slots}",
                row.len()
            ));
        }
        let mut served = vec![false; shape.num_experts];
        let mut out = Vec::with_capacity(slots);
        for (slot, &e) in row.iter().enumerate() {
            let Some(e) = usize::try_from(e).ok().filter(|&e| e < shape.num_experts) else {
                return bad(format!(
                    "layer {layer} slot {slot} holds expert {e}, the shape has experts 0..{}",
                    shape.num_experts
                ));
            };
            served[e] = true;
            out.push(e);
        }
        if let Some(e) = served.iter().position(|s| !s) {
            return bad(format!("layer {layer} has no replica of expert {e}"));
        }
        duplicate_layers += usize::from(find_duplicate(&out, slots / shape.num_ranks).is_some());
        rows.push(out);
    }
    // Not `from_phy2log`: its check refuses a rank holding an expert twice.
    let placement = Placement {
        num_layers: rows.len(),
        num_logical_experts: shape.num_experts,
        num_ranks: shape.num_ranks,
        num_nodes: shape.num_nodes,
        phy2log: rows,
    };
    Ok((placement, duplicate_layers))
}

/// Over the layers where `peer` holds no expert twice on one rank: on how many `ours` has the
/// same heaviest rank load under `load` (`[layer][expert]`), and how many there are. Equal
/// loads, not equal slots: ties may be broken into other ranks or slots and still be the same
/// algorithm.
fn heaviest_rank_agreement(
    ours: &Placement,
    peer: &Placement,
    load: &[Vec<f64>],
) -> (usize, usize) {
    let mut agree = 0;
    let mut compared = 0;
    for (layer, row) in peer.phy2log.iter().enumerate() {
        if find_duplicate(row, peer.slots_per_rank()).is_some() {
            continue;
        }
        compared += 1;
        let heaviest = |p: &Placement| {
            rank_loads(&p.phy2log[layer], &load[layer], p.num_ranks)
                .into_iter()
                .fold(0.0f64, f64::max)
        };
        let (a, b) = (heaviest(ours), heaviest(peer));
        agree += usize::from((a - b).abs() <= 1e-9 * a.abs().max(1.0));
    }
    (agree, compared)
}

/// Findings on the peers, per shape: joint against each peer on the next window (the one that
/// happened and in expectation) and in slots moved; our DeepSeek re-implementation against the
/// peers that run DeepSeek's algorithm; and every peer that produced no row, with the reason.
pub fn summary(rows: &[BenchRow], outcomes: &[(String, PeerOutcome)]) -> String {
    let mut out = String::new();
    for shape in super::in_order(outcomes.iter().map(|(s, _)| s.as_str())) {
        let of = |name: &str| {
            rows.iter()
                .find(|r| r.shape == shape && r.algorithm == name)
        };
        let Some(joint) = of("joint") else { continue };
        out.push_str(&format!("- **{shape}**: "));
        let mut parts = Vec::new();
        for (_, o) in outcomes.iter().filter(|(s, _)| s == shape) {
            match o {
                PeerOutcome::Scored {
                    row,
                    duplicate_layers,
                    ..
                } => {
                    let below = |a: f64, b: f64| 100.0 * (1.0 - a / b);
                    let mut p = format!(
                        "{}: next {:.4} / expected {:.4}, joint {:.2}% / {:.2}% lower, moving {} slots (joint {}), {:.1} ms",
                        row.algorithm,
                        row.next_mean_par,
                        row.expected_next_par,
                        below(joint.next_mean_par, row.next_mean_par),
                        below(joint.expected_next_par, row.expected_next_par),
                        row.slots_moved,
                        joint.slots_moved,
                        row.plan_ms_min,
                    );
                    if *duplicate_layers > 0 {
                        p.push_str(&format!(
                            " ({duplicate_layers} layers with an expert twice on one rank)"
                        ));
                    }
                    parts.push(p);
                }
                PeerOutcome::Failed { label, reason, .. } => {
                    parts.push(format!("{label}: no row ({reason})"));
                }
            }
        }
        out.push_str(&parts.join("; "));
        // Our `greedy` re-implements DeepSeek's algorithm, which vLLM's default policy and
        // SGLang's `deepseek` run: the same heaviest ranks is a check on both.
        for (_, o) in outcomes.iter().filter(|(s, _)| s == shape) {
            if let PeerOutcome::Scored {
                row,
                greedy_agreement: Some((agree, compared)),
                ..
            } = o
            {
                out.push_str(&format!(
                    "; our `greedy` (DeepSeek's algorithm, never an expert twice on one rank) has \
                     the heaviest rank of {} on {agree} of the {compared} layers where that holds \
                     no expert twice on one rank",
                    row.algorithm
                ));
            }
        }
        out.push_str(".\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{BenchOptions, standard_shapes};

    #[test]
    fn slugs_are_folder_names() {
        assert_eq!(slug("DeepSeek-V3 prefill"), "deepseek-v3-prefill");
        assert_eq!(slug("Qwen3-235B"), "qwen3-235b");
        assert_eq!(slug(" Mixtral-like  "), "mixtral-like");
    }

    fn mixtral() -> BenchShape {
        standard_shapes()
            .into_iter()
            .find(|s| s.name == "Mixtral-like")
            .expect("Mixtral-like is a standard shape")
    }

    fn small_opts() -> BenchOptions {
        BenchOptions {
            history: 2,
            repeats: 1,
            incremental_fractions: Vec::new(),
            ..Default::default()
        }
    }

    fn plan_of(id: &str, phy2log: Vec<Vec<i64>>) -> PeerPlan {
        PeerPlan {
            run: PeerRun {
                id: id.into(),
                label: format!("{id} (peer)"),
                package: "pkg==1".into(),
                source: "policy.py".into(),
                input: String::new(),
                threads: 2,
                note: String::new(),
                error: None,
            },
            phy2log: Some(phy2log),
            plan_ms: vec![3.0, 1.0, 2.0],
        }
    }

    /// A peer that returns the placement in use scores exactly as our "keep previous" row, and
    /// its times are read as the fastest and the median.
    #[test]
    fn a_peer_keeping_the_placement_scores_as_keep_previous() {
        let bs = mixtral();
        let opts = small_opts();
        let inputs = BenchInputs::generate(&bs, &opts).expect("inputs");
        let exported = PeerInputs::new(&bs, &inputs);
        assert_eq!(exported.history.len(), 2);
        assert_eq!(exported.of.slots_per_rank, 9);
        let same: Vec<Vec<i64>> = exported
            .previous
            .iter()
            .map(|r| r.iter().map(|&e| e as i64).collect())
            .collect();
        let (rows, outcomes) =
            super::super::run_shape_with_peers(&bs, &opts, vec![plan_of("keep", same)])
                .expect("run");
        let keep = rows
            .iter()
            .find(|r| r.algorithm == "keep previous")
            .expect("keep row");
        let peer = rows
            .iter()
            .find(|r| r.algorithm == "keep (peer)")
            .expect("peer row");
        assert_eq!(peer.next_mean_par, keep.next_mean_par);
        assert_eq!(peer.expected_next_par, keep.expected_next_par);
        assert_eq!(peer.slots_moved, 0);
        assert_eq!((peer.plan_ms_min, peer.plan_ms), (1.0, 2.0));
        assert!(matches!(
            &outcomes[0],
            PeerOutcome::Scored {
                duplicate_layers: 0,
                ..
            }
        ));
    }

    /// A DeepSeek peer that returns our `greedy`'s own plan agrees on every layer; one that
    /// returns another plan (the placement in use, `joint`'s) does not; other peers are not
    /// compared.
    #[test]
    fn deepseek_peers_are_checked_against_greedy() {
        let bs = mixtral();
        let opts = small_opts();
        let inputs = BenchInputs::generate(&bs, &opts).expect("inputs");
        let greedy = crate::planner::planner_by_name("greedy")
            .and_then(|p| p.plan(&inputs.request(bs.shape, 1)))
            .expect("greedy");
        let as_i64 = |p: &Placement| -> Vec<Vec<i64>> {
            p.phy2log
                .iter()
                .map(|r| r.iter().map(|&e| e as i64).collect())
                .collect()
        };
        let plans = vec![
            plan_of("vllm-default", as_i64(&greedy.placement)),
            plan_of("sglang-deepseek", as_i64(&inputs.previous)),
            plan_of("ascend-flashlb", as_i64(&greedy.placement)),
        ];
        let (_, outcomes) = super::super::run_shape_with_peers(&bs, &opts, plans).expect("run");
        let agreement: Vec<Option<(usize, usize)>> = outcomes
            .iter()
            .map(|o| match o {
                PeerOutcome::Scored {
                    greedy_agreement, ..
                } => *greedy_agreement,
                PeerOutcome::Failed { reason, .. } => panic!("{reason}"),
            })
            .collect();
        assert_eq!(agreement[0], Some((bs.num_layers, bs.num_layers)));
        let (agree, compared) = agreement[1].expect("compared");
        assert_eq!(compared, bs.num_layers);
        assert!(agree < compared, "{agree} of {compared}");
        assert_eq!(agreement[2], None);
    }

    /// An expert twice on one rank is scored (and counted); a missing expert, an id out of
    /// range, a wrong slot count and a peer's own error give no row and say why.
    #[test]
    fn peer_plans_are_checked_but_duplicates_on_a_rank_are_scored() {
        let bs = mixtral();
        let opts = small_opts();
        let inputs = BenchInputs::generate(&bs, &opts).expect("inputs");
        let scorer = Scorer::new(&bs, &inputs, &opts);
        let e = bs.shape.num_experts as i64;
        let slots = bs.shape.slots();
        // Experts 0..E on the first E slots, then expert 0 again on the 8 spare slots: rank 0
        // (slots 0..9) holds 0..9, rank 7 (slots 63..72) holds 63 and expert 0 eight times.
        let row: Vec<i64> = (0..slots as i64)
            .map(|s| if s < e { s } else { 0 })
            .collect();
        let twice = vec![row.clone(); bs.num_layers];
        match score_peer(&scorer, &bs, plan_of("twice", twice), None) {
            PeerOutcome::Scored {
                duplicate_layers,
                row,
                ..
            } => {
                assert_eq!(duplicate_layers, bs.num_layers);
                assert!(row.next_mean_par > 1.0);
            }
            other => panic!("expected a row, got {other:?}"),
        }
        let mut missing = row.clone();
        missing[5] = 0;
        let mut out_of_range = row.clone();
        out_of_range[3] = e;
        let short = row[..slots - 1].to_vec();
        for (plan, want) in [
            (vec![missing; bs.num_layers], "no replica of expert 5"),
            (vec![out_of_range; bs.num_layers], "holds expert 64"),
            (vec![short; bs.num_layers], "71 slots"),
            (vec![row.clone(); 3], "3 layers"),
        ] {
            match score_peer(&scorer, &bs, plan_of("bad", plan), None) {
                PeerOutcome::Failed { reason, .. } => {
                    assert!(reason.contains(want), "{reason} should say {want}")
                }
                other => panic!("expected a failure naming {want}, got {other:?}"),
            }
        }
        let mut failed = plan_of("err", Vec::new());
        failed.phy2log = None;
        failed.run.error = Some("ImportError: numba".into());
        match score_peer(&scorer, &bs, failed, None) {
            PeerOutcome::Failed { reason, .. } => assert!(reason.contains("numba")),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// The export is what the run plans on: plans of the exported history by our own planner
    /// reproduce the run's `joint` row exactly (the peers see the same inputs as we do).
    #[test]
    fn exported_inputs_reproduce_the_run() {
        let bs = mixtral();
        let opts = small_opts();
        let inputs = BenchInputs::generate(&bs, &opts).expect("inputs");
        let json = serde_json::to_string(&PeerInputs::new(&bs, &inputs)).expect("json");
        let back: PeerInputs = serde_json::from_str(&json).expect("parse");
        let history = crate::load::LoadHistory::new(back.history).expect("history");
        let previous = Placement::from_phy2log(
            back.of.num_experts,
            back.of.num_ranks,
            back.of.num_nodes,
            back.previous,
        )
        .expect("previous");
        let threads = 1;
        let req = crate::planner::PlanRequest::new(bs.shape, &history)
            .previous(&previous)
            .threads(threads);
        let ours = crate::planner::planner_by_name("multi-episode-lpt")
            .and_then(|p| p.plan(&req))
            .expect("plan");
        let direct = crate::planner::planner_by_name("multi-episode-lpt")
            .and_then(|p| p.plan(&inputs.request(bs.shape, threads)))
            .expect("plan");
        assert_eq!(ours.placement, direct.placement);
    }
}
