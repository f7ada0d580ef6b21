//! The `MoEDeployment` custom resource (`moe-operator.github.io/v1alpha1`).
//!
//! Validation that the API server can do by itself lives in the schema: bounds, enums and CEL
//! rules (`x-kubernetes-validations`) whose messages name the field and the fix. What CEL cannot
//! see (the contents of a referenced static-map ConfigMap, the planner's name) is checked by the
//! operator and reported as a `Degraded` condition. [`MoEDeploymentSpec::validate`] mirrors the
//! CEL rules so that a resource that slipped past them (an old CRD, a test) never crashes the
//! controller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod serving;
pub use serving::{DEFAULT_FORWARD_PORT, DEFAULT_MAX_ROWS_PER_REQUEST, ServingSpec, ServingStatus};
mod disruption;
mod status;
mod validation;
mod worker_pod;
pub use disruption::DisruptionBudgetSpec;
pub use status::{
    GroupRestartRecord, ImbalanceStatus, LayerImbalance, MoEDeploymentStatus, PlacementStatus,
    RankPod, RemapProgressStatus, RemapRecord,
};
pub use validation::SpecError;
pub use worker_pod::{ProbeTiming, WorkerPodSpec, WorkerProbes};

/// API group of the resource. The project's GitHub organisation owns `moe-operator.github.io`.
pub const GROUP: &str = "moe-operator.github.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "MoEDeployment";

/// Longest `metadata.name` a MoEDeployment may have. The StatefulSet is named like the
/// resource and its pods carry the label `controller-revision-hash: <name>-<hash>` (hash up to
/// 10 characters, label values at most 63), so 52; `<name>-workers` (the headless Service, a
/// DNS-1035 label of at most 63) fits too.
pub const MAX_NAME_LENGTH: usize = 52;

/// The CustomResourceDefinition: the derived schema plus the rules on the whole object, which
/// the derive cannot attach to a `JsonSchema` spec (only `self.metadata.name` is visible there).
pub fn definition()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule;
    use kube::CustomResourceExt;
    let mut crd = MoEDeployment::crd();
    let name_rule = ValidationRule {
        rule: format!(
            "self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
        ),
        message: Some(format!(
            "metadata.name must be at most {MAX_NAME_LENGTH} characters of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (the operator names the StatefulSet, its pods and the <name>-workers Service after it): choose a shorter name"
        )),
        reason: Some("FieldValueInvalid".into()),
        ..Default::default()
    };
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema
                .x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(name_rule.clone());
            if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
                spec.x_kubernetes_validations
                    .get_or_insert_with(Vec::new)
                    .extend(serving::spec_rules());
            }
        }
    }
    crd
}

/// A group of expert-parallel worker ranks serving one Mixture-of-Experts model, with the
/// expert placement kept in balance by the operator.
#[allow(clippy::duplicated_attributes)] // several `printcolumn(type_ = ...)` entries
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "moe-operator.github.io",
    version = "v1alpha1",
    kind = "MoEDeployment",
    namespaced,
    shortname = "moed",
    status = "MoEDeploymentStatus",
    derive = "PartialEq",
    doc = "A group of expert-parallel Mixture-of-Experts worker ranks whose expert placement moe-operator keeps in balance.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready ranks / ranks"
    ),
    printcolumn(
        name = "PAR",
        type_ = "number",
        json_path = ".status.imbalance.worstPar",
        description = "Worst per-layer peak-to-average rank load"
    ),
    printcolumn(
        name = "Placement",
        type_ = "integer",
        json_path = ".status.placement.appliedGeneration",
        description = "Placement generation served by every rank"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.placement.desiredGeneration",
        priority = 1,
        description = "Committed placement generation"
    ),
    printcolumn(
        name = "Served/s",
        type_ = "number",
        json_path = ".status.serving.servedRowsPerSecond",
        description = "Rows per second served through the forward API"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.expertParallel.redundantExperts) || self.expertParallel.ranks < 1 || (self.model.numExperts + self.expertParallel.redundantExperts) % self.expertParallel.ranks == 0",
        "message": "spec.model.numExperts + spec.expertParallel.redundantExperts must be divisible by spec.expertParallel.ranks (every rank holds the same number of expert slots): change redundantExperts, or leave it unset to get the smallest valid value",
        "fieldPath": ".expertParallel.redundantExperts",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.expertParallel.redundantExperts) || self.expertParallel.redundantExperts <= self.model.numExperts * (self.expertParallel.ranks - 1)",
        "message": "spec.expertParallel.redundantExperts is larger than the replicas the ranks can hold (at most numExperts * (ranks - 1), one replica of an expert per rank): lower it",
        "fieldPath": ".expertParallel.redundantExperts",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct MoEDeploymentSpec {
    /// Shape of the Mixture-of-Experts model.
    pub model: ModelSpec,
    /// Where the expert weights come from.
    #[serde(default)]
    pub weights: WeightsSpec,
    /// Expert-parallel group: one GPU per rank, `ranksPerPod` ranks per worker pod.
    pub expert_parallel: ExpertParallelSpec,
    /// Initial placement of experts onto slots (generation 0 of the committed placement).
    #[serde(default)]
    pub placement: PlacementSpec,
    /// Expert-parallel load balancing: when and how the operator moves experts.
    #[serde(default)]
    pub eplb: EplbSpec,
    /// Manual remap request: change this value (any string, e.g. a date) to ask for one remap
    /// now, even below the threshold. The operator records the value it handled in
    /// `status.lastHandledRemapRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub remap_request: Option<String>,
    /// Worker pod settings.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Built-in synthetic traffic generator of the workers, for burn-in and benchmarks (unset
    /// fields keep the worker's defaults). Setting it turns serving off unless
    /// `spec.serving.enabled` says otherwise (which admission refuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficSpec>,
    /// The forward API for attention instances (the expert tier): port, request bound, who may
    /// call. Unset: defaults, serving on for a checkpoint without `spec.traffic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
    /// How the operator restarts the whole EP group after a rank fails (a rank's container
    /// restarted or its pod was replaced): NCCL communicators do not survive a lost rank.
    #[serde(default)]
    pub group_restart_policy: GroupRestartPolicy,
    /// The PodDisruptionBudget of the group: an eviction of one rank restarts the whole group.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,
}

/// Whole-group restarts after rank failures: a budget within a sliding window, and an
/// exponential backoff between successive restarts. Restarts caused by a spec change are
/// neither delayed nor counted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.initialBackoffSeconds <= self.maxBackoffSeconds",
        "message": "spec.groupRestartPolicy.initialBackoffSeconds must be at most maxBackoffSeconds: lower initialBackoffSeconds or raise maxBackoffSeconds",
        "fieldPath": ".initialBackoffSeconds",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct GroupRestartPolicy {
    /// Group restarts after rank failures allowed within `windowSeconds`; once used up the
    /// deployment is `Degraded/RestartBudgetExhausted` and the group is left alone until the
    /// oldest restart leaves the window. 0: never restart the group after a rank failure.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: u32,
    /// The sliding window of the restart budget, in seconds.
    #[serde(default = "default_restart_window")]
    #[schemars(range(min = 1, max = 604800))]
    pub window_seconds: u32,
    /// Delay before the second restart within the window, doubled for each further one.
    /// The first restart after a quiet window is immediate.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 0, max = 86400))]
    pub initial_backoff_seconds: u32,
    /// Upper bound of the backoff delay.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_backoff_seconds: u32,
}

fn default_max_restarts() -> u32 {
    5
}
fn default_restart_window() -> u32 {
    3600
}
fn default_initial_backoff() -> u32 {
    10
}
fn default_max_backoff() -> u32 {
    300
}

impl Default for GroupRestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            window_seconds: default_restart_window(),
            initial_backoff_seconds: default_initial_backoff(),
            max_backoff_seconds: default_max_backoff(),
        }
    }
}

/// Router scoring function.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen).
    #[default]
    Softmax,
    /// Sigmoid with grouped top-k (DeepSeek-V3).
    Sigmoid,
}

impl Scoring {
    pub fn env_value(self) -> &'static str {
        match self {
            Scoring::Softmax => "softmax",
            Scoring::Sigmoid => "sigmoid",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.topK <= self.numExperts",
        "message": "spec.model.topK must be at most spec.model.numExperts: lower topK",
        "fieldPath": ".topK",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.expertGroups < 1 || self.numExperts % self.expertGroups == 0",
        "message": "spec.model.numExperts must be divisible by spec.model.expertGroups: set expertGroups to a divisor of numExperts (1 disables grouping)",
        "fieldPath": ".expertGroups",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.topkGroups <= self.expertGroups",
        "message": "spec.model.topkGroups must be at most spec.model.expertGroups: lower topkGroups",
        "fieldPath": ".topkGroups",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct ModelSpec {
    /// MoE layers.
    #[schemars(range(min = 1, max = 1024))]
    pub num_layers: u32,
    /// Routed (logical) experts per layer.
    #[schemars(range(min = 1, max = 65536))]
    pub num_experts: u32,
    /// Hidden size.
    #[schemars(range(min = 1, max = 1048576))]
    pub hidden: u32,
    /// Expert intermediate (FFN) size.
    #[schemars(range(min = 1, max = 1048576))]
    pub intermediate: u32,
    /// Experts each token is routed to.
    #[schemars(range(min = 1, max = 1024))]
    pub top_k: u32,
    /// Expert groups for grouped top-k routing and hierarchical placement (1: no grouping).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 65536))]
    pub expert_groups: u32,
    /// Groups each token may use (grouped top-k).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 65536))]
    pub topk_groups: u32,
    #[serde(default)]
    pub scoring: Scoring,
    /// The checkpoint's architecture (`architectures[0]` of its config.json, e.g.
    /// `DeepseekV3ForCausalLM`). With checkpoint weights the workers refuse a checkpoint of
    /// another architecture; with synthetic weights they imitate its gating. `moectl model
    /// inspect` prints this stanza for a checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub architecture: Option<String>,
    /// Whether the top-k weights are renormalised to sum to one (config.json `norm_topk_prob`).
    /// Unset: the architecture's own rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Factor applied to the routed experts' weights (`routed_scaling_factor`; DeepSeek-V3:
    /// 2.5). Unset: the architecture's own value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub routed_scaling_factor: Option<f64>,
    /// Shared experts every token goes through beside the routed ones (0: none). They are not
    /// placed by EPLB: every rank holds them. Unset: the checkpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub shared_experts: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Weights of the experts: at most one source; neither means synthetic weights with seed 0.
///
/// The default is the empty object rather than `{synthetic: {seed: 0}}`: a stored default
/// would be merged into a later apply that sets `persistentVolumeClaim` and make it carry two
/// sources.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.synthetic) && has(self.persistentVolumeClaim))",
        "message": "set at most one of spec.weights.synthetic or spec.weights.persistentVolumeClaim (neither: synthetic weights with seed 0)"
    }
]))]
pub struct WeightsSpec {
    /// Deterministic weights generated from a seed (benchmarks, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticWeights>,
    /// A directory of safetensors files on a PersistentVolumeClaim, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcWeights>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticWeights {
    #[serde(default)]
    pub seed: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcWeights {
    /// Name of the PersistentVolumeClaim in the deployment's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume that holds the safetensors files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.ranksPerNode) || self.ranksPerNode < 1 || self.ranks % self.ranksPerNode == 0",
        "message": "spec.expertParallel.ranks must be a multiple of spec.expertParallel.ranksPerNode: change ranksPerNode to a divisor of ranks",
        "fieldPath": ".ranksPerNode",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.ranksPerPod) || self.ranksPerPod < 1 || self.ranks % self.ranksPerPod == 0",
        "message": "spec.expertParallel.ranks must be a multiple of spec.expertParallel.ranksPerPod: change ranksPerPod to a divisor of ranks",
        "fieldPath": ".ranksPerPod",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.ranksPerPod) || !has(self.ranksPerNode) || self.ranksPerPod < 1 || self.ranksPerNode % self.ranksPerPod == 0",
        "message": "spec.expertParallel.ranksPerNode must be a multiple of spec.expertParallel.ranksPerPod: a pod cannot span nodes",
        "fieldPath": ".ranksPerPod",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct ExpertParallelSpec {
    /// Expert-parallel size: worker ranks (one GPU each; `ranksPerPod` of them per pod). At
    /// least 1.
    #[schemars(range(min = 1, max = 4096))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1", "message": "spec.expertParallel.ranks must be at least 1: set the number of GPUs (ranks) of the group"}
    ]))]
    pub ranks: u32,
    /// Ranks (GPUs) per node, for hierarchical placement and transfer-source preference.
    /// Default: all ranks on one level (`ranks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub ranks_per_node: Option<u32>,
    /// Ranks (GPUs) per worker pod. One worker process runs them as threads, so NCCL reaches
    /// the pod's GPUs over NVLink; ranks in different pods on one host use NCCL's network
    /// transport. Must divide `ranks` (and `ranksPerNode`). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub ranks_per_pod: Option<u32>,
    /// Redundant expert slots per layer (replicas of hot experts). Unset: the smallest number
    /// that makes `numExperts + redundantExperts` divisible by `ranks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 65536))]
    pub redundant_experts: Option<u32>,
}

/// Initial expert placement strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PlacementStrategy {
    /// Expert `e` on rank `e / (E / G)` (contiguous blocks).
    Linear,
    /// Expert `e` on rank `e % G`: spreads the often-hot low-numbered experts.
    #[default]
    RoundRobin,
    /// A placement computed offline, read from a ConfigMap (vllm-ascend expert-map JSON).
    Static,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.strategy != 'Static' || has(self.staticMap)",
        "message": "spec.placement.staticMap is required when spec.placement.strategy is Static: reference the ConfigMap that holds the expert map",
        "fieldPath": ".staticMap",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "self.strategy == 'Static' || !has(self.staticMap)",
        "message": "spec.placement.staticMap is only read with strategy Static: set strategy to Static or remove staticMap",
        "fieldPath": ".staticMap",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct PlacementSpec {
    #[serde(default)]
    pub strategy: PlacementStrategy,
    /// ConfigMap (same namespace) holding an expert map in vllm-ascend's JSON format
    /// (`{"moe_layer_count": L, "layer_list": [...]}`). Its shape must match the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_map: Option<ConfigMapKeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the ConfigMap's data.
    #[serde(default = "default_static_map_key")]
    pub key: String,
}

pub fn default_static_map_key() -> String {
    "expert_map.json".into()
}

/// How a remap moves weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RemapMode {
    /// Layer by layer while serving continues.
    #[default]
    Async,
    /// Pause serving, move, resume.
    StopTheWorld,
}

impl From<RemapMode> for moe_api::RemapMode {
    fn from(m: RemapMode) -> Self {
        match m {
            RemapMode::Async => moe_api::RemapMode::Async,
            RemapMode::StopTheWorld => moe_api::RemapMode::StopTheWorld,
        }
    }
}

/// Expert-parallel load balancing. Changes here apply without restarting workers (except
/// `windowSteps`, which workers read at start; see docs/operator.md).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.imbalanceThreshold > 1.0",
        "message": "spec.eplb.imbalanceThreshold must be above 1.0 (a PAR of 1.0 is perfect balance): use e.g. 1.2",
        "fieldPath": ".imbalanceThreshold",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.hysteresis >= 0.0 && self.imbalanceThreshold - self.hysteresis >= 1.0",
        "message": "spec.eplb.hysteresis must be at least 0 and imbalanceThreshold - hysteresis at least 1.0: lower hysteresis",
        "fieldPath": ".hysteresis",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct EplbSpec {
    /// Automatic remaps when layers drift above the threshold. Manual requests
    /// (`spec.remapRequest`) are honoured even when this is false.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Stop all remaps (automatic and manual); statistics are still published.
    #[serde(default)]
    pub paused: bool,
    /// Planner algorithm of the eplb crate: `joint` (default), `greedy`, `greedy-global` or
    /// `incremental`.
    #[serde(default = "default_algorithm")]
    #[schemars(schema_with = "algorithm_schema")]
    pub algorithm: String,
    /// Steps kept in each worker's load-statistics window (vLLM `window_size`).
    #[serde(default = "default_window")]
    #[schemars(range(min = 1, max = 1000000))]
    pub window_steps: u32,
    /// Minimum time between two remaps, in seconds: from the end of one (the last remap's
    /// `finishedAt`) to the start of the next.
    #[serde(default = "default_replan_interval")]
    #[schemars(range(min = 0, max = 604800))]
    pub replan_interval_seconds: u32,
    /// How often the operator reads the workers' statistics, in seconds.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: u32,
    /// A layer whose peak-to-average rank load (PAR) exceeds this triggers a remap.
    #[serde(default = "default_threshold")]
    #[schemars(range(max = 1000.0))]
    pub imbalance_threshold: f64,
    /// Once triggered, layers above `imbalanceThreshold - hysteresis` are rebalanced too, and
    /// a remap goes ahead only if the plan lowers some layer's PAR by at least `hysteresis`
    /// (no flapping; the other improved layers ride along); under `maxMovesPerLayer` or
    /// `maxBytesPerRemap`, a capped step toward a plan that does needs its share (the slots it
    /// moves over the plan's).
    #[serde(default = "default_hysteresis")]
    #[schemars(range(max = 100.0))]
    pub hysteresis: f64,
    /// Layers moved by one remap at most (worst first).
    #[serde(default = "default_max_layers")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_layers_per_remap: u32,
    /// Expert weight bytes moved by one remap at most (a quantity, e.g. `8Gi`), the worst layers
    /// first; each layer's plan also moves no more than this holds. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "isQuantity(string(self)) && quantity(string(self)).isInteger() && quantity(string(self)).isGreaterThan(quantity('0'))",
            "message": "spec.eplb.maxBytesPerRemap must be a positive whole number of bytes as a Kubernetes quantity (e.g. 8Gi, 512Mi, 1000000000): fix the value or remove it for no limit",
            "reason": "FieldValueInvalid"
        }
    ]))]
    pub max_bytes_per_remap: Option<Quantity>,
    /// Slots changed per layer at most (unset: planner's choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_moves_per_layer: Option<u32>,
    /// Statistics windows the planner sees: the current one plus up to `historyWindows - 1`
    /// closed windows before it (each `windowSteps` steps, kept by the workers), planned as
    /// episodes so a placement holds up as load drifts. 1: the current window only. The
    /// current window slides, so the newest closed window, which shares most of its steps, is
    /// not one of them; the workers keep 16, so at most 15 are used (16 windows in all).
    #[serde(default = "default_history_windows")]
    #[schemars(range(min = 1, max = 17))]
    pub history_windows: u32,
    /// Window steps a statistics window must hold before it is trusted for planning.
    #[serde(default = "default_min_window")]
    #[schemars(range(min = 0, max = 1000000))]
    pub min_window_steps: u32,
    #[serde(default)]
    pub mode: RemapMode,
}

/// The planners `spec.eplb.algorithm` may name: eplb's, plus its `greedy-global` baseline (the
/// schema's enum, and the names the controller suggests).
pub const ALGORITHMS: [&str; 4] = ["joint", "greedy", "greedy-global", "incremental"];

/// The extended resource of one GPU, as the NVIDIA device plugin advertises it.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

fn yes() -> bool {
    true
}

/// `eplb.algorithm` as an enum of the planners the operator can run, so a typo is rejected at
/// admission with the list of valid names (generated from [`ALGORITHMS`], the one list the
/// controller also checks against).
fn algorithm_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ALGORITHMS,
    })
}

pub fn default_algorithm() -> String {
    eplb::DEFAULT_ALGORITHM.into()
}
fn default_window() -> u32 {
    1000
}
fn default_replan_interval() -> u32 {
    300
}
fn default_poll_interval() -> u32 {
    15
}
fn default_threshold() -> f64 {
    1.2
}
fn default_hysteresis() -> f64 {
    0.05
}
fn default_max_layers() -> u32 {
    8
}
fn default_history_windows() -> u32 {
    4
}
fn default_min_window() -> u32 {
    100
}

impl Default for EplbSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            paused: false,
            algorithm: default_algorithm(),
            window_steps: default_window(),
            replan_interval_seconds: default_replan_interval(),
            poll_interval_seconds: default_poll_interval(),
            imbalance_threshold: default_threshold(),
            hysteresis: default_hysteresis(),
            max_layers_per_remap: default_max_layers(),
            max_bytes_per_remap: None,
            max_moves_per_layer: None,
            min_window_steps: default_min_window(),
            history_windows: default_history_windows(),
            mode: RemapMode::Async,
        }
    }
}

/// Compute backend of the workers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Backend {
    /// One NVIDIA GPU per rank (`nvidia.com/gpu: 1` unless resources say otherwise).
    #[default]
    Cuda,
    /// CPU reference backend (tests, laptops): no GPU is requested.
    Cpu,
}

impl Backend {
    pub fn env_value(self) -> &'static str {
        match self {
            Backend::Cuda => "cuda",
            Backend::Cpu => "cpu",
        }
    }
}

/// Environment variables the operator sets from `spec.expertParallel` and `spec.worker` to
/// place ranks; a `worker.env` entry would desynchronise the operator's view (endpoints, ready
/// ranks) from what the pods run, so admission refuses them.
pub const PLACED_BY_OPERATOR: [&str; 7] = [
    moe_api::env::RANK,
    moe_api::env::PROCESS_INDEX,
    moe_api::env::LOCAL_RANKS,
    moe_api::env::WORLD_SIZE,
    moe_api::env::HTTP_PORT,
    moe_api::env::COMM_PORT,
    moe_api::env::FORWARD_PORT,
];

/// CEL rules of `spec.worker` built from Rust constants (the env names above), which a
/// `schemars(extend(...))` literal could not reference.
fn worker_rules(schema: &mut schemars::Schema) {
    let names = PLACED_BY_OPERATOR
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut rules = serde_json::json!([
            {
                "rule": "self.httpPort != self.commPort",
                "message": "spec.worker.httpPort and spec.worker.commPort must differ (the HTTP API and the rendezvous listen on separate ports): change one of them",
                "fieldPath": ".commPort",
                "reason": "FieldValueInvalid"
            },
            {
                "rule": format!("!has(self.env) || self.env.all(e, !(e.name in [{names}]))"),
                "message": format!(
                    "spec.worker.env must not set {}: the operator sets them from spec.expertParallel and spec.worker (ranks, ranksPerPod, httpPort, commPort) and spec.serving.port; remove them from worker.env",
                    PLACED_BY_OPERATOR.join(", ")
                ),
                "fieldPath": ".env",
                "reason": "FieldValueForbidden"
            }
    ]);
    if let Some(list) = rules.as_array_mut() {
        list.extend(worker_pod::cel_rules());
    }
    schema.insert("x-kubernetes-validations".into(), rules);
    worker_pod::bound_strings(schema);
}

/// Worker pod settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = worker_rules)]
pub struct WorkerSpec {
    /// Worker image. Unset: the operator's default (`MOE_OPERATOR_WORKER_IMAGE`, else
    /// `ghcr.io/moe-operator/moe-worker:<operator version>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub backend: Backend,
    /// Container resources. Unset: the operator's default (`MOE_OPERATOR_WORKER_RESOURCES`).
    /// With the Cuda backend, `nvidia.com/gpu: 1` is added to the limits unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Extra environment; an entry named like one the operator sets replaces it (except the
    /// variables that place ranks, which are refused). At most 256 entries, which bounds the
    /// cost of the CEL rule over them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub env: Option<Vec<EnvVar>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Port of the worker HTTP API (health, metrics, statistics, remap).
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: u16,
    /// Port of the rendezvous / token-exchange listener.
    #[serde(default = "default_comm_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub comm_port: u16,
    /// Pod-level settings: scheduling, pulls, labels, volumes, `/dev/shm`, probes, grace,
    /// security-context overrides (see [`WorkerPodSpec`]).
    #[serde(flatten)]
    pub pod: WorkerPodSpec,
}

pub fn default_image() -> String {
    concat!(
        "ghcr.io/moe-operator/moe-worker:",
        env!("CARGO_PKG_VERSION")
    )
    .into()
}
fn default_http_port() -> u16 {
    8080
}
fn default_comm_port() -> u16 {
    29500
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            command: None,
            args: None,
            backend: Backend::Cuda,
            resources: None,
            node_selector: None,
            tolerations: None,
            env: None,
            priority_class_name: None,
            http_port: default_http_port(),
            comm_port: default_comm_port(),
            pod: WorkerPodSpec::default(),
        }
    }
}

/// The workers' built-in traffic generator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16777216))]
    pub tokens_per_step: Option<u32>,
    /// Zipf-like skew of expert popularity (0: uniform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub skew: Option<f64>,
    /// How fast the hot experts drift, per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub drift: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Steps per second to aim at (0: as fast as possible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub steps_per_second: Option<f64>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_spec() -> MoEDeploymentSpec {
        MoEDeploymentSpec {
            model: ModelSpec {
                num_layers: 4,
                num_experts: 16,
                hidden: 64,
                intermediate: 32,
                top_k: 2,
                expert_groups: 1,
                topk_groups: 1,
                scoring: Scoring::Softmax,
                architecture: None,
                norm_topk_prob: None,
                routed_scaling_factor: None,
                shared_experts: None,
            },
            weights: WeightsSpec::default(),
            expert_parallel: ExpertParallelSpec {
                ranks: 4,
                ranks_per_node: None,
                ranks_per_pod: None,
                redundant_experts: Some(4),
            },
            placement: PlacementSpec::default(),
            eplb: EplbSpec::default(),
            remap_request: None,
            worker: WorkerSpec::default(),
            traffic: None,
            serving: None,
            group_restart_policy: GroupRestartPolicy::default(),
            disruption_budget: DisruptionBudgetSpec::default(),
        }
    }

    #[test]
    fn sample_is_valid_and_defaults_fill_in() {
        sample_spec().validate().unwrap();
        let json = serde_json::json!({
            "model": {"numLayers": 2, "numExperts": 8, "hidden": 16, "intermediate": 8, "topK": 2},
            "expertParallel": {"ranks": 2}
        });
        let spec: MoEDeploymentSpec = serde_json::from_value(json).unwrap();
        assert_eq!(spec.eplb, EplbSpec::default());
        assert_eq!(spec.placement.strategy, PlacementStrategy::RoundRobin);
        assert_eq!(spec.worker.http_port, 8080);
        assert_eq!(spec.model.expert_groups, 1);
        spec.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        let mut s = sample_spec();
        s.expert_parallel.redundant_experts = Some(3);
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.expertParallel.redundantExperts"
        );
        let mut s = sample_spec();
        s.model.top_k = 17;
        assert_eq!(s.validate().unwrap_err().field, "spec.model.topK");
        let mut s = sample_spec();
        s.eplb.imbalance_threshold = 1.0;
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.eplb.imbalanceThreshold"
        );
        let mut s = sample_spec();
        s.placement.strategy = PlacementStrategy::Static;
        assert_eq!(s.validate().unwrap_err().field, "spec.placement.staticMap");
        let mut s = sample_spec();
        s.expert_parallel.ranks = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.expertParallel.ranks");
        let mut s = sample_spec();
        s.eplb.max_bytes_per_remap = Some(Quantity("lots".into()));
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.eplb.maxBytesPerRemap"
        );
    }

    #[test]
    fn ranks_per_pod_must_fit_ranks_nodes_and_ports() {
        let field = "spec.expertParallel.ranksPerPod";
        let mut s = sample_spec();
        s.expert_parallel.ranks_per_pod = Some(2);
        s.validate().unwrap();
        assert_eq!((s.ranks_per_pod(), s.num_pods()), (2, 2));
        s.expert_parallel.ranks_per_pod = Some(3);
        assert_eq!(s.validate().unwrap_err().field, field);
        s.expert_parallel.ranks_per_pod = Some(2);
        s.expert_parallel.ranks_per_node = Some(1);
        assert_eq!(s.validate().unwrap_err().field, field);
        s.expert_parallel.ranks_per_node = None;
        s.worker.http_port = 65535;
        assert_eq!(s.validate().unwrap_err().field, field);
        // httpPort 29499..29500 would overlap commPort 29500..29501.
        s.worker.http_port = 29499;
        assert_eq!(s.validate().unwrap_err().field, field);
        s.worker.http_port = 8080;
        s.validate().unwrap();
        // A GPU limit other than one per rank.
        let mut limits = std::collections::BTreeMap::new();
        limits.insert("nvidia.com/gpu".to_string(), Quantity("1".into()));
        s.worker.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        });
        assert_eq!(s.validate().unwrap_err().field, "spec.worker.resources");
        assert_eq!(
            (sample_spec().ranks_per_pod(), sample_spec().num_pods()),
            (1, 4)
        );
    }

    #[test]
    fn worker_env_cannot_place_ranks() {
        let mut s = sample_spec();
        s.worker.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: moe_api::env::LOCAL_RANKS.into(),
            value: Some("2".into()),
            ..Default::default()
        }]);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.worker.env");
        assert!(e.message.contains("MOE_LOCAL_RANKS"), "{}", e.message);
    }
}
