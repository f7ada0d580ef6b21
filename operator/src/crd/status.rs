//! The `MoEDeployment` status: observed state, written by the operator only.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::serving::ServingStatus;

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoEDeploymentStatus {
    /// `metadata.generation` of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing`, `Rebalancing`, `Degraded`, and kstatus' `Ready`,
    /// `Reconciling`, `Stalled` (a map keyed by type: one entry per type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One word summary: `Pending`, `Running`, `Rebalancing`, `Restarting`, `Degraded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `ready/ranks`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(default)]
    pub ranks: u32,
    #[serde(default)]
    pub ready_ranks: u32,
    /// The redundant experts in use (the spec's or the computed default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redundant_experts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance: Option<ImbalanceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_remap: Option<RemapRecord>,
    /// The remap being executed, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remap: Option<RemapProgressStatus>,
    /// The `spec.remapRequest` value the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_remap_request: Option<String>,
    /// Hash of the spec fields whose change restarts the whole group (shape, EP size, image,
    /// the rollout annotation...); the operator's own defaults are not part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_hash: Option<String>,
    /// Set while pods run an older pod template than the operator's current one (its defaults
    /// changed, e.g. after an upgrade): running groups are not restarted for that; this says
    /// so, and how to apply it (annotation `moe-operator.github.io/rollout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_template: Option<String>,
    /// Times the operator restarted the whole group.
    #[serde(default)]
    pub group_restarts: u32,
    /// When the operator restarted the group after rank failures, within
    /// `spec.groupRestartPolicy.windowSeconds` (oldest first): the restart budget and backoff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_group_restarts: Vec<Time>,
    /// The last whole-group restart and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_group_restart: Option<GroupRestartRecord>,
    /// The current group's pod per rank as last seen: a rank whose pod is replaced or whose
    /// container restarts breaks the group's communicator and restarts the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_pods: Vec<RankPod>,
    /// The expert tier's endpoints and served rows, while the group serves the forward API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestartRecord {
    pub at: Time,
    /// `RankRestarted`, `RankLost`, `SpecChanged` or `RemapFailed`.
    pub reason: String,
    pub message: String,
}

/// A worker pod as the operator last saw it, under its first rank (with `ranksPerPod` > 1 the
/// pod also runs the next `ranksPerPod - 1` ranks).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankPod {
    pub rank: u32,
    pub uid: String,
    /// Sum of the pod's container restart counts.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Owned ConfigMap holding the committed placement.
    pub config_map: String,
    /// Generation committed in the ConfigMap.
    pub desired_generation: u64,
    /// Generation every layer of every ready rank serves (absent until workers report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayerImbalance {
    pub layer: u32,
    pub par: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImbalanceStatus {
    /// Worst per-layer peak-to-average rank load over the group.
    pub worst_par: f64,
    /// Mean per-layer PAR.
    pub mean_par: f64,
    /// Layers above the threshold (worst first, at most 8); the worst layer when none is.
    #[serde(default)]
    pub worst_layers: Vec<LayerImbalance>,
    /// Layers whose PAR exceeds `spec.eplb.imbalanceThreshold`.
    #[serde(default)]
    pub layers_over_threshold: u32,
    /// Window steps the statistics cover (minimum over ranks).
    #[serde(default)]
    pub window_steps: u64,
    pub measured_at: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemapRecord {
    pub generation: u64,
    /// `Threshold` or `Manual`.
    pub trigger: String,
    pub layers: Vec<u32>,
    #[serde(default)]
    pub experts_moved: u64,
    #[serde(default)]
    pub bytes_moved: u64,
    /// Worst PAR of the remapped layers when planned (measured).
    pub par_before: f64,
    /// Worst PAR of the remapped layers predicted by the planner on the same statistics.
    pub par_predicted: f64,
    /// Worst PAR of the remapped layers measured on statistics recorded under the new placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub par_after: Option<f64>,
    /// Statistics windows the plan was made on: the current one and the closed ones before it.
    /// Fewer than `spec.eplb.historyWindows` when the workers had not kept as many (the group
    /// started or restarted less than that many windows ago) or one did not answer (the
    /// `RemapStarted` event says which). Absent on a remap resumed from the placement alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_windows: Option<u32>,
    pub started_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// `Succeeded`, `Failed` or `Superseded` (the group restarted into the new placement).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemapProgressStatus {
    pub generation: u64,
    pub trigger: String,
    pub layers: Vec<u32>,
    pub layers_total: u32,
    /// Layers every rank has switched.
    pub layers_done: u32,
    /// Ranks that finished.
    pub ranks_done: u32,
    pub par_before: f64,
    pub par_predicted: f64,
    /// Statistics windows the plan was made on: the current one and the closed ones before it.
    /// Fewer than `spec.eplb.historyWindows` when the workers had not kept as many (the group
    /// started or restarted less than that many windows ago) or one did not answer (the
    /// `RemapStarted` event says which). Absent on a remap resumed from the placement alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_windows: Option<u32>,
    pub started_at: Time,
}
