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
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moe-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let grace = config.comm_timeout + Duration::from_secs(5);
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
    let result = rt.block_on(async move {
        let hooks = moe_worker::Hooks {
            exit_on_hung_collective: true,
            ..moe_worker::Hooks::default()
        };
        let worker = moe_worker::start(config, hooks).await?;
        let shared = worker.shared.clone();
        let wait = worker.wait();
        tokio::pin!(wait);
        tokio::select! {
            r = &mut wait => r,
            _ = shutdown_signal() => {
                tracing::info!("termination signal: stopping the group at the next step boundary");
                shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
                match tokio::time::timeout(grace, &mut wait).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("did not stop within {grace:?} after the termination signal")),
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("exiting: {e:#}");
            eprintln!("moe-worker: error: {e:#}");
            ExitCode::FAILURE
        }
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
