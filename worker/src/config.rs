//! Command line and environment configuration of one worker rank.
//!
//! Every flag has an environment-variable equivalent. The names shared with the operator come
//! from [`moe_api::env`]; the few worker-only knobs are in [`env`]. The flags are in
//! `config/flags.rs`, the error type in `config/error.rs`; this file validates them into a
//! [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use moe_api::env as api_env;
use moe_model::ModelDescription;

use crate::checkpoint::Checkpoint;

pub(crate) mod error;
pub(crate) mod flags;

pub(crate) use error::bad;
pub use error::{ConfigError, ConfigErrorKind};
pub use flags::{
    Args, BackendChoice, InitialPlacement, LogFormat, Scoring, TrafficMode, WeightsSource, env,
};

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
        for (addr, flag, var) in [
            (&args.advertise_addr, "advertise-addr", e::ADVERTISE_ADDR),
            (&args.listen_addr, "listen-addr", e::LISTEN_ADDR),
        ] {
            if let Some(addr) = addr
                && addr.parse::<std::net::IpAddr>().is_err()
            {
                return Err(bad(flag, var, format!("`{addr}` is not an IP address")));
            }
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
    use clap::Parser;

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
            (&["--listen-addr", "localhost"], "--listen-addr"),
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
