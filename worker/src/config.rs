//! Command line and environment configuration of one worker rank.
//!
//! Every flag has an environment-variable equivalent. The names shared with the operator come
//! from [`moe_api::env`]; the few worker-only knobs are in [`env`] below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use clap::{Parser, ValueEnum};
use moe_api::env as api_env;
use moe_model::ModelDescription;

use crate::checkpoint::Checkpoint;

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
    /// Address this rank advertises to its peers and binds its listeners to (the pod IP).
    /// Default: bind all interfaces and advertise the address this rank reaches rank 0 from.
    #[arg(long, env = api_env::ADVERTISE_ADDR)]
    pub advertise_addr: Option<String>,
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

/// The model shape every rank of a group must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub expert_groups: usize,
    pub topk_groups: usize,
    pub scoring: Scoring,
    pub redundant: usize,
    pub world_size: usize,
    /// Routed experts carry projection biases (gpt-oss); they travel with the expert.
    pub expert_bias: bool,
}

impl ModelShape {
    /// The shape of a model description for a group of `world_size` ranks with `redundant`
    /// extra slots.
    pub fn of_model(m: &ModelDescription, world_size: usize, redundant: usize) -> Self {
        ModelShape {
            num_layers: m.num_moe_layers(),
            num_experts: m.num_experts,
            hidden: m.hidden,
            intermediate: m.intermediate,
            top_k: m.top_k,
            expert_groups: m.expert_groups,
            topk_groups: m.topk_groups,
            scoring: match m.scoring {
                moe_model::Scoring::Softmax => Scoring::Softmax,
                moe_model::Scoring::Sigmoid => Scoring::Sigmoid,
            },
            redundant,
            world_size,
            expert_bias: m.expert_bias,
        }
    }
    pub fn num_slots(&self) -> usize {
        self.num_experts + self.redundant
    }
    pub fn slots_per_rank(&self) -> usize {
        self.num_slots() / self.world_size
    }
    /// bf16 elements of one expert (gate, up, down projections).
    pub fn expert_elems(&self) -> usize {
        3 * self.hidden * self.intermediate
    }
    /// Bytes of one expert as it travels in a remap: bf16 projections, then (with
    /// `expert_bias`) the fp32 biases.
    pub fn expert_bytes(&self) -> usize {
        2 * self.expert_elems() + self.expert_bias_elems() * 4
    }
    /// fp32 bias entries of one expert (`2I + H`, or 0).
    pub fn expert_bias_elems(&self) -> usize {
        if self.expert_bias {
            2 * self.intermediate + self.hidden
        } else {
            0
        }
    }
    /// A compact description every rank sends at rendezvous, so a mis-configured rank is caught.
    pub fn fingerprint(&self) -> String {
        format!(
            "layers={} experts={} hidden={} intermediate={} top_k={} groups={}/{} scoring={:?} redundant={} world={}",
            self.num_layers,
            self.num_experts,
            self.hidden,
            self.intermediate,
            self.top_k,
            self.expert_groups,
            self.topk_groups,
            self.scoring,
            self.redundant,
            self.world_size
        )
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: Args,
    pub shape: ModelShape,
    /// The model description (from the checkpoint's config.json, or built for synthetic
    /// weights).
    pub model: Arc<ModelDescription>,
    /// The checkpoint, opened and checked (headers only), when weights come from files.
    pub checkpoint: Option<Arc<Checkpoint>>,
    pub ranks_per_node: usize,
    pub weights: WeightsSource,
    pub rendezvous_timeout: Duration,
    pub comm_timeout: Duration,
    /// Where batches come from (`--traffic`, defaulted).
    pub traffic: TrafficMode,
    /// How long a forward request may wait in the queue.
    pub forward_wait: Duration,
}

/// A configuration error names the flag (and its environment variable) at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag} (env {env}): {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub reason: String,
    pub kind: ConfigErrorKind,
}

/// What kind of configuration error ended the worker, for the `Reason: message` line it
/// leaves in its termination message (the operator shows it as the Degraded reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// A flag is malformed or contradicts another.
    Invalid,
    /// The checkpoint cannot be served (config, tensors, dtypes).
    CheckpointInvalid,
    /// The checkpoint is not the model the flags (spec.model) describe.
    ModelMismatch,
}

impl ConfigErrorKind {
    pub fn reason(self) -> &'static str {
        match self {
            ConfigErrorKind::Invalid => "WorkerConfigInvalid",
            ConfigErrorKind::CheckpointInvalid => "CheckpointInvalid",
            ConfigErrorKind::ModelMismatch => "ModelMismatch",
        }
    }
}

pub(crate) fn bad(flag: &'static str, env: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        reason: reason.into(),
        kind: ConfigErrorKind::Invalid,
    }
}

/// A flag that disagrees with the checkpoint it describes.
pub(crate) fn mismatch(
    flag: &'static str,
    env: &'static str,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        kind: ConfigErrorKind::ModelMismatch,
        ..bad(flag, env, reason)
    }
}

impl ConfigError {
    /// The one line a worker leaves in its termination message: `Reason: message`.
    pub fn termination_message(&self) -> String {
        format!("{}: {self}", self.kind.reason())
    }
}

impl Config {
    /// The configuration of every rank this process runs (`--local-ranks`, default one).
    pub fn for_process(args: Args) -> Result<Vec<Config>, ConfigError> {
        use api_env as e;
        let n = args.local_ranks;
        if n == 0 {
            return Err(bad("local-ranks", e::LOCAL_RANKS, "must be at least 1"));
        }
        let first = match args.process_index {
            None => args.rank,
            Some(_) if args.rank != 0 => {
                return Err(bad(
                    "process-index",
                    e::PROCESS_INDEX,
                    "give --rank (MOE_RANK) or --process-index, not both",
                ));
            }
            Some(p) => p.checked_mul(n).ok_or_else(|| {
                bad(
                    "process-index",
                    e::PROCESS_INDEX,
                    "too large for --local-ranks",
                )
            })?,
        };
        // (One rank given by --rank: `from_args` names --rank when it does not fit.)
        let plain = n == 1 && args.process_index.is_none();
        if !plain && first.saturating_add(n) > args.world_size {
            return Err(bad(
                "local-ranks",
                e::LOCAL_RANKS,
                format!(
                    "ranks {first}..{} do not fit in --world-size {}",
                    first.saturating_add(n),
                    args.world_size
                ),
            ));
        }
        let port = |base: u16,
                    i: usize,
                    flag: &'static str,
                    env: &'static str|
         -> Result<u16, ConfigError> {
            if base == 0 {
                return Ok(0);
            }
            u16::try_from(usize::from(base) + i).map_err(|_| {
                bad(
                    flag,
                    env,
                    format!("{base} + {i} (local rank {i}) is not a port"),
                )
            })
        };
        let mut configs: Vec<Config> = Vec::with_capacity(n);
        for i in 0..n {
            let mut a = args.clone();
            a.rank = first + i;
            a.process_index = None;
            a.local_ranks = 1;
            a.comm_port = port(args.comm_port, i, "comm-port", e::COMM_PORT)?;
            a.http_port = port(args.http_port, i, "http-port", e::HTTP_PORT)?;
            a.forward_port = port(args.forward_port, i, "forward-port", e::FORWARD_PORT)?;
            // A bare-host --leader-addr takes its port from --comm-port: the base one, not
            // this rank's offset copy.
            if let Some(first) = configs.first() {
                a.leader_addr = first.leader_target();
            }
            configs.push(Config::from_args(a)?);
        }
        Ok(configs)
    }

    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        use api_env as e;
        if args.world_size == 0 {
            return Err(bad("world-size", e::WORLD_SIZE, "must be at least 1"));
        }
        if args.rank >= args.world_size {
            return Err(bad(
                "rank",
                e::RANK,
                format!(
                    "{} is not below --world-size {}",
                    args.rank, args.world_size
                ),
            ));
        }
        let ranks_per_node = args.ranks_per_node.unwrap_or(args.world_size);
        if ranks_per_node == 0 || !args.world_size.is_multiple_of(ranks_per_node) {
            return Err(bad(
                "ranks-per-node",
                e::RANKS_PER_NODE,
                format!(
                    "{ranks_per_node} does not divide --world-size {}",
                    args.world_size
                ),
            ));
        }
        if args.world_size > 1 && args.leader_addr.as_deref().is_none_or(str::is_empty) {
            return Err(bad(
                "leader-addr",
                e::LEADER_ADDR,
                "required when --world-size is more than 1",
            ));
        }
        if args.rank == 0 && args.world_size > 1 && args.comm_port == 0 {
            return Err(bad(
                "comm-port",
                e::COMM_PORT,
                "rank 0 needs a fixed port that the other ranks can reach",
            ));
        }
        let weights = parse_weights(&args.weights)?;
        let (model, checkpoint) = crate::model::resolve(&args, &weights)?;
        let m = &*model;
        for (flag, env, v) in [
            ("num-layers", e::NUM_LAYERS, m.num_moe_layers()),
            ("num-experts", e::NUM_EXPERTS, m.num_experts),
            ("hidden", e::HIDDEN, m.hidden),
            ("intermediate", e::INTERMEDIATE, m.intermediate),
            ("top-k", e::TOP_K, m.top_k),
            ("expert-groups", e::EXPERT_GROUPS, m.expert_groups),
            ("topk-groups", e::TOPK_GROUPS, m.topk_groups),
            ("stats-window", e::STATS_WINDOW, args.stats_window),
            (
                "traffic-tokens-per-step",
                e::TRAFFIC_TOKENS_PER_STEP,
                args.traffic_tokens_per_step,
            ),
        ] {
            if v == 0 {
                return Err(bad(flag, env, "must be at least 1"));
            }
        }
        if m.top_k > m.num_experts {
            return Err(bad(
                "top-k",
                e::TOP_K,
                format!("{} is more than --num-experts {}", m.top_k, m.num_experts),
            ));
        }
        if !m.num_experts.is_multiple_of(m.expert_groups) {
            return Err(bad(
                "expert-groups",
                e::EXPERT_GROUPS,
                format!(
                    "{} does not divide --num-experts {}",
                    m.expert_groups, m.num_experts
                ),
            ));
        }
        if m.topk_groups > m.expert_groups {
            return Err(bad(
                "topk-groups",
                e::TOPK_GROUPS,
                format!(
                    "{} is more than --expert-groups {}",
                    m.topk_groups, m.expert_groups
                ),
            ));
        }
        if m.expert_groups > 1 {
            let per_group = m.num_experts / m.expert_groups;
            if m.topk_groups * per_group < m.top_k {
                return Err(bad(
                    "topk-groups",
                    e::TOPK_GROUPS,
                    format!(
                        "{} groups of {per_group} experts hold fewer than --top-k {}",
                        m.topk_groups, m.top_k
                    ),
                ));
            }
        }
        let slots = m.num_experts + args.redundant_experts;
        if !slots.is_multiple_of(args.world_size) {
            return Err(bad(
                "redundant-experts",
                e::REDUNDANT_EXPERTS,
                format!(
                    "--num-experts {} + --redundant-experts {} = {slots} slots cannot be split evenly over --world-size {}",
                    m.num_experts, args.redundant_experts, args.world_size
                ),
            ));
        }
        if args.initial_placement == InitialPlacement::File && args.placement_file.is_none() {
            return Err(bad(
                "initial-placement",
                e::INITIAL_PLACEMENT,
                "`file` needs --placement-file",
            ));
        }
        if !(args.traffic_skew.is_finite() && args.traffic_skew >= 0.0) {
            return Err(bad(
                "traffic-skew",
                e::TRAFFIC_SKEW,
                "must be a finite number >= 0",
            ));
        }
        if !args.traffic_drift.is_finite() {
            return Err(bad("traffic-drift", e::TRAFFIC_DRIFT, "must be finite"));
        }
        if !(args.traffic_steps_per_second.is_finite() && args.traffic_steps_per_second >= 0.0) {
            return Err(bad(
                "traffic-steps-per-second",
                e::TRAFFIC_STEPS_PER_SECOND,
                "must be a finite number >= 0",
            ));
        }
        if args.load_history_steps == 0 {
            return Err(bad(
                "load-history-steps",
                env::LOAD_HISTORY_STEPS,
                "must be at least 1",
            ));
        }
        let traffic = match (args.traffic, &args.traffic_trace) {
            (None, Some(_)) => TrafficMode::Trace,
            (None, None) => TrafficMode::Generator,
            (Some(TrafficMode::Trace), None) => {
                return Err(bad(
                    "traffic",
                    e::TRAFFIC,
                    "`trace` needs --traffic-trace (MOE_TRAFFIC_TRACE)",
                ));
            }
            (Some(TrafficMode::Trace), Some(_)) => TrafficMode::Trace,
            (Some(other), Some(_)) => {
                return Err(bad(
                    "traffic",
                    e::TRAFFIC,
                    format!(
                        "`{}` does not replay a trace: drop --traffic-trace or use --traffic trace",
                        other.name()
                    ),
                ));
            }
            (Some(other), None) => other,
        };
        if args.max_request_rows == 0 || args.max_request_rows > u32::MAX as usize {
            return Err(bad(
                "max-request-rows",
                e::MAX_REQUEST_ROWS,
                "must be between 1 and 4294967295",
            ));
        }
        if args.forward_port != 0 && args.forward_port == args.http_port {
            return Err(bad(
                "forward-port",
                e::FORWARD_PORT,
                format!(
                    "{} is also --http-port: use 0 to serve the forward API on the HTTP port",
                    args.forward_port
                ),
            ));
        }
        let forward_wait = seconds(
            args.forward_wait_seconds,
            "forward-wait-seconds",
            env::FORWARD_WAIT,
        )?;
        let rendezvous_timeout = seconds(
            args.rendezvous_timeout_seconds,
            "rendezvous-timeout-seconds",
            env::RENDEZVOUS_TIMEOUT,
        )?;
        let comm_timeout = seconds(
            args.comm_timeout_seconds,
            "comm-timeout-seconds",
            env::COMM_TIMEOUT,
        )?;
        if let Some(addr) = &args.advertise_addr
            && addr.parse::<std::net::IpAddr>().is_err()
        {
            return Err(bad(
                "advertise-addr",
                e::ADVERTISE_ADDR,
                format!("`{addr}` is not an IP address"),
            ));
        }
        let shape = ModelShape::of_model(m, args.world_size, args.redundant_experts);
        Ok(Config {
            args,
            shape,
            model,
            checkpoint,
            ranks_per_node,
            weights,
            rendezvous_timeout,
            comm_timeout,
            traffic,
            forward_wait,
        })
    }

    pub fn rank(&self) -> usize {
        self.args.rank
    }
    pub fn world_size(&self) -> usize {
        self.args.world_size
    }

    /// The leader's `host:port`, with the comm port filled in when only a host was given.
    pub fn leader_target(&self) -> Option<String> {
        let addr = self.args.leader_addr.as_deref()?.trim();
        if addr.parse::<SocketAddr>().is_ok() {
            return Some(addr.to_string());
        }
        // `host:port` with a DNS name, or a bare host / IP.
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => {
                Some(addr.to_string())
            }
            _ if addr.contains(':') => Some(format!("[{addr}]:{}", self.args.comm_port)),
            _ => Some(format!("{addr}:{}", self.args.comm_port)),
        }
    }
}

fn seconds(v: f64, flag: &'static str, env: &'static str) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(flag, env, "must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_weights(s: &str) -> Result<WeightsSource, ConfigError> {
    if let Some(seed) = s.strip_prefix("synthetic:") {
        let seed = seed.parse().map_err(|_| {
            bad(
                "weights",
                api_env::WEIGHTS,
                format!("`{s}`: the seed after `synthetic:` must be an unsigned integer"),
            )
        })?;
        return Ok(WeightsSource::Synthetic { seed });
    }
    if s == "synthetic" {
        return Ok(WeightsSource::Synthetic { seed: 0 });
    }
    if s.is_empty() {
        return Err(bad(
            "weights",
            api_env::WEIGHTS,
            "empty: use synthetic:<seed> or a directory",
        ));
    }
    Ok(WeightsSource::Safetensors {
        dir: PathBuf::from(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["moe-worker"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).expect("clap parse");
        Config::from_args(args)
    }

    /// A 4-rank group that local-rank tests extend.
    const GROUP: [&str; 6] = [
        "--world-size",
        "4",
        "--leader-addr",
        "l:1",
        "--redundant-experts",
        "0",
    ];

    fn process(extra: &[&str]) -> Result<Vec<Config>, ConfigError> {
        let mut argv = vec!["moe-worker"];
        argv.extend_from_slice(extra);
        Config::for_process(Args::try_parse_from(argv).expect("clap parse"))
    }

    #[test]
    fn local_ranks_get_consecutive_ranks_and_ports() {
        let from_index = [
            &GROUP[..],
            &[
                "--local-ranks",
                "2",
                "--process-index",
                "1",
                "--comm-port",
                "100",
            ],
        ]
        .concat();
        let cs = process(&from_index).unwrap();
        let got: Vec<(usize, u16, u16)> = cs
            .iter()
            .map(|c| (c.rank(), c.args.comm_port, c.args.http_port))
            .collect();
        assert_eq!(got, vec![(2, 100, 8080), (3, 101, 8081)]);
        // --rank gives the first rank; ports 0 stay 0 (any free port for each rank).
        let from_rank = [
            &GROUP[..],
            &[
                "--local-ranks",
                "2",
                "--rank",
                "0",
                "--comm-port",
                "7",
                "--http-port",
                "0",
            ],
        ]
        .concat();
        let got: Vec<(usize, u16, u16)> = process(&from_rank)
            .unwrap()
            .iter()
            .map(|c| (c.rank(), c.args.comm_port, c.args.http_port))
            .collect();
        assert_eq!(got, vec![(0, 7, 0), (1, 8, 0)]);
        // One rank per process is the plain configuration.
        assert_eq!(process(&GROUP).unwrap().len(), 1);
        // A bare-host leader address means the base --comm-port for every local rank.
        let bare = [
            "--world-size",
            "4",
            "--leader-addr",
            "w-0.w.ns.svc",
            "--redundant-experts",
            "0",
            "--local-ranks",
            "2",
            "--process-index",
            "1",
        ];
        let targets: Vec<Option<String>> = process(&bare)
            .unwrap()
            .iter()
            .map(Config::leader_target)
            .collect();
        assert_eq!(
            targets,
            vec![
                Some("w-0.w.ns.svc:29500".into()),
                Some("w-0.w.ns.svc:29500".into())
            ]
        );
    }

    #[test]
    fn local_ranks_errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--local-ranks", "0"], "--local-ranks"),
            (
                &["--local-ranks", "2", "--process-index", "2"],
                "--local-ranks",
            ),
            (&["--local-ranks", "3", "--rank", "2"], "--local-ranks"),
            (&["--process-index", "1", "--rank", "1"], "--process-index"),
            (
                &["--local-ranks", "2", "--http-port", "65535"],
                "--http-port",
            ),
        ];
        for (extra, flag) in cases {
            let argv = [&GROUP[..], extra].concat();
            let e = process(&argv)
                .err()
                .unwrap_or_else(|| panic!("{extra:?} accepted"));
            assert!(e.to_string().contains(flag), "{extra:?}: {e}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.shape.num_slots(), 16);
        assert_eq!(c.traffic, TrafficMode::Generator);
        assert_eq!(c.args.max_request_rows, 4096);
        let c = parse(&["--traffic-trace", "t.jsonl"]).unwrap();
        assert_eq!(c.traffic, TrafficMode::Trace);
        let c = parse(&["--traffic", "api"]).unwrap();
        assert_eq!(c.traffic, TrafficMode::Api);
        assert_eq!(c.weights, WeightsSource::Synthetic { seed: 0 });
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--rank", "2", "--world-size", "2"], "--rank"),
            (&["--world-size", "2"], "--leader-addr"),
            (
                &["--world-size", "3", "--leader-addr", "x:1"],
                "--redundant-experts",
            ),
            (&["--top-k", "17"], "--top-k"),
            (&["--expert-groups", "3"], "--expert-groups"),
            (&["--initial-placement", "file"], "--initial-placement"),
            (&["--weights", "synthetic:abc"], "--weights"),
            (&["--traffic-skew=-1"], "--traffic-skew"),
            (
                &[
                    "--world-size",
                    "4",
                    "--ranks-per-node",
                    "3",
                    "--leader-addr",
                    "a",
                ],
                "--ranks-per-node",
            ),
            (&["--advertise-addr", "pod-0.svc"], "--advertise-addr"),
            (&["--traffic", "trace"], "--traffic"),
            (
                &["--traffic", "api", "--traffic-trace", "t.jsonl"],
                "--traffic",
            ),
            (&["--max-request-rows", "0"], "--max-request-rows"),
            (
                &["--forward-port", "9000", "--http-port", "9000"],
                "--forward-port",
            ),
            (&["--forward-wait-seconds", "0"], "--forward-wait-seconds"),
        ];
        for (argv, flag) in cases {
            let err = parse(argv).unwrap_err().to_string();
            assert!(err.contains(flag), "{argv:?}: {err}");
            assert!(err.contains("MOE_"), "{err}");
        }
    }

    #[test]
    fn leader_target_fills_in_the_port() {
        let c = parse(&["--world-size", "2", "--leader-addr", "w-0.w.ns.svc"]).unwrap();
        assert_eq!(c.leader_target().unwrap(), "w-0.w.ns.svc:29500");
        let c = parse(&["--world-size", "2", "--leader-addr", "127.0.0.3:7000"]).unwrap();
        assert_eq!(c.leader_target().unwrap(), "127.0.0.3:7000");
        let c = parse(&["--world-size", "2", "--leader-addr", "w-0:7001"]).unwrap();
        assert_eq!(c.leader_target().unwrap(), "w-0:7001");
    }
}
