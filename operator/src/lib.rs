//! The `MoEDeployment` resource and its controller.
//!
//! * [`crd`]: the resource types (group `moe-operator.github.io`, version `v1alpha1`), CEL rules.
//! * [`resources`]: desired owned objects (StatefulSet, Services, ConfigMap, Secrets, NetworkPolicy).
//! * [`conditions`], [`remap`]: status conditions and remap decisions, as pure functions.
//! * [`planning`]: the only module that calls the `eplb` planner library.
//! * [`workers`]: HTTP client of the worker ranks; [`pod_health`]: problems pods show.
//! * [`controller`]: the reconciler; [`expert_tier`]: its part for the forward API's Service,
//!   client token and the group's NetworkPolicy.
//! * [`ownership`]: no object of a fixed name is taken over from someone else.
//! * [`tokens`]: per-deployment tokens derived from one master key (no Secret is read back);
//!   [`token_secrets`]: the reconciler's part for them (create-only Secrets, token mismatches).
//! * [`leader`], [`metrics`], [`server`]: the operator process around it.
//! * [`api_client`]: the Kubernetes client, one request per call (no client-side retries).

pub mod api_client;
pub mod apply_refusal;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod expert_tier;
pub mod fleet;
pub mod group;
pub mod leader;
pub mod metrics;
pub mod ownership;
pub mod planning;
pub mod pod_creation;
pub mod pod_health;
/// Byte quantities (`spec.eplb.maxBytesPerRemap`), shared with `moectl backtest`.
pub use moe_api::quantity;
pub mod remap;
pub mod resources;
pub mod server;
pub mod token_secrets;
pub mod tokens;
pub mod workers;

pub use crd::{MoEDeployment, MoEDeploymentSpec, MoEDeploymentStatus};

/// The CRD as YAML (what `crdgen` prints and `crds/moedeployment.yaml` holds).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd::definition())
}
