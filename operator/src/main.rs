//! `moe-operator`: the MoEDeployment controller with leader election, health and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use moe_operator::controller::{self, Context, Settings};
use moe_operator::leader::LeaderElector;
use moe_operator::metrics::Metrics;
use moe_operator::resources::WorkerDefaults;
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

    let client = Client::try_default().await?;
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
    let settings = Settings {
        worker_defaults: WorkerDefaults {
            image: args.worker_image.clone().filter(|s| !s.is_empty()),
            image_pull_policy: args
                .worker_image_pull_policy
                .clone()
                .filter(|s| !s.is_empty()),
            resources: worker_resources,
        },
        ..Settings::default()
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        workers,
        metrics.clone(),
        settings,
        Some(identity.clone()),
    ));

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
