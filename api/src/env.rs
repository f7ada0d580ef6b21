//! Environment variables through which the operator configures a worker pod.
//!
//! The worker accepts each as a command-line flag too (`moe-worker --help`); these names are
//! the ones its flags fall back to, and the ones the operator writes into the pod template.

/// EP rank of this process. In Kubernetes: the StatefulSet pod ordinal, taken from the
/// `apps.kubernetes.io/pod-index` label through the downward API.
pub const RANK: &str = "MOE_RANK";
/// Number of EP ranks in the group.
pub const WORLD_SIZE: &str = "MOE_WORLD_SIZE";
/// Ranks per node (GPUs per node), for transfer-source preference and hierarchical planning.
pub const RANKS_PER_NODE: &str = "MOE_RANKS_PER_NODE";
/// EP ranks one worker process runs as threads, one GPU each: consecutive ranks from its
/// first rank (`MOE_RANK`, or `MOE_PROCESS_INDEX` x `MOE_LOCAL_RANKS`).
pub const LOCAL_RANKS: &str = "MOE_LOCAL_RANKS";
/// Index of this worker process among the group's processes (in Kubernetes: the pod ordinal);
/// its first rank is this times `MOE_LOCAL_RANKS`. An alternative to `MOE_RANK`.
pub const PROCESS_INDEX: &str = "MOE_PROCESS_INDEX";
/// `host:port` of rank 0's rendezvous listener (the rank-0 pod's stable DNS name).
pub const LEADER_ADDR: &str = "MOE_LEADER_ADDR";
/// Port this rank listens on for rendezvous and (CPU backend) token exchange.
pub const COMM_PORT: &str = "MOE_COMM_PORT";
/// Port of the HTTP API and metrics.
pub const HTTP_PORT: &str = "MOE_HTTP_PORT";
/// Address this rank advertises to its peers (defaults to the pod IP).
pub const ADVERTISE_ADDR: &str = "MOE_ADVERTISE_ADDR";
/// Address the HTTP API (and the forward API) listen on (default: every address).
pub const LISTEN_ADDR: &str = "MOE_LISTEN_ADDR";
/// File holding the bearer token that mutating API calls must present.
pub const CONTROL_TOKEN_FILE: &str = "MOE_CONTROL_TOKEN_FILE";
/// File holding the committed placement document (mounted from the owned ConfigMap).
pub const PLACEMENT_FILE: &str = "MOE_PLACEMENT_FILE";
/// `cuda` or `cpu`.
pub const BACKEND: &str = "MOE_BACKEND";

/// Model shape.
pub const NUM_LAYERS: &str = "MOE_NUM_LAYERS";
pub const NUM_EXPERTS: &str = "MOE_NUM_EXPERTS";
pub const HIDDEN: &str = "MOE_HIDDEN";
pub const INTERMEDIATE: &str = "MOE_INTERMEDIATE";
pub const TOP_K: &str = "MOE_TOP_K";
pub const EXPERT_GROUPS: &str = "MOE_EXPERT_GROUPS";
pub const TOPK_GROUPS: &str = "MOE_TOPK_GROUPS";
/// `softmax` (Mixtral/Qwen style) or `sigmoid` (DeepSeek-V3 style, with grouped top-k).
pub const SCORING: &str = "MOE_SCORING";
pub const REDUNDANT_EXPERTS: &str = "MOE_REDUNDANT_EXPERTS";
/// What `spec.model` says of the checkpoint beyond its shape; set only when the spec sets it.
/// A worker loading a checkpoint refuses one that disagrees (exit code 2, the reason
/// `ModelMismatch` in its termination message); with synthetic weights it imitates the
/// architecture's gating.
pub const ARCHITECTURE: &str = "MOE_ARCHITECTURE";
pub const NORM_TOPK_PROB: &str = "MOE_NORM_TOPK_PROB";
pub const ROUTED_SCALING_FACTOR: &str = "MOE_ROUTED_SCALING_FACTOR";
pub const SHARED_EXPERTS: &str = "MOE_SHARED_EXPERTS";
/// `linear`, `round-robin`, or `file` (then [`PLACEMENT_FILE`] is read).
pub const INITIAL_PLACEMENT: &str = "MOE_INITIAL_PLACEMENT";

/// `synthetic:<seed>` or a directory of safetensors files.
pub const WEIGHTS: &str = "MOE_WEIGHTS";
/// Steps kept in the load-statistics window.
pub const STATS_WINDOW: &str = "MOE_STATS_WINDOW";

/// Where a group's batches come from: `generator` (the built-in synthetic traffic), `trace`
/// (a recorded routing trace) or `api` (rows sent by attention instances through the forward
/// API; see docs/forward-api.md).
pub const TRAFFIC: &str = "MOE_TRAFFIC";
/// File holding the bearer token that forward-API clients must present (a different Secret
/// from the control token). Unset: the forward API is open, for local use.
pub const CLIENT_TOKEN_FILE: &str = "MOE_CLIENT_TOKEN_FILE";
/// Port of the forward API when it should not share `MOE_HTTP_PORT` (0 or unset: it does).
/// With a separate port the control endpoints stay on the HTTP port, so a NetworkPolicy can
/// admit attention pods to one and only the operator to the other.
pub const FORWARD_PORT: &str = "MOE_FORWARD_PORT";
/// Most rows one forward request may carry (larger requests get 413).
pub const MAX_REQUEST_ROWS: &str = "MOE_MAX_REQUEST_ROWS";

/// Built-in traffic generator.
pub const TRAFFIC_TOKENS_PER_STEP: &str = "MOE_TRAFFIC_TOKENS_PER_STEP";
pub const TRAFFIC_SKEW: &str = "MOE_TRAFFIC_SKEW";
pub const TRAFFIC_DRIFT: &str = "MOE_TRAFFIC_DRIFT";
pub const TRAFFIC_SEED: &str = "MOE_TRAFFIC_SEED";
/// Steps per second the generator aims at (0: as fast as possible).
pub const TRAFFIC_STEPS_PER_SECOND: &str = "MOE_TRAFFIC_STEPS_PER_SECOND";
