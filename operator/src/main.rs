//! `moe-operator`: the MoEDeployment controller with leader election, health and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use moe_operator::controller::{self, Context, Settings};
use moe_operator::leader::LeaderElector;
use moe_operator::metrics::Metrics;
use moe_operator::resources::{ControlPlanePeers, WorkerDefaults};
use moe_operator::server::{self, ServerState};
use moe_operator::workers::HttpWorkers;
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(
    name = "moe-operator",
    version,
    about = "Kubernetes operator for MoEDeployment"
)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MOE_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Elect a leader through a Lease (run two replicas safely). Disable for a single local run.
    #[arg(long, env = "MOE_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(
        long,
        env = "MOE_OPERATOR_LEASE_NAME",
        default_value = "moe-operator-leader"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease (default: the pod name, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a follower waits after the last change it saw to the Lease before taking
    /// over (at least 3). The leader stops acting when it has not renewed for 2/3 of it, and
    /// renews every 2/15 of it (client-go's 15 s, 10 s and 2 s by default).
    #[arg(long, default_value = "15")]
    lease_duration_seconds: u64,
    /// Timeout of each request to a worker rank, in seconds.
    #[arg(long, default_value = "3")]
    worker_timeout_seconds: u64,
    /// Default worker image for MoEDeployments that set none.
    #[arg(long, env = "MOE_OPERATOR_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Default worker imagePullPolicy.
    #[arg(long, env = "MOE_OPERATOR_WORKER_IMAGE_PULL_POLICY")]
    worker_image_pull_policy: Option<String>,
    /// Default worker resources, as JSON (a core/v1 ResourceRequirements).
    #[arg(long, env = "MOE_OPERATOR_WORKER_RESOURCES")]
    worker_resources: Option<String>,
    /// Give every MoEDeployment a NetworkPolicy of its own (`<name>-workers`): the workers'
    /// control port open to the operator's pods only, the rendezvous to the group's own pods,
    /// the forward port to the selected clients. Turn off where the operator runs outside the
    /// cluster (its traffic would not match the operator's pod labels).
    #[arg(long, env = "MOE_OPERATOR_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// Namespace of the operator's pods, admitted to the workers' control port (default: the
    /// pod's namespace; unset: the operator's labels in any namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
    /// Labels of the operator's pods (`key=value,...`), admitted to the workers' control port.
    #[arg(
        long,
        env = "MOE_OPERATOR_POD_LABELS",
        default_value = "app.kubernetes.io/name=moe-operator"
    )]
    operator_pod_labels: String,
    /// Further peers admitted to the workers' control port (e.g. Prometheus scraping
    /// /metrics), as a JSON list of networking/v1 NetworkPolicyPeer objects.
    #[arg(long, env = "MOE_OPERATOR_CONTROL_PEERS")]
    control_peers: Option<String>,
    /// Fleet-wide limit on whole-group restarts: at most this many groups restarted (after a
    /// rank failure or a spec change) per `--group-restart-window-seconds`, across every
    /// MoEDeployment; more wait, with `Progressing/FleetRestartLimit` and an event. 0: no limit.
    #[arg(long, env = "MOE_OPERATOR_MAX_GROUP_RESTARTS", default_value = "10")]
    max_group_restarts: u32,
    /// The window of `--max-group-restarts`, in seconds.
    #[arg(
        long,
        env = "MOE_OPERATOR_GROUP_RESTART_WINDOW_SECONDS",
        default_value = "60"
    )]
    group_restart_window_seconds: u64,
    /// The Secret holding the master key every per-deployment token is derived from, in
    /// `--token-key-namespace`; created with a random key when missing. The operator reads
    /// this one Secret and no other (docs/operator.md "Tokens").
    #[arg(
        long,
        env = "MOE_OPERATOR_TOKEN_KEY_SECRET",
        default_value = "moe-operator-token-key"
    )]
    token_key_secret: String,
    /// Namespace of `--token-key-secret` (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    token_key_namespace: String,
    /// `json` (default) or `text` logs.
    #[arg(long, env = "MOE_OPERATOR_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    if args.log_format == "text" {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    }

    let metrics = Metrics::new()?;
    let state = ServerState {
        metrics: metrics.clone(),
        ready: Arc::new(AtomicBool::new(false)),
        leader: Arc::new(AtomicBool::new(false)),
    };
    let server = tokio::spawn(server::serve(args.http_addr, state.clone()));
    info!(addr = %args.http_addr, "serving /healthz, /readyz, /metrics");

    // One request per API call (see api_client.rs): no kube retries stretch a renewal or a
    // reconcile.
    let clients = moe_operator::api_client::clients().await?;
    let client = clients.calls;
    state.ready.store(true, Ordering::Relaxed);
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "moe-operator".into());
        format!("{host}-{}", std::process::id())
    });
    let workers = Arc::new(HttpWorkers::new(Duration::from_secs(
        args.worker_timeout_seconds.max(1),
    ))?);
    let worker_resources = match args.worker_resources.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(json) => Some(serde_json::from_str(json).map_err(|e| {
            anyhow::anyhow!("MOE_OPERATOR_WORKER_RESOURCES is not a ResourceRequirements JSON: {e}")
        })?),
    };
    let control_peers = ControlPlanePeers {
        enabled: args.network_policy,
        namespace: args.operator_namespace.clone().filter(|s| !s.is_empty()),
        pod_labels: parse_labels(&args.operator_pod_labels).map_err(|e| {
            anyhow::anyhow!("MOE_OPERATOR_POD_LABELS (--operator-pod-labels): {e}")
        })?,
        extra: match args.control_peers.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(json) => serde_json::from_str(json).map_err(|e| {
                anyhow::anyhow!(
                    "MOE_OPERATOR_CONTROL_PEERS (--control-peers) is not a JSON list of NetworkPolicyPeer: {e}"
                )
            })?,
        },
    };
    let token_key = moe_operator::tokens::load_or_create(
        &client,
        &args.token_key_namespace,
        &args.token_key_secret,
    )
    .await?;
    let settings = Settings {
        token_key: Arc::new(token_key),
        control_peers,
        worker_defaults: WorkerDefaults {
            image: args.worker_image.clone().filter(|s| !s.is_empty()),
            image_pull_policy: args
                .worker_image_pull_policy
                .clone()
                .filter(|s| !s.is_empty()),
            resources: worker_resources,
        },
        max_group_restarts: args.max_group_restarts,
        group_restart_window: Duration::from_secs(args.group_restart_window_seconds.max(1)),
        ..Settings::default()
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            workers,
            metrics.clone(),
            settings,
            Some(identity.clone()),
        )
        .with_watch_client(clients.watches),
    );

    if !args.leader_elect {
        state.leader.store(true, Ordering::Relaxed);
        metrics.leader.with_label_values(&[&args.lease_name]).set(1);
        controller::run(ctx, args.namespace).await;
        server.abort();
        return Ok(());
    }

    let lease_duration = Duration::from_secs(args.lease_duration_seconds.max(3));
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client, &args.lease_namespace),
        args.lease_name.clone(),
        identity,
        lease_duration,
    );
    tokio::select! {
        _ = elector.acquire() => {}
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    state.leader.store(true, Ordering::Relaxed);
    metrics.leader.with_label_values(&[&args.lease_name]).set(1);
    tokio::select! {
        _ = controller::run(ctx, args.namespace) => {
            info!("controller stopped");
            elector.release().await;
            Ok(())
        }
        _ = elector.keep() => {
            error!("lost leadership; exiting so that a fresh follower takes over");
            std::process::exit(1);
        }
    }
}

/// `key=value,...` into a label map (at least one label: an empty selector would admit every
/// pod of the namespace).
fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("{pair:?} is not key=value"));
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    if out.is_empty() {
        return Err("no labels: give the operator pods' labels as key=value,...".into());
    }
    Ok(out)
}
