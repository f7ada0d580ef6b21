//! The worker's flags: the command line (`Args`, each flag with its environment variable) and
//! the choices it offers. Validated into a [`super::Config`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use moe_api::env as api_env;

/// Worker-only environment variables (not part of the operator contract).
pub mod env {
    /// Routing trace to replay instead of the generator (JSON lines, see docs/worker.md).
    pub const TRAFFIC_TRACE: &str = "MOE_TRAFFIC_TRACE";
    /// Where to write the recorded expert-load history in the `moectl` load format.
    pub const LOAD_HISTORY_FILE: &str = "MOE_LOAD_HISTORY_FILE";
    /// Steps folded into one window entry of the load history.
    pub const LOAD_HISTORY_STEPS: &str = "MOE_LOAD_HISTORY_STEPS";
    /// Stop after this many steps (0: run until terminated).
    pub const MAX_STEPS: &str = "MOE_MAX_STEPS";
    /// Seconds the group may take to form before the process gives up.
    pub const RENDEZVOUS_TIMEOUT: &str = "MOE_RENDEZVOUS_TIMEOUT_SECONDS";
    /// Seconds a peer may stay silent inside a collective before the rank gives up.
    pub const COMM_TIMEOUT: &str = "MOE_COMM_TIMEOUT_SECONDS";
    /// `text` or `json`.
    pub const LOG_FORMAT: &str = "MOE_LOG_FORMAT";
    /// Model family whose gating synthetic weights imitate (or that a checkpoint must be).
    pub const FAMILY: &str = "MOE_MODEL_FAMILY";
    /// Seconds a forward-API request may wait in the queue before it is answered 503.
    pub const FORWARD_WAIT: &str = "MOE_FORWARD_WAIT_SECONDS";
    /// Milliseconds an asynchronous remap spends at least on each layer.
    pub const REMAP_LAYER_DELAY: &str = "MOE_REMAP_LAYER_DELAY_MS";
}

/// Where a group's batches come from (`--traffic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrafficMode {
    /// The built-in synthetic generator (burn-in, benchmarks).
    Generator,
    /// Replay `--traffic-trace`.
    Trace,
    /// Serve the forward API (docs/forward-api.md).
    Api,
}

impl TrafficMode {
    pub fn name(self) -> &'static str {
        match self {
            TrafficMode::Generator => "generator",
            TrafficMode::Trace => "trace",
            TrafficMode::Api => "api",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a GPU and the CUDA libraries are present, CPU otherwise.
    Auto,
    Cuda,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scoring {
    /// Softmax over all experts, top-k, renormalised (Mixtral / Qwen style).
    Softmax,
    /// Sigmoid scores with grouped top-k (DeepSeek-V3 style).
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitialPlacement {
    Linear,
    RoundRobin,
    /// Read the placement document (or a vllm-ascend expert map) from `--placement-file`.
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `moe-worker`: one expert-parallel rank.
#[derive(Debug, Clone, Parser)]
#[command(name = "moe-worker", version, about, long_about = None)]
pub struct Args {
    /// EP rank of this process (in Kubernetes: the StatefulSet pod ordinal).
    #[arg(long, env = api_env::RANK, default_value_t = 0)]
    pub rank: usize,
    /// Number of EP ranks in the group.
    #[arg(long, env = api_env::WORLD_SIZE, default_value_t = 1)]
    pub world_size: usize,
    /// EP ranks this process runs, as threads with one GPU each: ranks R .. R+N-1 where R is
    /// --rank (or --process-index x N); rank R+i listens on --comm-port + i and --http-port + i
    /// (ports 0 stay 0). Several ranks in one process keep NCCL inside one process, where it
    /// reaches the other GPUs over NVLink even when pods would not.
    #[arg(long, env = api_env::LOCAL_RANKS, default_value_t = 1)]
    pub local_ranks: usize,
    /// Index of this process among the group's processes (in Kubernetes: the pod ordinal):
    /// its first rank is this times --local-ranks. Give this or --rank, not both.
    #[arg(long, env = api_env::PROCESS_INDEX)]
    pub process_index: Option<usize>,
    /// Ranks (GPUs) per node; transfers prefer sources on the same node. Default: world size.
    #[arg(long, env = api_env::RANKS_PER_NODE)]
    pub ranks_per_node: Option<usize>,
    /// `host:port` (or `host`, then --comm-port is used) of rank 0's rendezvous listener.
    /// Required when --world-size is more than 1. DNS names are resolved (and retried) at start.
    #[arg(long, env = api_env::LEADER_ADDR)]
    pub leader_addr: Option<String>,
    /// Port this rank listens on for rendezvous and peer traffic (0: any free port; not for rank 0).
    #[arg(long, env = api_env::COMM_PORT, default_value_t = 29500)]
    pub comm_port: u16,
    /// Port of the HTTP API and /metrics (0: any free port).
    #[arg(long, env = api_env::HTTP_PORT, default_value_t = 8080)]
    pub http_port: u16,
    /// Address this rank advertises to its peers and binds its comm listener to (the pod IP).
    /// Default: bind all interfaces and advertise the address this rank reaches rank 0 from.
    #[arg(long, env = api_env::ADVERTISE_ADDR)]
    pub advertise_addr: Option<String>,
    /// Address the HTTP API (and the forward API) listen on. Default: every address of
    /// --advertise-addr's family (0.0.0.0, or :: for IPv6), loopback included, which
    /// `kubectl port-forward` connects to inside the pod. Workers that share one network
    /// namespace on the same ports (the e2e kubelet stand-in) give their own address.
    #[arg(long, env = api_env::LISTEN_ADDR)]
    pub listen_addr: Option<String>,
    /// File holding the bearer token mutating API calls must present. Without it
    /// POST /v1/remap is refused (401).
    #[arg(long, env = api_env::CONTROL_TOKEN_FILE)]
    pub control_token_file: Option<PathBuf>,
    /// Committed placement document (JSON, or a vllm-ascend expert map). When the file exists
    /// it wins over --initial-placement, so a restarted group loads the last committed placement.
    #[arg(long, env = api_env::PLACEMENT_FILE)]
    pub placement_file: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, env = api_env::BACKEND, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// MoE layers (synthetic weights; a checkpoint's config.json gives them, and a flag that
    /// disagrees with it is an error). Default 4.
    #[arg(long, env = api_env::NUM_LAYERS)]
    pub num_layers: Option<usize>,
    /// Routed (logical) experts per layer. Default 16.
    #[arg(long, env = api_env::NUM_EXPERTS)]
    pub num_experts: Option<usize>,
    /// Hidden size. Default 128.
    #[arg(long, env = api_env::HIDDEN)]
    pub hidden: Option<usize>,
    /// Expert intermediate size. Default 256.
    #[arg(long, env = api_env::INTERMEDIATE)]
    pub intermediate: Option<usize>,
    /// Experts per token. Default 2.
    #[arg(long, env = api_env::TOP_K)]
    pub top_k: Option<usize>,
    /// Expert groups for grouped top-k (1: no grouping). Default 1.
    #[arg(long, env = api_env::EXPERT_GROUPS)]
    pub expert_groups: Option<usize>,
    /// Groups each token may choose experts from (grouped top-k). Default 1.
    #[arg(long, env = api_env::TOPK_GROUPS)]
    pub topk_groups: Option<usize>,
    /// Router scoring function. Default softmax (sigmoid with --family deepseek_v3).
    #[arg(long, env = api_env::SCORING, value_enum)]
    pub scoring: Option<Scoring>,
    /// Model family: synthetic weights imitate its gating and shared experts (qwen3_moe,
    /// qwen2_moe, mixtral, deepseek_v2, deepseek_v3); with a checkpoint, the family it must be.
    #[arg(long, env = env::FAMILY)]
    pub family: Option<String>,
    /// What spec.model says of the checkpoint (the operator sets these only when the spec
    /// does): its architecture (`architectures[0]` of config.json); with synthetic weights it
    /// picks the family to imitate, like --family.
    #[arg(long, env = api_env::ARCHITECTURE)]
    pub architecture: Option<String>,
    /// Whether top-k weights are renormalised; a checkpoint must agree, synthetic weights use it.
    #[arg(long, env = api_env::NORM_TOPK_PROB)]
    pub norm_topk_prob: Option<bool>,
    /// Factor on the routed experts' weights; a checkpoint must agree, synthetic weights use it.
    #[arg(long, env = api_env::ROUTED_SCALING_FACTOR)]
    pub routed_scaling_factor: Option<f64>,
    /// Shared experts (0: none); the checkpoint (or the imitated family) must have as many.
    #[arg(long, env = api_env::SHARED_EXPERTS)]
    pub shared_experts: Option<usize>,
    /// Redundant physical slots per layer (replicas of hot experts).
    #[arg(long, env = api_env::REDUNDANT_EXPERTS, default_value_t = 0)]
    pub redundant_experts: usize,
    /// Initial placement when no committed placement file exists.
    #[arg(long, env = api_env::INITIAL_PLACEMENT, value_enum, default_value_t = InitialPlacement::Linear)]
    pub initial_placement: InitialPlacement,

    /// `synthetic:<seed>` or a directory of safetensors files in the Hugging Face MoE layout.
    #[arg(long, env = api_env::WEIGHTS, default_value = "synthetic:0")]
    pub weights: String,
    /// Steps kept in the load-statistics window.
    #[arg(long, env = api_env::STATS_WINDOW, default_value_t = 1000)]
    pub stats_window: usize,

    /// Tokens per step on this rank (built-in generator).
    #[arg(long, env = api_env::TRAFFIC_TOKENS_PER_STEP, default_value_t = 64)]
    pub traffic_tokens_per_step: usize,
    /// Routing skew: Zipf exponent of expert popularity (0: uniform).
    #[arg(long, env = api_env::TRAFFIC_SKEW, default_value_t = 1.0)]
    pub traffic_skew: f64,
    /// Drift: positions per step the popularity ranking rotates by (0: none).
    #[arg(long, env = api_env::TRAFFIC_DRIFT, default_value_t = 0.0, allow_negative_numbers = true)]
    pub traffic_drift: f64,
    /// Seed of the generator; tokens are a function of (seed, step, rank).
    #[arg(long, env = api_env::TRAFFIC_SEED, default_value_t = 0)]
    pub traffic_seed: u64,
    /// Steps per second the generator aims at (0: as fast as possible).
    #[arg(long, env = api_env::TRAFFIC_STEPS_PER_SECOND, default_value_t = 0.0)]
    pub traffic_steps_per_second: f64,
    /// Replay this routing trace (JSON lines) instead of routing with the router.
    #[arg(long, env = env::TRAFFIC_TRACE)]
    pub traffic_trace: Option<PathBuf>,
    /// Where batches come from: `generator`, `trace` (needs --traffic-trace) or `api` (serve
    /// the forward API, docs/forward-api.md). Default: `trace` with --traffic-trace, else
    /// `generator`.
    #[arg(long, env = api_env::TRAFFIC, value_enum)]
    pub traffic: Option<TrafficMode>,
    /// Serve the forward API only on this port (0: on --http-port). With --local-ranks, rank
    /// R+i uses this + i.
    #[arg(long, env = api_env::FORWARD_PORT, default_value_t = 0)]
    pub forward_port: u16,
    /// File holding the bearer token forward-API callers must present (re-read on every
    /// request). Without it the forward API is open.
    #[arg(long, env = api_env::CLIENT_TOKEN_FILE)]
    pub client_token_file: Option<PathBuf>,
    /// Most rows one forward request may carry (more: 413); also the most rows a rank pools
    /// into one round of a layer.
    #[arg(long, env = api_env::MAX_REQUEST_ROWS, default_value_t = 4096)]
    pub max_request_rows: usize,
    /// Seconds a forward request may wait in the queue (e.g. during a stop-the-world remap)
    /// before it is answered 503 with Retry-After.
    #[arg(long, env = env::FORWARD_WAIT, default_value_t = 30.0)]
    pub forward_wait_seconds: f64,
    /// Asynchronous remaps: a layer switches no earlier than this many milliseconds after its
    /// staging began (spreads a remap's transfers out over time; the generation-parity test uses
    /// it to keep a remap in flight while requests are served). 0: as soon as it is staged.
    #[arg(long, env = env::REMAP_LAYER_DELAY, default_value_t = 0)]
    pub remap_layer_delay_ms: u64,

    /// Write the recorded expert-load history here (moectl load format `{"windows": [W][L][E]}`).
    #[arg(long, env = env::LOAD_HISTORY_FILE)]
    pub load_history_file: Option<PathBuf>,
    /// Steps folded into one entry of the load history.
    #[arg(long, env = env::LOAD_HISTORY_STEPS, default_value_t = 100)]
    pub load_history_steps: u64,
    /// Stop after this many steps (0: until terminated).
    #[arg(long, env = env::MAX_STEPS, default_value_t = 0)]
    pub max_steps: u64,
    /// Seconds the group may take to form.
    #[arg(long, env = env::RENDEZVOUS_TIMEOUT, default_value_t = 300.0)]
    pub rendezvous_timeout_seconds: f64,
    /// Seconds a peer may stay silent inside a collective.
    #[arg(long, env = env::COMM_TIMEOUT, default_value_t = 60.0)]
    pub comm_timeout_seconds: f64,
    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where expert weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Synthetic { seed: u64 },
    Safetensors { dir: PathBuf },
}
