//! The recording file: the group's windows, summed over ranks, with the step each ends at.

use std::path::Path;

use moe_api::{LoadEpisode, LoadReport, PlacementDocument};
use serde::{Deserialize, Serialize};

/// A recording: the group's windows and where each ends in the group's step count.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// `windows[w][layer][expert]`: token-expert assignments routed in window `w`, all ranks.
    pub windows: Vec<Vec<Vec<f64>>>,
    /// The group step each window ends at (exclusive).
    pub end_steps: Vec<u64>,
    /// Steps in each window.
    pub steps: Vec<u64>,
    /// `[after, before]` end steps between which windows were lost (a poll came too late).
    #[serde(default)]
    pub gaps: Vec<[u64; 2]>,
    /// The placement the group served at the recording's first poll (rank 0's
    /// `GET /v1/placement`): its ranks, nodes and slots are the layout `backtest` replays, and
    /// it is where every replay starts. The first poll's windows may predate a remap that ran
    /// in the 16 windows before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementDocument>,
    /// `namespace/name` of the MoEDeployment recorded (`record --deployment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Its `spec.eplb` when the recording began, as the API server returned it (defaults
    /// filled in): `backtest` replays these settings beside the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eplb: Option<serde_json::Value>,
    /// The bytes the operator counts per moved expert against `spec.eplb.maxBytesPerRemap`
    /// (from the deployment's `spec.model`), so that `backtest` replays the byte budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_bytes: Option<u64>,
    /// `[group step, unix seconds]` at polls that added windows: when each window closed, for
    /// replaying `replanIntervalSeconds` ([`window_ends`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clock: Vec<[f64; 2]>,
}

/// The operator settings of a recorded deployment that a replay can follow (`spec.eplb`; the
/// CRD's defaults where a field is missing).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEplb {
    #[serde(default = "crd_default::enabled")]
    pub enabled: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default = "crd_default::algorithm")]
    pub algorithm: String,
    #[serde(default = "crd_default::history_windows")]
    pub history_windows: usize,
    #[serde(default = "crd_default::imbalance_threshold")]
    pub imbalance_threshold: f64,
    #[serde(default = "crd_default::hysteresis")]
    pub hysteresis: f64,
    #[serde(default = "crd_default::max_layers_per_remap")]
    pub max_layers_per_remap: usize,
    #[serde(default = "crd_default::replan_interval_seconds")]
    pub replan_interval_seconds: f64,
    #[serde(default)]
    pub max_moves_per_layer: Option<u64>,
    /// A Kubernetes quantity: a string or a number.
    #[serde(default)]
    pub max_bytes_per_remap: Option<serde_json::Value>,
}

/// The CRD's defaults of `spec.eplb` (crds/moedeployment.yaml).
mod crd_default {
    pub fn enabled() -> bool {
        true
    }
    pub fn algorithm() -> String {
        "joint".into()
    }
    pub fn history_windows() -> usize {
        4
    }
    pub fn imbalance_threshold() -> f64 {
        1.2
    }
    pub fn hysteresis() -> f64 {
        0.05
    }
    pub fn max_layers_per_remap() -> usize {
        8
    }
    pub fn replan_interval_seconds() -> f64 {
        300.0
    }
}

/// What one poll added.
#[derive(Debug, Default, PartialEq)]
pub struct Added {
    pub windows: usize,
    /// Windows closed since the last recorded one that no rank kept any more (step ranges).
    pub lost: Vec<[u64; 2]>,
}

impl Recording {
    /// Appends the group's windows in `reports` (one per rank) newer than the last recorded:
    /// those every rank has closed, summed over ranks ([`LoadEpisode::group_windows`]); oldest
    /// first, until the recording holds `limit` windows. Windows that begin before group step
    /// `not_before` are left out (a new recording's start).
    pub fn add(
        &mut self,
        reports: &[LoadReport],
        limit: Option<usize>,
        not_before: Option<u64>,
    ) -> Result<Added, String> {
        let mut added = Added {
            windows: 0,
            lost: Vec::new(),
        };
        let windows = LoadEpisode::group_windows(reports);
        // The group's step count went back: it restarted, and its windows cannot follow the
        // recorded ones (they would be skipped as old until its count passed the last one).
        if let (Some(newest), Some(&last)) = (windows.last(), self.end_steps.last())
            && newest.end_step < last
        {
            return Err(format!(
                "the group's newest window ends at step {}, before the recording's last ({last}): \
                 the group restarted (or is another one); record it to another --output",
                newest.end_step
            ));
        }
        for window in windows {
            let last = self.end_steps.last().copied();
            let start = window.end_step.saturating_sub(window.steps);
            if last.is_some_and(|l| window.end_step <= l) || not_before.is_some_and(|s| start < s) {
                continue;
            }
            if limit.is_some_and(|n| self.windows.len() >= n) {
                break;
            }
            if let Some(w) = self.windows.first()
                && !same_shape(w, &window.logical_counts)
            {
                let sum = &window.logical_counts;
                return Err(format!(
                    "the group reports {} layers x {} experts, the recording holds {} x {}: \
                     another deployment? record it to another --output",
                    sum.len(),
                    sum.first().map_or(0, Vec::len),
                    w.len(),
                    w.first().map_or(0, Vec::len)
                ));
            }
            if let Some(l) = last
                && start > l
            {
                self.gaps.push([l, start]);
                added.lost.push([l, start]);
            }
            self.windows.push(window.logical_counts);
            self.end_steps.push(window.end_step);
            self.steps.push(window.steps);
            added.windows += 1;
        }
        Ok(added)
    }
}

/// What a recording says besides its windows: the step ranges it lost and the placement the
/// group served when it began.
#[derive(Debug, Default)]
pub struct RecordedContext {
    /// Whether the file is a recording by `moectl record` at all.
    pub is_recording: bool,
    pub gaps: Vec<[u64; 2]>,
    /// Absent in recordings by a moectl before it kept the start.
    pub placement: Option<PlacementDocument>,
    /// The deployment recorded (`namespace/name`) and its settings (`record --deployment`).
    pub deployment: Option<(String, RecordedEplb)>,
    /// [`Recording::expert_bytes`].
    pub expert_bytes: Option<u64>,
    /// When each window closed, unix seconds ([`window_ends`]); `None` when the recording has
    /// no clock (made by a moectl before it kept one, or polled once).
    pub window_ends: Option<Vec<f64>>,
}

/// The [`RecordedContext`] of the load file at `path`: empty for a file that is not a
/// recording (an object with `endSteps`); a recording whose `gaps` or `placement` do not read
/// is an error.
pub fn context_of(path: &Path) -> Result<RecordedContext, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        end_steps: Option<Vec<u64>>,
        gaps: Option<serde_json::Value>,
        placement: Option<serde_json::Value>,
        deployment: Option<String>,
        eplb: Option<serde_json::Value>,
        expert_bytes: Option<u64>,
        #[serde(default)]
        clock: Vec<[f64; 2]>,
    }
    let Some((raw, end_steps)) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Raw>(&text).ok())
        .and_then(|mut r| {
            let end_steps = r.end_steps.take()?;
            Some((r, end_steps))
        })
    else {
        return Ok(RecordedContext::default());
    };
    let field = |what: &str, e: serde_json::Error| {
        format!(
            "{}: the recording's {what} does not read: {e}",
            path.display()
        )
    };
    Ok(RecordedContext {
        is_recording: true,
        gaps: raw
            .gaps
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| field("gaps", e))?
            .unwrap_or_default(),
        placement: raw
            .placement
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| field("placement", e))?,
        deployment: match (raw.deployment, raw.eplb) {
            (Some(name), Some(eplb)) => Some((
                name,
                serde_json::from_value(eplb).map_err(|e| field("eplb", e))?,
            )),
            _ => None,
        },
        expert_bytes: raw.expert_bytes,
        window_ends: window_ends(&end_steps, &raw.clock),
    })
}

/// When each window closed (unix seconds): its end step on the recording's clock, the group
/// step and time at each poll that added windows, interpolated linearly between the two
/// nearest polls (extrapolated past the first or last at their pair's rate). A poll sees a
/// window some time after it closed; the rate between polls takes that delay out. `None`
/// without two polls at distinct steps.
pub fn window_ends(end_steps: &[u64], clock: &[[f64; 2]]) -> Option<Vec<f64>> {
    let mut points: Vec<(f64, f64)> = Vec::with_capacity(clock.len());
    for &[step, time] in clock {
        if !(step.is_finite() && time.is_finite()) {
            return None;
        }
        // Steps only grow (a restarted group is not recorded on); a repeated step adds
        // nothing, nor does a poll whose wall clock went back (set by hand or by NTP).
        if points.last().is_none_or(|&(s, t)| step > s && time > t) {
            points.push((step, time));
        }
    }
    if points.len() < 2 {
        return None;
    }
    let at = |step: f64| {
        let i = points
            .partition_point(|&(s, _)| s <= step)
            .clamp(1, points.len() - 1);
        let ((s0, t0), (s1, t1)) = (points[i - 1], points[i]);
        t0 + (step - s0) * (t1 - t0) / (s1 - s0)
    };
    Some(end_steps.iter().map(|&e| at(e as f64)).collect())
}

fn same_shape(a: &[Vec<f64>], b: &[Vec<f64>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rank: usize, episodes: &[(u64, u64, f64)]) -> LoadReport {
        LoadReport {
            rank,
            layer_generations: vec![0],
            window_steps: 0,
            window_start_step: None,
            step: 0,
            slot_counts: vec![vec![0.0; 3]],
            par: vec![1.0],
            history: episodes
                .iter()
                .map(|&(end_step, steps, v)| LoadEpisode {
                    end_step,
                    steps,
                    logical_counts: vec![vec![v, 2.0 * v]],
                })
                .collect(),
        }
    }

    #[test]
    fn windows_every_rank_closed_are_summed_once_and_lost_ones_noted() {
        let mut rec = Recording::default();
        // Rank 1 has not closed the window ending at 30 yet: it waits for the next poll.
        let a = [
            report(0, &[(10, 10, 1.0), (20, 10, 2.0), (30, 10, 3.0)]),
            report(1, &[(10, 10, 10.0), (20, 10, 20.0)]),
        ];
        assert_eq!(
            rec.add(&a, None, None).unwrap(),
            Added {
                windows: 2,
                lost: Vec::new()
            }
        );
        assert_eq!(
            rec.windows,
            vec![vec![vec![11.0, 22.0]], vec![vec![22.0, 44.0]]]
        );
        assert_eq!(
            (rec.end_steps.clone(), rec.steps.clone()),
            (vec![10, 20], vec![10, 10])
        );
        // Polled again: only the new one.
        let b = [
            report(0, &[(20, 10, 2.0), (30, 10, 3.0)]),
            report(1, &[(20, 10, 20.0), (30, 10, 30.0)]),
        ];
        assert_eq!(rec.add(&b, None, None).unwrap().windows, 1);
        assert_eq!(rec.windows[2], vec![vec![33.0, 66.0]]);
        // Too late: the windows ending at 40 and 50 are gone from both ranks.
        let c = [report(0, &[(60, 10, 1.0)]), report(1, &[(60, 10, 1.0)])];
        assert_eq!(
            rec.add(&c, None, None).unwrap(),
            Added {
                windows: 1,
                lost: vec![[30, 50]]
            }
        );
        assert_eq!(rec.gaps, vec![[30, 50]]);
        // A window in another shape than the recording's is refused.
        let d = [
            LoadReport {
                history: vec![LoadEpisode {
                    end_step: 70,
                    steps: 10,
                    logical_counts: vec![vec![1.0]],
                }],
                ..report(0, &[])
            },
            LoadReport {
                history: vec![LoadEpisode {
                    end_step: 70,
                    steps: 10,
                    logical_counts: vec![vec![2.0]],
                }],
                ..report(1, &[])
            },
        ];
        let e = rec.add(&d, None, None).unwrap_err();
        assert!(
            e.contains("1 layers x 1 experts, the recording holds 1 x 2"),
            "{e}"
        );
        // A limit stops at that many windows; the next poll would not add past it either.
        let mut capped = Recording::default();
        assert_eq!(capped.add(&b, Some(1), None).unwrap().windows, 1);
        assert_eq!(capped.end_steps, vec![20]);
        assert_eq!(capped.add(&b, Some(1), None).unwrap().windows, 0);
        // A restarted group counts steps from 0 again: said so, not waited out.
        let restarted = [report(0, &[(10, 10, 1.0)]), report(1, &[(10, 10, 1.0)])];
        // A new recording starting at step 15 leaves out the window of steps 10-20 (its
        // placement may not be the recorded start's), and notes no gap before the first.
        let mut fresh = Recording::default();
        assert_eq!(fresh.add(&b, None, Some(15)).unwrap().windows, 1);
        assert_eq!(
            (fresh.end_steps.clone(), fresh.gaps.clone()),
            (vec![30], vec![])
        );
        let mut at_start = Recording::default();
        assert_eq!(at_start.add(&b, None, Some(10)).unwrap().windows, 2);
        let e = rec.add(&restarted, None, None).unwrap_err();
        assert!(e.contains("the group restarted"), "{e}");
    }

    #[test]
    fn window_ends_follow_the_polls_clock() {
        // 10 steps a second until step 1000, then 20.
        let clock = [
            [500.0, 50.0],
            [1000.0, 100.0],
            [1000.0, 101.0],
            [2000.0, 150.0],
        ];
        let ends = window_ends(&[0, 500, 750, 1000, 1500, 3000], &clock).unwrap();
        assert_eq!(ends, vec![0.0, 50.0, 75.0, 100.0, 125.0, 200.0]);
        // One poll, or none: no clock.
        assert_eq!(window_ends(&[500], &[[500.0, 50.0]]), None);
        assert_eq!(window_ends(&[500], &[[500.0, 50.0], [500.0, 60.0]]), None);
        assert_eq!(window_ends(&[500], &[]), None);
        // A clock that went back is left out.
        let back = [[500.0, 50.0], [1000.0, 40.0], [2000.0, 150.0]];
        assert_eq!(window_ends(&[1250], &back).unwrap(), vec![100.0]);
    }
}
