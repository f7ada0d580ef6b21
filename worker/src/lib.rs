//! `moe-worker`: one expert-parallel rank. See `docs/worker.md`.
//!
//! The binary is a thin wrapper over [`start`], so tests can run whole groups in-process.

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod cuda_exec;
pub mod doorbell;
pub mod engine;
pub mod exec;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod model;
pub mod peer_auth;
pub mod placement;
pub mod staging;
pub mod state;
pub mod stats;
pub mod traffic;
pub mod weights;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use anyhow::{Context, Result, anyhow};

use crate::comm::{RendezvousConfig, bind_listener, form_group};
use crate::config::{Config, InitialPlacement};
use crate::engine::{Engine, EngineParts, StepRecord};
use crate::state::Shared;
use crate::stats::LoadHistory;
use crate::traffic::{Generator, GeneratorParams, Trace, Traffic};
use crate::weights::WeightStore;

/// Optional injections for tests and embedding.
#[derive(Default)]
pub struct Hooks {
    /// A pre-bound comm listener (instead of binding `--comm-port`).
    pub comm_listener: Option<std::net::TcpListener>,
    /// A pre-bound HTTP listener (instead of binding `--http-port`).
    pub http_listener: Option<std::net::TcpListener>,
    /// A pre-bound forward-API listener (instead of binding `--forward-port` when it is set).
    pub forward_listener: Option<std::net::TcpListener>,
    /// Receives a record of every step.
    pub step_sink: Option<mpsc::Sender<StepRecord>>,
    /// Leave the inputs and outputs out of the step records (timings only).
    pub step_sink_timings_only: bool,
    /// Exit the process (code 1) when a peer is lost and the engine is still stuck inside a
    /// device collective `--comm-timeout-seconds` later (NCCL calls do not return when a rank
    /// dies). The binary sets this; in-process tests do not.
    pub exit_on_hung_collective: bool,
}

/// A running worker.
pub struct Worker {
    pub http_addr: SocketAddr,
    /// Where the forward API listens (`http_addr` unless `--forward-port` is set).
    pub forward_addr: SocketAddr,
    pub shared: Arc<Shared>,
    engine: std::thread::JoinHandle<Result<()>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
}

impl Worker {
    /// Asks the group to stop at the next step boundary (every rank stops there, exit 0).
    pub fn request_stop(&self) {
        self.shared.request_stop();
    }

    pub fn is_finished(&self) -> bool {
        self.engine.is_finished()
    }

    /// Waits for the engine to end, then stops the HTTP server. The engine's error is the
    /// reason the process exits non-zero.
    pub async fn wait(mut self) -> Result<()> {
        let engine = self.engine;
        let result = tokio::task::spawn_blocking(move || engine.join())
            .await
            .map_err(|e| anyhow!("joining the engine: {e}"))?
            .map_err(|_| anyhow!("the engine thread panicked"))
            .and_then(|r| r);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for server in self.servers {
            let _ = server.await;
        }
        result
    }
}

/// Where the HTTP listeners bind: `--listen-addr`, else every address of the advertised
/// address's family. Not the advertised address itself: `kubectl port-forward` connects to
/// loopback inside the pod.
fn bind_ip(config: &Config) -> IpAddr {
    let parsed = |a: &Option<String>| a.as_deref().and_then(|a| a.parse::<IpAddr>().ok());
    parsed(&config.args.listen_addr).unwrap_or(match parsed(&config.args.advertise_addr) {
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    })
}

/// Starts the HTTP API and the engine thread (rendezvous, weights, steps).
pub async fn start(config: Config, mut hooks: Hooks) -> Result<Worker> {
    let shared = Arc::new(Shared::new(
        config.rank(),
        config.world_size(),
        config.shape,
        config.model.clone(),
        config.args.control_token_file.clone(),
        config.args.stats_window,
        forward::Settings {
            traffic: config.traffic,
            client_token_file: config.args.client_token_file.clone(),
            max_request_rows: config.args.max_request_rows,
            wait: config.forward_wait,
        },
    ));
    let bind = |given: Option<std::net::TcpListener>, port: u16, what: &str| {
        let std_listener = match given {
            Some(l) => l,
            None => {
                let addr = SocketAddr::new(bind_ip(&config), port);
                std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding the {what} listener on {addr}"))?
            }
        };
        std_listener.set_nonblocking(true)?;
        anyhow::Ok(tokio::net::TcpListener::from_std(std_listener)?)
    };
    let listener = bind(hooks.http_listener.take(), config.args.http_port, "HTTP")?;
    let http_addr = listener.local_addr()?;
    let separate_forward = config.args.forward_port != 0 || hooks.forward_listener.is_some();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let serve = |listener: tokio::net::TcpListener, app: axum::Router| {
        let mut rx = rx.clone();
        // Small frames of the forward API must not wait for Nagle's algorithm.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("HTTP server failed: {e}");
            }
        })
    };
    let mut servers = Vec::new();
    let forward_addr = if separate_forward {
        let fl = bind(
            hooks.forward_listener.take(),
            config.args.forward_port,
            "forward-API",
        )?;
        let addr = fl.local_addr()?;
        servers.push(serve(listener, http::router(shared.clone())));
        servers.push(serve(fl, forward::http::router(shared.clone())));
        tracing::info!(%http_addr, forward_addr = %addr, "HTTP API and forward API listening");
        addr
    } else {
        let app = http::router(shared.clone()).merge(forward::http::router(shared.clone()));
        servers.push(serve(listener, app));
        tracing::info!(%http_addr, "HTTP API (with the forward API) listening");
        http_addr
    };
    let shared2 = shared.clone();
    // Every line the engine logs names its rank (a process may run several).
    let span = tracing::info_span!("rank", rank = config.rank());
    let engine = std::thread::Builder::new()
        .name(format!("engine-{}", config.rank()))
        .spawn(move || {
            let _rank = span.enter();
            let r = run_engine(
                config,
                shared2.clone(),
                hooks.comm_listener,
                hooks.step_sink,
                !hooks.step_sink_timings_only,
                hooks.exit_on_hung_collective,
            );
            // Requests still queued (and later ones) learn that the group ended.
            shared2.forward.close(match &r {
                Ok(()) => forward::Refusal::unavailable("the group has stopped"),
                Err(e) => forward::Refusal::new(500, format!("the group failed: {e:#}")),
            });
            r
        })?;
    Ok(Worker {
        http_addr,
        forward_addr,
        shared,
        engine,
        servers,
        shutdown: Some(tx),
    })
}

fn run_engine(
    config: Config,
    shared: Arc<Shared>,
    comm_listener: Option<std::net::TcpListener>,
    sink: Option<mpsc::Sender<StepRecord>>,
    sink_tensors: bool,
    watchdog: bool,
) -> Result<()> {
    let shape = config.shape;
    let rank = config.rank();
    let world = config.world_size();
    let num_nodes = world / config.ranks_per_node;
    let backend = backend::resolve(config.args.backend)?;
    if backend == backend::Backend::Cuda && config.args.traffic_trace.is_some() {
        return Err(anyhow!(
            "--traffic-trace (trace replay) is only supported with --backend cpu"
        ));
    }
    shared.lock().backend = backend.name().to_string();

    // The committed placement (the desired one of the last remap the operator started).
    let committed = match &config.args.placement_file {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --placement-file {path:?}"))?;
            Some(
                placement::parse_placement_file(&text, &shape, num_nodes)
                    .map_err(|e| anyhow!("--placement-file {path:?}: {e}"))?,
            )
        }
        Some(path) if config.args.initial_placement == InitialPlacement::File => {
            return Err(anyhow!(
                "--placement-file {path:?} does not exist (--initial-placement file)"
            ));
        }
        _ => None,
    };

    let rdv = RendezvousConfig {
        rank,
        world,
        leader: config.leader_target(),
        advertise: config
            .args
            .advertise_addr
            .as_deref()
            .and_then(|a| a.parse().ok()),
        comm_port: config.args.comm_port,
        timeout: config.rendezvous_timeout,
        comm_timeout: config.comm_timeout,
        // The traffic mode too: a generating rank and a serving rank would pair different
        // collectives.
        fingerprint: format!(
            "{} model={} {:?} placement={:?} weights={} traffic={}",
            shape.fingerprint(),
            config.model.architecture,
            crate::model::gating_config(&config.model),
            config.args.initial_placement,
            config.args.weights,
            config.traffic.name()
        ),
        // The control token doubles as the group's secret: every pod of a group mounts the
        // same one, and only the operator and the group hold it.
        group_key: match &config.args.control_token_file {
            Some(path) => Some(peer_auth::GroupKey::from_file(path)?),
            None => None,
        },
    };
    let listener = match comm_listener {
        Some(l) => l,
        None => bind_listener(&rdv)?,
    };
    tracing::info!(rank, world, leader = ?rdv.leader, "forming the group");
    // Rank 0's NCCL unique id (CUDA) or random bytes (CPU), handed out at rendezvous.
    let unique_id = if rank == 0 {
        backend.unique_id()?
    } else {
        Vec::new()
    };
    let (comm, info) = form_group(&rdv, listener, committed, move || unique_id)?;
    tracing::info!(epoch = info.epoch, peers = ?info.peers, "group formed");
    comm.set_doorbell(shared.bell.clone());
    let comm = Arc::new(comm);
    if watchdog {
        let (comm, shared, grace) = (comm.clone(), shared.clone(), config.comm_timeout);
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    if shared.finished.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(reason) = comm.failure() {
                        std::thread::sleep(grace);
                        if !shared.finished.load(Ordering::SeqCst) {
                            tracing::error!(
                                "exiting: group broken ({reason}) and the engine is stuck in a collective"
                            );
                            eprintln!("moe-worker: error: group broken: {reason}");
                            std::process::exit(1);
                        }
                        return;
                    }
                }
            })?;
    }

    let placement = match info.placement {
        Some(p) => p,
        None => placement::initial_placement(config.args.initial_placement, &shape, num_nodes)
            .map_err(|e| anyhow!("--initial-placement: {e}"))?,
    };
    let store = WeightStore::from_config(&config)?;
    let routers = (0..shape.num_layers)
        .map(|l| store.router(l))
        .collect::<Result<Vec<_>>>()?;
    let generator = Generator::new(
        GeneratorParams {
            tokens_per_step: config.args.traffic_tokens_per_step,
            skew: config.args.traffic_skew,
            drift: config.args.traffic_drift,
            seed: config.args.traffic_seed,
        },
        &shape,
        &routers,
    );
    let trace = match &config.args.traffic_trace {
        Some(p) => Some(Trace::load(p, &shape).context("--traffic-trace")?),
        None => None,
    };
    let history = config.args.load_history_file.as_deref().map(|p| {
        LoadHistory::new(
            p,
            config.args.load_history_steps,
            shape.num_layers,
            shape.num_experts,
        )
    });
    let exec: Box<dyn exec::Exec> = match backend {
        backend::Backend::Cpu => Box::new(exec::CpuExec::load(&store, &placement, &shape, rank)?),
        backend::Backend::Cuda => Box::new(cuda_exec::CudaExec::load(
            &store,
            &placement,
            &shape,
            rank,
            &info.unique_id,
        )?),
    };
    // Report the executor that actually runs, not the flag: a status that says `cuda` while the
    // CPU reference runs is how a backend mix-up once went unnoticed.
    shared.lock().backend = exec.backend().to_string();
    let mut engine = Engine::new(EngineParts {
        shape,
        ranks_per_node: config.ranks_per_node,
        comm: comm.clone(),
        shared: shared.clone(),
        placement,
        exec,
        traffic: Traffic {
            generator,
            trace,
            rank,
            world,
        },
        history,
        sink,
        sink_tensors,
        max_steps: config.args.max_steps,
        steps_per_second: config.args.traffic_steps_per_second,
        mode: config.traffic,
        max_round_rows: config.args.max_request_rows,
        remap_layer_delay: std::time::Duration::from_millis(config.args.remap_layer_delay_ms),
    })?;
    let mem = shape.slots_per_rank() * shape.num_layers * shape.expert_bytes();
    shared.metrics.expert_memory_bytes.set(mem as i64);
    tracing::info!(
        slots_per_layer = shape.slots_per_rank(),
        layers = shape.num_layers,
        expert_bytes = shape.expert_bytes(),
        total_bytes = mem,
        "expert weights loaded (slots x layers x expert size)"
    );
    // Every rank has its weights before anyone serves (loading may take long on some ranks).
    comm.barrier_within(comm::CHAN_CTRL, config.rendezvous_timeout)
        .context("waiting for every rank to load its weights")?;
    shared.ready.store(true, Ordering::SeqCst);
    shared.metrics.ready.set(1);
    let r = engine.run();
    shared.finished.store(true, Ordering::SeqCst);
    shared.ready.store(false, Ordering::SeqCst);
    shared.metrics.ready.set(0);
    r
}
