//! One container's run on the agent: its process (or a fake one), restarts per the pod's
//! restartPolicy, probes, and termination with the pod's grace period.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Container;
use tokio::sync::oneshot;

use super::super::env::{expand, rewrite_mounts};
use super::super::probe::{ProbeTiming, run_once};
use super::PodCtx;
use super::status::CState;
use crate::nodes::now_rfc3339;

/// Runs one container until it is done (per restartPolicy) or the pod stops. Returns the
/// final exit code, or `None` when stopped.
pub(super) async fn supervise(
    ctx: Arc<PodCtx>,
    c: Container,
    idx: usize,
    init: bool,
) -> Option<i32> {
    let mut stop = ctx.stop.clone();
    let cfg = &ctx.sh.cfg;
    let mut backoff = cfg.backoff_initial;
    loop {
        if stop.borrow().is_some() {
            return None;
        }
        if cfg.images.is_fake(c.image.as_deref().unwrap_or_default()) {
            return fake_container(&ctx, init, idx).await;
        }
        // Environment, argv, working directory.
        let prepared = ctx.prepare(&c).await;
        let (argv, env, cwd, mounts) = match prepared {
            Ok(x) => x,
            Err(e) => {
                ctx.update(init, idx, |s| {
                    s.state = CState::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: Some(format!("{e:#}")),
                    }
                });
                ctx.report().await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return None,
                }
            }
        };
        let restarts = ctx.status(init, idx).map(|s| s.restart_count).unwrap_or(0);
        let log = ctx
            .dir
            .join("logs")
            .join(format!("{}-{restarts}.log", c.name));
        let started_at = now_rfc3339();
        let t0 = Instant::now();
        let spawned = spawn_process(&argv, &env, &cwd, &log);
        let (exit_code, signal, message, stopped) = match spawned {
            Err(e) => (128, None, Some(format!("{e:#}")), false),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                if let Ok(mut p) = ctx.sh.pids.lock() {
                    p.insert(pid);
                }
                ctx.sh.with_pod(&ctx.key, |p| {
                    p.containers
                        .insert(c.name.clone(), (Some(pid), log.clone()));
                });
                let has_readiness = c.readiness_probe.is_some() && !init;
                ctx.update(init, idx, |s| {
                    s.state = CState::Running {
                        started_at: started_at.clone(),
                    };
                    s.started = true;
                    s.ready = !has_readiness && !init;
                });
                ctx.report().await;
                tracing::debug!(pod = %ctx.key, container = %c.name, pid, ?argv, "agent: container started");

                let (live_tx, live_rx) = oneshot::channel::<()>();
                let probes = if init {
                    None
                } else {
                    let h = tokio::spawn(probe_loop(
                        ctx.clone(),
                        with_rewritten_probes(&c, &env, &mounts),
                        idx,
                        env.clone(),
                        cwd.clone(),
                        live_tx,
                    ));
                    ctx.sh.track_task(h.abort_handle());
                    Some(h)
                };
                let mut stopped = false;
                let mut liveness_killed = false;
                let status = tokio::select! {
                    st = child.wait() => st.ok(),
                    _ = async { let _ = stop.wait_for(|g| g.is_some()).await; } => {
                        stopped = true;
                        let grace = pod_grace(&ctx);
                        terminate(&mut child, pid, grace).await
                    }
                    Ok(()) = live_rx => {
                        liveness_killed = true;
                        terminate(&mut child, pid, cfg.max_grace).await
                    }
                };
                if let Some(h) = probes {
                    h.abort();
                }
                // The container is over when its main process is: stop whatever it left
                // running in its process group (as a runtime tears down the container).
                crate::process::kill_group(pid, libc::SIGKILL);
                if let Ok(mut p) = ctx.sh.pids.lock() {
                    p.remove(&pid);
                }
                ctx.sh.with_pod(&ctx.key, |p| {
                    p.containers.insert(c.name.clone(), (None, log.clone()));
                });
                use std::os::unix::process::ExitStatusExt;
                let code = status.and_then(|s| s.code());
                let sig = status.and_then(|s| s.signal());
                let exit = code.unwrap_or_else(|| 128 + sig.unwrap_or(9));
                let msg = liveness_killed.then(|| "liveness probe failed".to_string());
                (exit, sig, msg, stopped)
            }
        };
        let finished = CState::Terminated {
            exit_code,
            signal,
            reason: if message.is_some() && exit_code == 128 {
                "StartError".into()
            } else if exit_code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            message,
            started_at,
            finished_at: now_rfc3339(),
        };
        tracing::info!(pod = %ctx.key, container = %c.name, exit_code, stopped, "agent: container exited");
        let restart = !stopped
            && match ctx.restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => exit_code != 0,
                _ => !(init && exit_code == 0),
            };
        if !restart {
            ctx.update(init, idx, |s| {
                s.state = finished.clone();
                s.ready = false;
                s.done = true;
            });
            ctx.report().await;
            return if stopped { None } else { Some(exit_code) };
        }
        if t0.elapsed() > Duration::from_secs(60) {
            backoff = cfg.backoff_initial;
        }
        ctx.update(init, idx, |s| {
            s.last = Some(finished.clone());
            s.restart_count += 1;
            s.ready = false;
            s.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!("back-off {backoff:?} restarting failed container")),
            };
        });
        ctx.report().await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return None,
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// A container of a fake image: Running and Ready (init containers: exit 0 at once) until the
/// pod stops.
async fn fake_container(ctx: &Arc<PodCtx>, init: bool, idx: usize) -> Option<i32> {
    let started_at = now_rfc3339();
    if init {
        ctx.update(true, idx, |s| {
            s.state = CState::Terminated {
                exit_code: 0,
                signal: None,
                reason: "Completed".into(),
                message: None,
                started_at: started_at.clone(),
                finished_at: now_rfc3339(),
            };
            s.done = true;
        });
        ctx.report().await;
        return Some(0);
    }
    ctx.update(false, idx, |s| {
        s.state = CState::Running {
            started_at: started_at.clone(),
        };
        s.started = true;
        s.ready = true;
    });
    ctx.report().await;
    let mut stop = ctx.stop.clone();
    let _ = stop.wait_for(|g| g.is_some()).await;
    ctx.update(false, idx, |s| {
        s.state = CState::Terminated {
            exit_code: 0,
            signal: None,
            reason: "Completed".into(),
            message: None,
            started_at,
            finished_at: now_rfc3339(),
        };
        s.ready = false;
        s.done = true;
    });
    None
}

fn pod_grace(ctx: &PodCtx) -> Duration {
    let g = *ctx.stop.borrow();
    g.unwrap_or_default()
}

/// A copy of the container whose exec-probe commands have `$(VAR)` expanded and mount paths
/// rewritten, like its command.
fn with_rewritten_probes(
    c: &Container,
    env: &[(String, String)],
    mounts: &[(String, PathBuf)],
) -> Container {
    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut c = c.clone();
    for p in [
        &mut c.readiness_probe,
        &mut c.liveness_probe,
        &mut c.startup_probe,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(cmd) = p.exec.as_mut().and_then(|e| e.command.as_mut()) {
            for a in cmd.iter_mut() {
                *a = rewrite_mounts(&expand(a, &lookup), mounts);
            }
        }
    }
    c
}

/// SIGTERM to the process group, SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    crate::process::kill_group(pid, libc::SIGTERM);
    if let Ok(Ok(st)) = tokio::time::timeout(grace, child.wait()).await {
        crate::process::kill_group(pid, libc::SIGKILL);
        return Some(st);
    }
    crate::process::kill_group(pid, libc::SIGKILL);
    child.wait().await.ok()
}

fn spawn_process(
    argv: &[String],
    env: &[(String, String)],
    cwd: &PathBuf,
    log: &PathBuf,
) -> Result<tokio::process::Child> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("empty command"))?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new(prog);
    // Look the program up on the container's PATH (as a runtime would), not the agent's.
    if !prog.contains('/')
        && let Some((_, path)) = env.iter().find(|(k, _)| k == "PATH")
        && let Some(found) = std::env::split_paths(path)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    {
        cmd = tokio::process::Command::new(found);
    }
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(out))
        .stderr(std::process::Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true);
    crate::process::die_with_parent(cmd.as_std_mut());
    cmd.spawn().with_context(|| format!("starting {prog}"))
}

async fn probe_loop(
    ctx: Arc<PodCtx>,
    c: Container,
    idx: usize,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    live_tx: oneshot::Sender<()>,
) {
    let readiness = async {
        let Some(p) = c.readiness_probe.clone() else {
            return std::future::pending::<()>().await;
        };
        let t = ProbeTiming::of(&p);
        tokio::time::sleep(t.initial_delay).await;
        let (mut ok, mut bad) = (0u32, 0u32);
        loop {
            let res = run_once(&c, &p, &ctx.ip, &env, &cwd).await;
            let before = ctx.status(false, idx).map(|s| s.ready).unwrap_or(false);
            let mut now = before;
            match res {
                Ok(()) => {
                    ok += 1;
                    bad = 0;
                    if ok >= t.success_threshold {
                        now = true;
                    }
                }
                Err(e) => {
                    tracing::trace!(pod = %ctx.key, container = %c.name, "readiness probe: {e:#}");
                    bad += 1;
                    ok = 0;
                    if bad >= t.failure_threshold {
                        now = false;
                    }
                }
            }
            if now != before {
                ctx.update(false, idx, |s| s.ready = now);
                ctx.report().await;
            }
            // Probe quickly until first ready, as the kubelet's start-up is not the thing
            // under test; then at the probe's period.
            let period = if now {
                t.period
            } else {
                t.period.min(Duration::from_millis(500))
            };
            tokio::time::sleep(period).await;
        }
    };
    let liveness = async {
        let Some(p) = c.liveness_probe.clone() else {
            return std::future::pending::<()>().await;
        };
        let t = ProbeTiming::of(&p);
        tokio::time::sleep(t.initial_delay).await;
        let mut bad = 0u32;
        loop {
            match run_once(&c, &p, &ctx.ip, &env, &cwd).await {
                Ok(()) => bad = 0,
                Err(e) => {
                    bad += 1;
                    tracing::debug!(pod = %ctx.key, container = %c.name, bad, "liveness probe: {e:#}");
                    if bad >= t.failure_threshold {
                        return;
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    };
    tokio::select! {
        _ = readiness => {}
        _ = liveness => { let _ = live_tx.send(()); }
    }
}
