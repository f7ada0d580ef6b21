use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use moe_worker::config::{Args, Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let configs = match Config::for_process(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moe-worker: {e}");
            leave_termination_message(&e.termination_message());
            return ExitCode::from(2);
        }
    };
    let grace = configs
        .iter()
        .map(|c| c.comm_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(5);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moe-worker: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(configs, grace));
    // Engine threads of ranks that never stopped (a failed start, a missed grace period) must
    // not keep the process alive: give the runtime a moment, then exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("exiting: {e:#}");
            eprintln!("moe-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs this process's ranks until the group stops. A termination signal asks the group to
/// stop at its next step boundary; a rank that fails makes the others stop too (the group
/// cannot go on without it), and the process reports the first failure.
async fn run(configs: Vec<Config>, grace: Duration) -> anyhow::Result<()> {
    let mut stops = Vec::new();
    let mut ranks = tokio::task::JoinSet::new();
    for config in configs {
        let rank = config.rank();
        let hooks = moe_worker::Hooks {
            exit_on_hung_collective: true,
            ..moe_worker::Hooks::default()
        };
        let worker = moe_worker::start(config, hooks)
            .await
            .map_err(|e| e.context(format!("rank {rank}")))?;
        stops.push(worker.shared.clone());
        ranks.spawn(async move { (rank, worker.wait().await) });
    }
    // The first rank's /metrics serves every rank of the process (one scrape target per pod).
    if let Some((first, rest)) = stops.split_first()
        && !rest.is_empty()
    {
        let _ = first
            .local_peers
            .set(rest.iter().map(|s| s.metrics.registry.clone()).collect());
    }
    let stop_all = || {
        for s in &stops {
            s.request_stop();
        }
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut first_error: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            joined = ranks.join_next() => {
                let failure = match joined {
                    None => break,
                    Some(Ok((_, Ok(())))) => continue,
                    Some(Ok((rank, Err(e)))) => e.context(format!("rank {rank}")),
                    Some(Err(e)) => anyhow::anyhow!("a rank's task failed: {e}"),
                };
                // The group cannot go on: the other ranks get `grace` to stop.
                tracing::error!("{failure:#}");
                stop_all();
                deadline.get_or_insert(tokio::time::Instant::now() + grace);
                first_error.get_or_insert(failure);
            }
            _ = &mut signal, if deadline.is_none() => {
                tracing::info!("termination signal: stopping the group at the next step boundary");
                stop_all();
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                return Err(first_error.take().unwrap_or_else(|| {
                    anyhow::anyhow!("did not stop within {grace:?} after the termination signal")
                }));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Where Kubernetes reads a container's termination message (the pod's
/// `terminationMessagePath`, this by default); written only when it exists, i.e. in a pod.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Leaves `Reason: message` for the operator, which shows it as the Degraded reason.
fn leave_termination_message(line: &str) {
    let path = std::path::Path::new(TERMINATION_LOG);
    if path.exists()
        && let Err(e) = std::fs::write(path, line)
    {
        eprintln!("moe-worker: could not write {TERMINATION_LOG}: {e}");
    }
}
