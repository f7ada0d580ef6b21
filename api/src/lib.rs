//! The contract between the operator and the worker ranks.
//!
//! Everything that crosses a process boundary lives here, so that both sides compile against
//! one definition: the JSON bodies of the worker's HTTP API, the placement document the
//! operator commits to a ConfigMap (and a restarted worker loads), and the environment
//! variables through which the operator configures a worker pod.
//!
//! Placements travel as plain `phy2log` tables (`[layer][physical slot] = logical expert`).
//! Every other map (`log2phy`, `logcnt`, per-rank expert maps) is derived from that table by
//! the `eplb` crate, so there is exactly one thing to keep consistent.

use serde::{Deserialize, Serialize};

pub mod env;
pub mod forward;
pub mod pods;
pub mod quantity;

/// Path prefix of the worker's versioned API.
pub const API_PREFIX: &str = "/v1";
/// The ConfigMap key holding the committed [`PlacementDocument`] as compact JSON.
pub const PLACEMENT_CONFIGMAP_KEY: &str = "placement.json";
/// Mutating worker endpoints require `Authorization: Bearer <token>`.
pub const AUTH_SCHEME: &str = "Bearer";

/// A placement of every layer, with the generation that names it.
///
/// Generation 0 is the initial placement computed from the deployment's strategy; each
/// committed remap increments it. Workers serve, per layer, the generation they last switched
/// that layer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementDocument {
    pub generation: u64,
    pub num_layers: usize,
    pub num_logical_experts: usize,
    pub num_ranks: usize,
    pub num_nodes: usize,
    /// `phy2log[layer][slot]`: the logical expert held by physical slot `slot`.
    /// Rank `r` holds slots `r*S .. (r+1)*S` with `S = slots / num_ranks`.
    pub phy2log: Vec<Vec<u32>>,
}

impl PlacementDocument {
    /// Physical slots per layer (experts + redundant).
    pub fn num_slots(&self) -> usize {
        self.phy2log.first().map_or(0, Vec::len)
    }

    /// Checks the shape and the one invariant every consumer relies on: each layer has the
    /// same number of slots on every rank, and every logical expert is served at least once.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_ranks == 0 {
            return Err("numRanks must be at least 1".into());
        }
        if self.phy2log.len() != self.num_layers {
            return Err(format!(
                "phy2log has {} layers but numLayers is {}",
                self.phy2log.len(),
                self.num_layers
            ));
        }
        let slots = self.num_slots();
        if !slots.is_multiple_of(self.num_ranks) {
            return Err(format!(
                "{slots} slots per layer cannot be split evenly over {} ranks",
                self.num_ranks
            ));
        }
        for (layer, row) in self.phy2log.iter().enumerate() {
            if row.len() != slots {
                return Err(format!(
                    "layer {layer} has {} slots, layer 0 has {slots}",
                    row.len()
                ));
            }
            let mut served = vec![false; self.num_logical_experts];
            for (slot, &expert) in row.iter().enumerate() {
                let Some(flag) = served.get_mut(expert as usize) else {
                    return Err(format!(
                        "layer {layer} slot {slot} holds expert {expert}, but the model has {} experts",
                        self.num_logical_experts
                    ));
                };
                *flag = true;
            }
            if let Some(missing) = served.iter().position(|s| !s) {
                return Err(format!("layer {layer} does not serve expert {missing}"));
            }
        }
        Ok(())
    }
}

/// How a remap moves weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RemapMode {
    /// Layer by layer while serving continues: stage on a side stream, switch at a step
    /// boundary that all ranks agree on.
    #[default]
    Async,
    /// Pause serving, move every requested layer, resume. Kept for comparison and as a fallback.
    StopTheWorld,
}

/// `POST /v1/remap`: move the group to `placement.generation` for the given layers.
///
/// The worker refuses (409) a generation older than the one it serves or is moving to; the
/// same generation twice is idempotent (202 with the current progress).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemapRequest {
    /// The full target placement. Layers not listed in `layers` must equal the current ones.
    pub placement: PlacementDocument,
    /// Layers to switch, in the order they are to be moved. Empty means every layer that differs.
    #[serde(default)]
    pub layers: Vec<usize>,
    #[serde(default)]
    pub mode: RemapMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RemapState {
    Running,
    Succeeded,
    Failed,
}

/// Progress of the newest remap a worker has accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemapProgress {
    pub generation: u64,
    pub state: RemapState,
    pub mode: RemapMode,
    pub layers_total: usize,
    pub layers_done: usize,
    /// Experts (slots) whose weights this rank received.
    pub experts_moved: u64,
    /// Bytes of expert weights this rank received.
    pub bytes_moved: u64,
    /// Time forward passes were held back by the remap on this rank.
    pub stall_seconds: f64,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub rank: usize,
    pub world_size: usize,
    /// True once the group formed and this rank's weights are loaded.
    pub ready: bool,
    /// The backend actually in use (`cuda` or `cpu`).
    pub backend: String,
    /// Generation of the placement every layer has switched to (the minimum over layers).
    pub placement_generation: u64,
    /// Per layer, the generation it serves.
    pub layer_generations: Vec<u64>,
    pub step: u64,
    pub tokens_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remap: Option<RemapProgress>,
    /// Where batches come from: `generator`, `trace` or `api` (see docs/forward-api.md).
    #[serde(default)]
    pub traffic: String,
    /// Rows this rank answered through the forward API since it started.
    #[serde(default)]
    pub served_rows_total: u64,
    /// Rows per second this rank answered through the forward API, over the recent past.
    #[serde(default)]
    pub served_rows_per_second: f64,
    /// [`token_id`] of the control token this rank accepts (absent: none configured, or a
    /// worker release before token ids). The operator compares it with the token it derived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_token_id: Option<String>,
    /// [`token_id`] of the client token this rank's forward API accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token_id: Option<String>,
}

/// A short one-way id of a token: the first 16 hex digits of SHA-256 over a fixed prefix and
/// the token (surrounding whitespace trimmed). It tells two holders whether they hold the same
/// token without revealing it (the tokens are 256-bit random or HMAC-derived, so the id
/// cannot be inverted), and it is no credential for any API.
pub fn token_id(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"moe-token-id/v1\0")
        .chain_update(token.trim().as_bytes())
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET /v1/load`: this rank's routing statistics over its sliding window.
///
/// Counts are the tokens that this rank routed to each physical slot (whichever rank holds
/// it), so summing the reports of all ranks gives the group's load. The operator does that
/// sum; [`LoadReport::logical_load`] folds slots into logical experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub rank: usize,
    /// Placement generation per layer that the counts were recorded under.
    pub layer_generations: Vec<u64>,
    /// Steps currently in the window (at most the configured window size).
    pub window_steps: u64,
    /// The oldest group step the window holds (any layer's; `None` while it is empty). A
    /// closed window that ends at or before it shares no step with the current one. With the
    /// forward API a layer's window holds that layer's newest rounds, which can reach far
    /// further back than `window_steps` group steps. Absent from older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start_step: Option<u64>,
    /// Group steps done (the next step's number).
    pub step: u64,
    /// `slot_counts[layer][physical slot]`.
    pub slot_counts: Vec<Vec<f64>>,
    /// Per layer peak/average rank load of this rank's traffic alone, under the current placement.
    pub par: Vec<f64>,
    /// Closed past windows, oldest first, when asked for with `?history=N` (at most N, and at
    /// most [`MAX_LOAD_HISTORY`]); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<LoadEpisode>,
}

/// Past windows a worker keeps for `GET /v1/load?history=N`.
pub const MAX_LOAD_HISTORY: usize = 16;

/// One closed window of a rank's routing statistics: the logical expert counts of the tokens
/// this rank routed during `steps` steps ending at step `end_step` (exclusive). Windows close
/// at multiples of the window size in the group's step count, so every rank's window with the
/// same `end_step` covers the same steps and their counts add up to the group's.
///
/// Logical (not per-slot) counts, so a window stays meaningful after a remap changes what the
/// slots hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadEpisode {
    pub end_step: u64,
    pub steps: u64,
    /// `logical_counts[layer][expert]`.
    pub logical_counts: Vec<Vec<f64>>,
}

impl LoadEpisode {
    /// The group's closed windows: those every report has (same `end_step`), summed over
    /// ranks, oldest first. A window some rank lacks (it started mid-window, or has not closed
    /// it yet) or holds in another shape is left out.
    pub fn group_windows(reports: &[LoadReport]) -> Vec<LoadEpisode> {
        let Some(first) = reports.first() else {
            return Vec::new();
        };
        first
            .history
            .iter()
            .filter_map(|ep| {
                let mut sum = ep.logical_counts.clone();
                for other in &reports[1..] {
                    let theirs = other.history.iter().find(|o| o.end_step == ep.end_step)?;
                    if theirs.steps != ep.steps || theirs.logical_counts.len() != sum.len() {
                        return None;
                    }
                    for (acc, row) in sum.iter_mut().zip(&theirs.logical_counts) {
                        if acc.len() != row.len() {
                            return None;
                        }
                        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                    }
                }
                Some(LoadEpisode {
                    end_step: ep.end_step,
                    steps: ep.steps,
                    logical_counts: sum,
                })
            })
            .collect()
    }

    /// The newest `max` of [`LoadEpisode::group_windows`] that ended by `first_step`, the
    /// oldest step the current window holds ([`LoadReport::current_window_start`]), counts
    /// only: what the operator plans on beside the current window. The current window slides,
    /// so the newest closed window shares most of its steps with it; planned as an episode of
    /// its own it would count those steps twice, and weigh them by where in the window the poll
    /// fell.
    pub fn group_history(
        reports: &[LoadReport],
        max: usize,
        first_step: u64,
    ) -> Vec<Vec<Vec<f64>>> {
        let mut out: Vec<Vec<Vec<f64>>> = Self::group_windows(reports)
            .into_iter()
            .filter(|ep| ep.end_step <= first_step)
            .map(|ep| ep.logical_counts)
            .collect();
        if out.len() > max {
            out.drain(..out.len() - max);
        }
        out
    }
}

impl LoadReport {
    /// The oldest group step the current window holds: `window_start_step`, or, from a
    /// worker that does not report it, `window_size` steps before `step` (the generator's
    /// window; a window shortened by a remap starts later, which only leaves out more).
    pub fn current_window_start(&self, window_size: u64) -> u64 {
        self.window_start_step
            .unwrap_or_else(|| self.step.saturating_sub(window_size))
    }

    /// Sums the slot counts of several ranks' reports (the group's load).
    pub fn sum_slot_counts<'a>(reports: impl IntoIterator<Item = &'a LoadReport>) -> Vec<Vec<f64>> {
        let mut total: Vec<Vec<f64>> = Vec::new();
        for report in reports {
            if total.is_empty() {
                total = report.slot_counts.clone();
                continue;
            }
            for (acc, row) in total.iter_mut().zip(&report.slot_counts) {
                for (a, c) in acc.iter_mut().zip(row) {
                    *a += c;
                }
            }
        }
        total
    }

    /// Folds physical slot counts into logical expert counts (`[layer][expert]`).
    pub fn logical_load(slot_counts: &[Vec<f64>], placement: &PlacementDocument) -> Vec<Vec<f64>> {
        slot_counts
            .iter()
            .zip(&placement.phy2log)
            .map(|(counts, phy2log)| {
                let mut load = vec![0.0; placement.num_logical_experts];
                for (&count, &expert) in counts.iter().zip(phy2log) {
                    if let Some(l) = load.get_mut(expert as usize) {
                        *l += count;
                    }
                }
                load
            })
            .collect()
    }
}

/// Body of every 4xx/5xx answer from the worker API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    /// For a 409 to `POST /v1/remap`, what kind of conflict: [`CONFLICT_DIVERGED`] or
    /// [`CONFLICT_BUSY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// 409 reason: the rank serves or accepted a different placement under this generation number
/// or a newer one, so it cannot converge on the one requested. Someone else drove it (a split
/// leadership); the committed placement decides and the group must be restarted into it.
pub const CONFLICT_DIVERGED: &str = "Diverged";
/// 409 reason: another remap is in progress on this rank; ask again when it finishes.
pub const CONFLICT_BUSY: &str = "Busy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_short_stable_and_differ_per_token() {
        let id = token_id("abc");
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        // The file's trailing newline is not part of the token.
        assert_eq!(token_id("abc\n"), id);
        assert_ne!(token_id("abd"), id);
        // Not the token's plain hash: the id cannot stand in for a hash a client computed.
        assert!(!id.contains("ba7816bf"));
    }

    fn doc(phy2log: Vec<Vec<u32>>, experts: usize, ranks: usize) -> PlacementDocument {
        PlacementDocument {
            generation: 1,
            num_layers: phy2log.len(),
            num_logical_experts: experts,
            num_ranks: ranks,
            num_nodes: 1,
            phy2log,
        }
    }

    fn report(rank: usize, episodes: &[(u64, f64)]) -> LoadReport {
        LoadReport {
            rank,
            layer_generations: vec![0],
            window_steps: 0,
            window_start_step: None,
            step: 0,
            slot_counts: vec![vec![0.0; 2]],
            par: vec![1.0],
            history: episodes
                .iter()
                .map(|&(end_step, v)| LoadEpisode {
                    end_step,
                    steps: 10,
                    logical_counts: vec![vec![v, 1.0]],
                })
                .collect(),
        }
    }

    #[test]
    fn group_history_sums_the_windows_every_rank_has() {
        // Rank 1 restarted its history and lacks the window ending at 10.
        let reports = [
            report(0, &[(10, 1.0), (20, 2.0), (30, 3.0)]),
            report(1, &[(20, 5.0), (30, 7.0)]),
        ];
        let h = LoadEpisode::group_history(&reports, 8, 30);
        assert_eq!(h, vec![vec![vec![7.0, 2.0]], vec![vec![10.0, 2.0]]]);
        let newest = LoadEpisode::group_history(&reports, 1, 30);
        assert_eq!(newest, vec![vec![vec![10.0, 2.0]]]);
        assert!(LoadEpisode::group_history(&[], 4, 30).is_empty());
    }

    #[test]
    fn group_history_leaves_out_the_windows_the_current_one_overlaps() {
        // Windows of 10 steps; the current (sliding) window holds steps 25..35.
        let mut current = report(0, &[(10, 1.0), (20, 2.0), (30, 3.0)]);
        current.step = 35;
        current.window_start_step = Some(25);
        let start = current.current_window_start(10);
        assert_eq!(start, 25);
        let reports = [current.clone()];
        let h = LoadEpisode::group_history(&reports, 8, start);
        assert_eq!(h, vec![vec![vec![1.0, 1.0]], vec![vec![2.0, 1.0]]]);
        // At a close the current window is exactly the newest closed one: still left out.
        assert_eq!(LoadEpisode::group_history(&reports, 8, 20), h);
        assert_eq!(LoadEpisode::group_history(&reports, 8, 30).len(), 3);
        assert!(LoadEpisode::group_history(&reports, 8, 9).is_empty());
        // With the forward API a layer's window reaches back further than the window size.
        current.window_start_step = Some(12);
        assert_eq!(current.current_window_start(10), 12);
        assert_eq!(
            LoadEpisode::group_history(&[current.clone()], 8, 12).len(),
            1
        );
        // An older worker: the generator's window before `step`.
        current.window_start_step = None;
        assert_eq!(current.current_window_start(10), 25);
        assert_eq!(current.current_window_start(100), 0);
    }

    #[test]
    fn group_windows_match_windows_of_the_same_length_only() {
        let mut other = report(1, &[(20, 5.0)]);
        other.history[0].steps = 5;
        let reports = [report(0, &[(20, 2.0)]), other];
        assert!(LoadEpisode::group_windows(&reports).is_empty());
    }

    #[test]
    fn validate_accepts_a_consistent_placement() {
        assert_eq!(doc(vec![vec![0, 1, 2, 0]], 3, 2).validate(), Ok(()));
    }

    #[test]
    fn validate_names_the_unserved_expert() {
        let err = doc(vec![vec![0, 1, 1, 0]], 3, 2).validate().unwrap_err();
        assert!(err.contains("expert 2"), "{err}");
    }

    #[test]
    fn validate_rejects_uneven_slots_and_ragged_layers() {
        assert!(doc(vec![vec![0, 1, 2]], 3, 2).validate().is_err());
        assert!(
            doc(vec![vec![0, 1], vec![0, 1, 1, 0]], 2, 2)
                .validate()
                .is_err()
        );
        assert!(doc(vec![vec![0, 7]], 2, 1).validate().is_err());
    }

    #[test]
    fn logical_load_folds_replicas_and_sums_ranks() {
        let placement = doc(vec![vec![0, 1, 2, 0]], 3, 2);
        let a = LoadReport {
            rank: 0,
            layer_generations: vec![1],
            window_steps: 1,
            window_start_step: None,
            step: 1,
            slot_counts: vec![vec![1.0, 2.0, 3.0, 4.0]],
            par: vec![1.0],
            history: Vec::new(),
        };
        let b = LoadReport {
            rank: 1,
            ..a.clone()
        };
        let total = LoadReport::sum_slot_counts([&a, &b]);
        assert_eq!(total, vec![vec![2.0, 4.0, 6.0, 8.0]]);
        assert_eq!(
            LoadReport::logical_load(&total, &placement),
            vec![vec![10.0, 4.0, 6.0]]
        );
    }

    #[test]
    fn remap_request_round_trips_with_defaults() {
        let json = r#"{"placement":{"generation":2,"numLayers":1,"numLogicalExperts":2,
            "numRanks":1,"numNodes":1,"phy2log":[[1,0]]}}"#;
        let req: RemapRequest = serde_json::from_str(json).unwrap();
        assert_eq!(req.mode, RemapMode::Async);
        assert!(req.layers.is_empty());
        let back: RemapRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }
}
