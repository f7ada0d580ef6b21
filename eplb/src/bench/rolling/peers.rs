//! The peers' side of the rolling protocol: what `moectl bench --export DIR --rolling K` hands
//! the driver in `eplb/peers/` ([`RollingPeerInputs`]), what it writes back per peer
//! ([`RollingPeerPlan`]: the placement its engine deployed at every step), and the scoring of
//! those runs with the same [`RollingScorer`] as ours.

use serde::{Deserialize, Serialize};

use super::{RollingInputs, RollingRow, RollingScorer};
use crate::bench::BenchShape;
use crate::bench::peers::{PeerRun, PeerShape};

/// What a peer replans from in the rolling run, in the peers' terms: the shape as in
/// [`crate::bench::peers::PeerInputs`], the windows it may see and the placement in use at step 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollingPeerInputs {
    #[serde(flatten)]
    pub of: PeerShape,
    /// Windows of history each step plans on (H).
    pub history_windows: usize,
    /// Replanning steps (K).
    pub steps: usize,
    /// Windows between consecutive steps (T).
    pub stride: usize,
    /// `[window][layer][expert]`, `H + (K - 1) T` windows, oldest first: step `k` plans on
    /// `windows[kT .. kT + H]` (the window scored after the last step is not in it).
    pub windows: Vec<Vec<Vec<f64>>>,
    /// `[layer][slot]` the placement in use before step 0 (rank `r` holds slots `r * S ..`).
    pub previous: Vec<Vec<usize>>,
}

impl RollingPeerInputs {
    pub fn new(bs: &BenchShape, inputs: &RollingInputs) -> RollingPeerInputs {
        let h = inputs.history;
        RollingPeerInputs {
            of: PeerShape::new(bs),
            history_windows: h,
            steps: inputs.steps,
            stride: inputs.stride,
            windows: inputs.windows[inputs.offset..inputs.first_at(inputs.steps - 1) + h].to_vec(),
            previous: inputs.start.phy2log.clone(),
        }
    }
}

/// One step of a peer's rolling run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStep {
    /// `[layer][slot]` what the peer's engine deploys after this step.
    pub phy2log: Vec<Vec<i64>>,
    /// The timed entry point of this step, in milliseconds.
    #[serde(default)]
    pub plan_ms: f64,
    #[serde(default)]
    pub note: String,
}

/// One peer's rolling run of one shape, as the driver writes it (`rolling/<id>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollingPeerPlan {
    #[serde(flatten)]
    pub run: PeerRun,
    #[serde(default)]
    pub steps: Vec<PeerStep>,
}

/// What became of one peer's rolling run.
#[derive(Debug, Clone, PartialEq)]
pub enum RollingOutcome {
    Scored {
        id: String,
        row: Box<RollingRow>,
        package: String,
        source: String,
        /// Steps whose placement holds an expert twice on one rank (scored as it is).
        duplicate_steps: usize,
        /// Steps in the run.
        steps: usize,
        /// What the driver says about the run (how the policy's state was kept); each step's
        /// own note stays in the driver's file.
        note: String,
    },
    Failed {
        id: String,
        label: String,
        reason: String,
    },
}

/// Scores a peer's rolling run, or says why it cannot be.
pub fn score_rolling_peer(
    scorer: &RollingScorer<'_>,
    bs: &BenchShape,
    plan: RollingPeerPlan,
) -> RollingOutcome {
    let RollingPeerPlan { run, steps: runs } = plan;
    let failed = |reason: String| RollingOutcome::Failed {
        id: run.id.clone(),
        label: run.label.clone(),
        reason,
    };
    let steps = scorer.inputs.steps;
    if let Some(e) = &run.error {
        return failed(format!(
            "the peer failed after {} of {steps} steps: {e}",
            runs.len()
        ));
    }
    if runs.len() != steps {
        return failed(format!("{} steps, the run has {steps}", runs.len()));
    }
    let mut row = scorer.empty_row(&run.label, run.threads.max(1));
    let mut deployed = scorer.inputs.start.clone();
    let mut duplicate_steps = 0;
    for (k, step) in runs.iter().enumerate() {
        let (p, dups) = match crate::bench::peers::peer_placement(bs, &step.phy2log) {
            Ok(p) => p,
            Err(e) => return failed(format!("step {k}'s plan does not fit the shape: {e}")),
        };
        duplicate_steps += usize::from(dups > 0);
        if let Err(e) = scorer.push_step(&mut row, k, &deployed, &p) {
            return failed(format!("scoring step {k} failed: {e}"));
        }
        row.plan_ms.push(step.plan_ms);
        deployed = p;
    }
    RollingOutcome::Scored {
        id: run.id,
        row: Box::new(row),
        package: run.package,
        source: run.source,
        duplicate_steps,
        steps,
        note: run.note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::rolling::tests::{mixtral, small_opts};

    fn peer_run(plans: Vec<Vec<Vec<usize>>>) -> RollingPeerPlan {
        RollingPeerPlan {
            run: PeerRun {
                id: "p".into(),
                label: "p (peer)".into(),
                package: "pkg==1".into(),
                source: "policy.py".into(),
                input: String::new(),
                threads: 1,
                note: "run note".into(),
                error: None,
            },
            steps: plans
                .into_iter()
                .enumerate()
                .map(|(k, p)| PeerStep {
                    phy2log: p
                        .iter()
                        .map(|r| r.iter().map(|&e| e as i64).collect())
                        .collect(),
                    plan_ms: k as f64,
                    note: if k == 0 {
                        "first".into()
                    } else {
                        String::new()
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn a_peer_is_scored_step_by_step_against_its_own_previous_placement() {
        let bs = mixtral();
        let opts = small_opts();
        let inputs = RollingInputs::generate(&bs, &opts, 2, 1).unwrap();
        let scorer = RollingScorer::new(&bs, &inputs, &opts);
        // Step 0 keeps the start; step 1 swaps two slots of layer 0 between ranks 0 and 1.
        let start = inputs.start.phy2log.clone();
        let mut swapped = start.clone();
        let s = bs.shape.slots() / bs.shape.num_ranks;
        let (rank0, rank1) = (&start[0][..s], &start[0][s..2 * s]);
        let (i, j) = (0..s)
            .flat_map(|i| (0..s).map(move |j| (i, j)))
            .find(|&(i, j)| !rank0.contains(&rank1[j]) && !rank1.contains(&rank0[i]))
            .expect("ranks 0 and 1 hold experts the other does not");
        swapped[0].swap(i, s + j);
        let RollingOutcome::Scored {
            row,
            note,
            duplicate_steps,
            ..
        } = score_rolling_peer(&scorer, &bs, peer_run(vec![start.clone(), swapped]))
        else {
            panic!("a valid run must be scored");
        };
        assert_eq!(row.slots_moved, vec![0, 2]);
        assert_eq!(row.layers_changed, vec![0, 1]);
        assert_eq!(row.plan_ms, vec![0.0, 1.0]);
        assert_eq!(note, "run note");
        assert_eq!(duplicate_steps, 0);
        // A run short of steps, or one that failed, has no row and says why.
        let short = peer_run(vec![start.clone()]);
        assert!(matches!(
            score_rolling_peer(&scorer, &bs, short),
            RollingOutcome::Failed { reason, .. } if reason.contains("1 steps, the run has 2")
        ));
        let mut failed = peer_run(vec![start.clone()]);
        failed.run.error = Some("step 1: ValueError: boom".into());
        assert!(matches!(
            score_rolling_peer(&scorer, &bs, failed),
            RollingOutcome::Failed { reason, .. } if reason.contains("after 1 of 2 steps")
        ));
        let mut bad = start.clone();
        bad[3].pop();
        assert!(matches!(
            score_rolling_peer(&scorer, &bs, peer_run(vec![start, bad])),
            RollingOutcome::Failed { reason, .. } if reason.contains("step 1")
        ));
    }
}
