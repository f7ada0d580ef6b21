//! `moe-e2e-cluster`: the e2e harness as a command, for the quickstart and for poking at a
//! local control plane by hand.
//!
//! * `moe-e2e-cluster up [--dir D] [--nodes N] [--gpus G] [--image PATTERN=BINARY]...`
//!   starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a real node
//!   (kubelet + containerd, N x G GPUs, pods from `scripts/images build`; see
//!   `moe_e2e::node`) — or, with `MOE_E2E_NODE=stand-in` or where the real node cannot start
//!   (`auto`, with a loud warning), the kubelet stand-in with N fake GPU nodes —, writes
//!   `D/kubeconfig`, and runs in the foreground until SIGINT/SIGTERM, then stops everything.
//! * `moe-e2e-cluster down [--dir D]` stops the cluster `up` runs in D.
//! * `moe-e2e-cluster agent --kubeconfig K [--nodes N] ...` runs only the kubelet stand-in
//!   against an existing cluster.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use moe_e2e::{AgentConfig, Cluster, ClusterOptions, FakeNode, ImageMap, NodeMode};

#[derive(Parser)]
#[command(
    name = "moe-e2e-cluster",
    about = "Local Kubernetes control plane with fake GPU nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a control plane and the agent; run until interrupted.
    Up {
        /// Working directory (certificates, logs, etcd data, kubeconfig, pod directories).
        /// Wiped at start if it holds a previous cluster.
        /// [default: ${MOE_E2E_CACHE:-~/.cache/moe-operator/e2e}/cluster]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Do not start the agent (no nodes, pods stay Pending).
        #[arg(long)]
        no_agent: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Stop the cluster `up` started in DIR (SIGTERM to its pid, then wait).
    Down {
        /// [default: ${MOE_E2E_CACHE:-~/.cache/moe-operator/e2e}/cluster]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run only the kubelet stand-in against an existing cluster.
    Agent {
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        /// Directory for pod directories [default: <cache>/agent].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Number of fake GPU nodes (gpu-node-0..).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// GPUs per node (`nvidia.com/gpu` capacity).
    #[arg(long, default_value_t = 4)]
    gpus: u32,
    /// Extra image rules, `PATTERN=/path/to/binary` (see docs/e2e.md); the workspace binaries
    /// moe-worker, moe-operator and moectl are mapped by default when built.
    #[arg(long = "image")]
    images: Vec<String>,
}

impl AgentArgs {
    fn config(&self) -> Result<AgentConfig> {
        let mut images = ImageMap::new();
        for spec in &self.images {
            let Some((pat, path)) = spec.split_once('=') else {
                bail!("--image wants PATTERN=BINARY, got {spec:?}");
            };
            images = images.image(pat, path);
        }
        // Workspace defaults after the explicit rules (first match wins).
        let defaults = ImageMap::workspace_default();
        let mut cfg = AgentConfig {
            images: images.merge(defaults),
            ..AgentConfig::default()
        };
        cfg.nodes = (0..self.nodes)
            .map(|i| FakeNode::gpu(format!("gpu-node-{i}"), self.gpus))
            .collect();
        Ok(cfg)
    }
}

fn default_dir(name: &str) -> PathBuf {
    moe_e2e::bins::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join(name)
}

const MARKER: &str = ".moe-e2e-cluster";

/// The pid recorded in `dir`'s marker, if that process is alive and is a moe-e2e-cluster.
fn running_cluster(dir: &std::path::Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(MARKER))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid == std::process::id() {
        return None;
    }
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmd)
        .contains("moe-e2e-cluster")
        .then_some(pid)
}

/// The real node (kubelet, containerd, pods from the project's images), or the kubelet
/// stand-in where `MOE_E2E_NODE` asks for it or (with `auto`) the real node cannot start.
async fn start_node(cluster: &mut Cluster, args: &AgentArgs) -> Result<()> {
    let mode = NodeMode::from_env()?;
    if mode != NodeMode::StandIn {
        match cluster.start_real_node(args.nodes as u32 * args.gpus).await {
            Ok(_) => {
                println!(
                    "nodes: {} (real node: kubelet + containerd, {} GPUs; logs in {})",
                    moe_e2e::node::NODE_NAME,
                    args.nodes as u32 * args.gpus,
                    cluster.dir().join("node/logs").display()
                );
                return Ok(());
            }
            Err(e) if mode == NodeMode::Real => {
                return Err(e.context("the real node could not start (MOE_E2E_NODE=real)"));
            }
            Err(e) => moe_e2e::node::select::loud_warning(&format!("{e:#}")),
        }
    }
    let h = cluster.start_agent(args.config()?).await?;
    println!("nodes: {} (kubelet stand-in)", h.node_names().join(", "));
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    moe_e2e::init_tracing();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up {
            dir,
            no_agent,
            agent,
        } => {
            let dir = dir.unwrap_or_else(|| default_dir("cluster"));
            if let Some(pid) = running_cluster(&dir) {
                bail!(
                    "a moe-e2e-cluster (pid {pid}) is still running in {}; stop it first (kill {pid}) or use --dir",
                    dir.display()
                );
            }
            if dir.exists() {
                let non_empty = std::fs::read_dir(&dir)?.next().is_some();
                if non_empty && !dir.join(MARKER).exists() {
                    bail!(
                        "{} is not empty and not a moe-e2e-cluster directory",
                        dir.display()
                    );
                }
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(MARKER), std::process::id().to_string())?;
            let dir = std::fs::canonicalize(&dir)?;
            let mut cluster = Cluster::start_with(ClusterOptions {
                dir: Some(dir.clone()),
                ..ClusterOptions::default()
            })
            .await?;
            if !no_agent {
                start_node(&mut cluster, &agent).await?;
            }
            println!("API server: {}", cluster.api_url());
            println!("logs:       {}", dir.join("logs").display());
            println!(
                "ready: export KUBECONFIG={}",
                cluster.kubeconfig_path().display()
            );
            wait_for_signal().await?;
            println!("stopping");
            drop(cluster);
        }
        Cmd::Down { dir } => {
            let dir = dir.unwrap_or_else(|| default_dir("cluster"));
            let Some(pid) = running_cluster(&dir) else {
                println!("no moe-e2e-cluster running in {}", dir.display());
                return Ok(());
            };
            moe_e2e::process::kill_pid(pid, libc::SIGTERM);
            for _ in 0..300 {
                if running_cluster(&dir).is_none() {
                    println!("stopped moe-e2e-cluster (pid {pid})");
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            bail!("moe-e2e-cluster (pid {pid}) did not stop within 30 s");
        }
        Cmd::Agent {
            kubeconfig,
            dir,
            agent,
        } => {
            let dir = dir.unwrap_or_else(|| default_dir("agent"));
            let client = moe_e2e::cluster::client_from_kubeconfig(&kubeconfig).await?;
            let mut cfg = agent.config()?;
            // API server port and CA for the pods' service-account kubeconfigs.
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            if let Some(c) = kc.clusters.first().and_then(|c| c.cluster.as_ref()) {
                cfg.api_port = c
                    .server
                    .as_deref()
                    .and_then(|s| s.rsplit(':').next())
                    .and_then(|p| p.trim_end_matches('/').parse().ok());
                cfg.ca_pem = c.certificate_authority_data.as_deref().and_then(|d| {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD.decode(d).ok()?;
                    String::from_utf8(bytes).ok()
                });
            }
            std::fs::create_dir_all(&dir)?;
            cfg.work_dir = Some(std::fs::canonicalize(&dir)?);
            let a = moe_e2e::Agent::start(client, cfg).await?;
            println!("agent serving {}", a.handle().node_names().join(", "));
            wait_for_signal().await?;
            drop(a);
        }
    }
    Ok(())
}
