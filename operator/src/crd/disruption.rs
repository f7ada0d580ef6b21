//! `spec.disruptionBudget`: the PodDisruptionBudget the operator keeps for the group.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Voluntary disruptions (node drains, evictions by the cluster autoscaler or descheduler) of
/// the group's pods. NCCL communicators do not survive a lost rank: evicting one pod restarts
/// the whole expert-parallel group (every rank reloads its weights). The operator therefore
/// keeps a PodDisruptionBudget with `maxUnavailable: 0` by default, so a drain waits for you
/// (delete or move the MoEDeployment, or raise `maxUnavailable`) instead of taking the group
/// down on its own schedule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Keep a PodDisruptionBudget `<name>` for the group's pods (owned by the MoEDeployment).
    /// false: none (drains evict freely; each eviction restarts the group).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Worker pods that voluntary disruptions may take at once. 0 (default): none, drains
    /// block on the group's nodes. 1 or more: a drain proceeds and the group restarts as a
    /// whole once per eviction wave.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4096))]
    pub max_unavailable: u32,
}

fn yes() -> bool {
    true
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: 0,
        }
    }
}
