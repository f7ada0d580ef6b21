//! One pod's life on the agent: volumes, init containers, app containers with restarts and
//! probes, status reporting, graceful deletion.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::env::{EnvContext, container_env, expand, rewrite_mounts, rewrite_pod_dns};
use super::probe::{ProbeTiming, run_once};
use super::volumes::{self, VolumeCtx};
use super::{PodInfo, Shared};
use crate::nodes::now_rfc3339;

#[derive(Debug, Clone, PartialEq)]
enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

impl CState {
    fn to_json(&self) -> Value {
        match self {
            CState::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            CState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            CState::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => json!({"terminated": {
                "exitCode": exit_code, "signal": signal, "reason": reason, "message": message,
                "startedAt": started_at, "finishedAt": finished_at,
            }}),
        }
    }
}

#[derive(Debug, Clone)]
struct CStatus {
    name: String,
    image: String,
    state: CState,
    last: Option<CState>,
    restart_count: i32,
    ready: bool,
    started: bool,
    /// Terminated for good (no more restarts).
    done: bool,
}

impl CStatus {
    fn new(c: &Container) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
            done: false,
        }
    }

    fn to_json(&self, uid: &str) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("moe-e2e-agent://{}", self.image),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state.to_json(),
            "lastState": self.last.as_ref().map(CState::to_json).unwrap_or_else(|| json!({})),
        });
        if !matches!(self.state, CState::Waiting { .. }) || self.restart_count > 0 {
            v["containerID"] = json!(format!(
                "moe-e2e-agent://{uid}/{}/{}",
                self.name, self.restart_count
            ));
        }
        v
    }

    fn exit_code(&self) -> Option<i32> {
        match &self.state {
            CState::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct RunState {
    init: Vec<CStatus>,
    app: Vec<CStatus>,
    sandbox_ready: bool,
    initialized: bool,
    init_failed: bool,
    start_time: String,
    /// condition type -> (status, lastTransitionTime)
    transitions: HashMap<String, (bool, String)>,
}

/// argv, env, working directory and (mount path, host path) pairs of a container run.
type Prepared = (
    Vec<String>,
    Vec<(String, String)>,
    PathBuf,
    Vec<(String, PathBuf)>,
);

struct PodCtx {
    sh: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    key: String,
    ip: String,
    dir: PathBuf,
    restart_policy: String,
    run: Mutex<RunState>,
    last_sent: tokio::sync::Mutex<Option<Value>>,
    mounts: Mutex<HashMap<String, PathBuf>>,
    kubeconfig: Mutex<Option<PathBuf>>,
    /// `Some(grace)` once the pod must stop.
    stop: watch::Receiver<Option<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) async fn run_pod(sh: Arc<Shared>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow().clone() else {
        return;
    };
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" || pod.metadata.deletion_timestamp.is_some() {
        // Finished, or being deleted, before this runner started: only honour deletion.
        wait_deleted_then_remove(&sh, &mut rx, &ns, &name, &uid).await;
        return;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let existing_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| ip.starts_with("127."));
    let ip = if spec.host_network.unwrap_or(false) {
        "127.0.0.1".to_string()
    } else if let Some(ip) = existing_ip {
        sh.remember_ip(&ns, &name, &ip);
        ip
    } else {
        sh.ip_for(&ns, &name)
    };
    let short_uid: String = uid.chars().take(8).collect();
    let dir = sh.work_dir.join(format!("{ns}_{name}_{short_uid}"));
    if let Err(e) = std::fs::create_dir_all(dir.join("logs")) {
        tracing::error!(pod = %key, "cannot create pod dir: {e}");
        return;
    }
    if let Ok(mut pods) = sh.pods.lock() {
        pods.insert(
            key.clone(),
            PodInfo {
                uid: uid.clone(),
                ip: ip.clone(),
                dir: dir.clone(),
                containers: HashMap::new(),
            },
        );
    }
    tracing::info!(pod = %key, %ip, "agent: starting pod");

    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let run = RunState {
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(CStatus::new)
            .collect(),
        app: spec.containers.iter().map(CStatus::new).collect(),
        sandbox_ready: false,
        initialized: spec.init_containers.as_ref().is_none_or(|v| v.is_empty()),
        init_failed: false,
        start_time: now_rfc3339(),
        transitions: HashMap::new(),
    };
    let ctx = Arc::new(PodCtx {
        sh: sh.clone(),
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        pod,
        ns: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        key: key.clone(),
        ip,
        dir,
        run: Mutex::new(run),
        last_sent: tokio::sync::Mutex::new(None),
        mounts: Mutex::new(HashMap::new()),
        kubeconfig: Mutex::new(None),
        stop: stop_rx,
    });
    ctx.report().await;

    let lifecycle = tokio::spawn(lifecycle(ctx.clone()));
    sh.track_task(lifecycle.abort_handle());
    let ticker = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                ctx.report().await;
            }
        })
    };
    sh.track_task(ticker.abort_handle());

    // Wait for deletion.
    let mut gone = false;
    let mut first = true;
    let grace = loop {
        // Look at the current value first (it may have changed while the pod started).
        if !first && rx.changed().await.is_err() {
            gone = true;
            break Duration::ZERO;
        }
        first = false;
        let cur = rx.borrow_and_update().clone();
        match cur {
            None => {
                gone = true;
                break Duration::ZERO;
            }
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                let secs = p
                    .metadata
                    .deletion_grace_period_seconds
                    .or(spec.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64;
                break Duration::from_secs(secs).min(sh.cfg.max_grace);
            }
            Some(p) => ctx.reassert_readiness(&p).await,
        }
    };
    tracing::info!(pod = %key, ?grace, gone, "agent: stopping pod");
    let _ = stop_tx.send(Some(grace));
    let _ = lifecycle.await;
    ticker.abort();
    if !gone {
        ctx.report().await;
        delete_now(&sh, &ns, &name, &uid).await;
    }
    if let Ok(mut pods) = sh.pods.lock()
        && pods.get(&key).is_some_and(|p| p.uid == uid)
    {
        pods.remove(&key);
    }
}

async fn wait_deleted_then_remove(
    sh: &Arc<Shared>,
    rx: &mut watch::Receiver<Option<Pod>>,
    ns: &str,
    name: &str,
    uid: &str,
) {
    loop {
        let deleting = match &*rx.borrow() {
            None => return,
            Some(p) => p.metadata.deletion_timestamp.is_some(),
        };
        if deleting {
            delete_now(sh, ns, name, uid).await;
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Removes the pod object with grace 0 (what the kubelet does once containers are gone).
async fn delete_now(sh: &Arc<Shared>, ns: &str, name: &str, uid: &str) {
    let api: Api<Pod> = Api::namespaced(sh.client.clone(), ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "agent: pod removed"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), "agent: removing pod failed: {e}"),
    }
}

async fn lifecycle(ctx: Arc<PodCtx>) {
    // Pods whose containers all use fake images get no volumes (nothing would read them, and
    // scale tests run hundreds of such pods).
    let all_fake = ctx.pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .all(|c| {
                ctx.sh
                    .cfg
                    .images
                    .is_fake(c.image.as_deref().unwrap_or_default())
            })
    });
    // Volumes (retried until the referenced objects exist).
    let mut stop = ctx.stop.clone();
    loop {
        if stop.borrow().is_some() {
            return;
        }
        if all_fake {
            break;
        }
        match ctx.fill_volumes(false).await {
            Ok(()) => break,
            Err(e) => {
                ctx.set_all_waiting("ContainerCreating", Some(format!("{e:#}")));
                ctx.report().await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
    let refresher = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if all_fake {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Err(e) = ctx.fill_volumes(true).await {
                    tracing::debug!(pod = %ctx.key, "volume refresh: {e:#}");
                }
            }
        })
    };
    ctx.sh.track_task(refresher.abort_handle());
    lock(&ctx.run).sandbox_ready = true;
    for s in lock(&ctx.run).app.iter_mut() {
        s.state = CState::Waiting {
            reason: "PodInitializing".into(),
            message: None,
        };
    }
    ctx.report().await;

    let spec = ctx.pod.spec.clone().unwrap_or_default();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        match supervise(ctx.clone(), c.clone(), i, true).await {
            Some(0) => {}
            Some(_) => {
                lock(&ctx.run).init_failed = true;
                ctx.report().await;
                refresher.abort();
                return;
            }
            None => {
                refresher.abort();
                return;
            }
        }
    }
    lock(&ctx.run).initialized = true;
    ctx.report().await;

    let mut set = tokio::task::JoinSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        set.spawn(supervise(ctx.clone(), c.clone(), i, false));
    }
    while set.join_next().await.is_some() {}
    refresher.abort();
    ctx.report().await;
}

/// Runs one container until it is done (per restartPolicy) or the pod stops. Returns the
/// final exit code, or `None` when stopped.
async fn supervise(ctx: Arc<PodCtx>, c: Container, idx: usize, init: bool) -> Option<i32> {
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

impl PodCtx {
    fn update(&self, init: bool, idx: usize, f: impl FnOnce(&mut CStatus)) {
        let mut run = lock(&self.run);
        let list = if init { &mut run.init } else { &mut run.app };
        if let Some(s) = list.get_mut(idx) {
            f(s);
        }
    }

    fn status(&self, init: bool, idx: usize) -> Option<CStatus> {
        let run = lock(&self.run);
        let list = if init { &run.init } else { &run.app };
        list.get(idx).cloned()
    }

    fn set_all_waiting(&self, reason: &str, message: Option<String>) {
        let mut guard = lock(&self.run);
        let run = &mut *guard;
        for s in run.init.iter_mut().chain(run.app.iter_mut()) {
            if matches!(s.state, CState::Waiting { .. }) {
                s.state = CState::Waiting {
                    reason: reason.to_string(),
                    message: message.clone(),
                };
            }
        }
    }

    async fn fill_volumes(&self, refresh: bool) -> Result<()> {
        let vctx = VolumeCtx {
            client: &self.sh.client,
            pod: &self.pod,
            pod_ip: &self.ip,
            pod_dir: &self.dir,
            refresh,
        };
        let m = volumes::materialize(&vctx).await?;
        if refresh {
            // A refresh may leave out a volume it could not re-resolve (a claim): keep its mount.
            lock(&self.mounts).extend(m);
        } else {
            *lock(&self.mounts) = m;
        }
        if !refresh {
            let wants_token = self.pod.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.projected.as_ref().is_some_and(|p| {
                        p.sources
                            .iter()
                            .flatten()
                            .any(|s| s.service_account_token.is_some())
                    })
                })
            });
            if let (true, Some(port), Some(ca)) = (
                wants_token,
                self.sh.cfg.api_port,
                self.sh.cfg.ca_pem.as_deref(),
            ) {
                let kc =
                    volumes::service_account_kubeconfig(&self.sh.client, &self.pod, port, ca, 3600)
                        .await?;
                let p = self.dir.join("kubeconfig");
                std::fs::write(&p, kc)?;
                *lock(&self.kubeconfig) = Some(p);
            }
        }
        Ok(())
    }

    /// argv, env and working directory of a container run.
    async fn prepare(&self, c: &Container) -> Result<Prepared> {
        let vols = lock(&self.mounts).clone();
        let mounts: Vec<(String, PathBuf)> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let base = vols.get(&m.name)?;
                let host = match m.sub_path.as_deref() {
                    Some(sp) if !sp.is_empty() && !sp.contains("..") => base.join(sp),
                    _ => base.clone(),
                };
                Some((m.mount_path.clone(), host))
            })
            .collect();
        let (cms, secrets) = self.fetch_env_refs(c).await?;
        let spec = self.pod.spec.as_ref();
        let mut base: Vec<(String, String)> = self
            .sh
            .cfg
            .inherit_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        let hostname = spec
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| self.name.clone());
        base.push(("HOSTNAME".into(), hostname));
        base.push(("HOME".into(), self.dir.display().to_string()));
        base.push(("MOE_E2E_POD_DIR".into(), self.dir.display().to_string()));
        base.push(("MOE_E2E_POD_IP".into(), self.ip.clone()));
        if let Some(port) = self.sh.cfg.api_port {
            base.push(("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()));
            base.push(("KUBERNETES_SERVICE_PORT".into(), port.to_string()));
            base.push(("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()));
        }
        if let Some(kc) = lock(&self.kubeconfig).clone() {
            base.push(("KUBECONFIG".into(), kc.display().to_string()));
        }
        let ectx = EnvContext {
            pod: &self.pod,
            pod_ip: &self.ip,
            host_ip: "127.0.0.1",
            config_maps: &cms,
            secrets: &secrets,
        };
        let resolve = |ns: &str, host: &str| Some(self.sh.ip_for(ns, host));
        let env: Vec<(String, String)> = container_env(&ectx, c, &base, &mounts)?
            .into_iter()
            .map(|(k, v)| (k, rewrite_pod_dns(&v, &resolve)))
            .collect();
        let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let sub = |v: &Vec<String>| -> Vec<String> {
            v.iter()
                .map(|s| rewrite_pod_dns(&rewrite_mounts(&expand(s, &lookup), &mounts), &resolve))
                .collect()
        };
        let command = sub(&c.command.clone().unwrap_or_default());
        let args = sub(&c.args.clone().unwrap_or_default());
        let argv =
            self.sh
                .cfg
                .images
                .argv(c.image.as_deref().unwrap_or_default(), &command, &args)?;
        let cwd = match c.working_dir.as_deref() {
            Some(w) if !w.is_empty() => {
                let p = PathBuf::from(rewrite_mounts(w, &mounts));
                if p.is_dir() { p } else { self.dir.clone() }
            }
            _ => self.dir.clone(),
        };
        Ok((argv, env, cwd, mounts))
    }

    #[allow(clippy::type_complexity)]
    async fn fetch_env_refs(
        &self,
        c: &Container,
    ) -> Result<(
        HashMap<String, BTreeMap<String, String>>,
        HashMap<String, BTreeMap<String, String>>,
    )> {
        let mut cm_names = Vec::new();
        let mut secret_names = Vec::new();
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cm_names.push(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                secret_names.push(r.name.clone());
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    cm_names.push(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secret_names.push(r.name.clone());
                }
            }
        }
        let to_str = |m: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, String> {
            m.into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect()
        };
        let mut cms = HashMap::new();
        let api: Api<ConfigMap> = Api::namespaced(self.sh.client.clone(), &self.ns);
        for n in cm_names {
            if let Some(cm) = api.get_opt(&n).await? {
                cms.insert(n, to_str(volumes::config_map_data(&cm)));
            }
        }
        let mut secrets = HashMap::new();
        let api: Api<Secret> = Api::namespaced(self.sh.client.clone(), &self.ns);
        for n in secret_names {
            if let Some(s) = api.get_opt(&n).await? {
                secrets.insert(n, to_str(volumes::secret_data(&s)));
            }
        }
        Ok((cms, secrets))
    }

    fn build_status(&self) -> Value {
        let mut run = lock(&self.run);
        let all_ready = run.initialized && !run.app.is_empty() && run.app.iter().all(|s| s.ready);
        let phase = if run.init_failed {
            "Failed"
        } else if !run.initialized {
            "Pending"
        } else if run.app.iter().all(|s| s.done) {
            if run.app.iter().all(|s| s.exit_code() == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if run.app.iter().any(|s| s.started) {
            "Running"
        } else {
            "Pending"
        };
        let now = now_rfc3339();
        let conds = [
            ("PodReadyToStartContainers", run.sandbox_ready),
            ("Initialized", run.initialized),
            ("ContainersReady", all_ready),
            ("Ready", all_ready),
        ];
        let mut conditions = Vec::new();
        for (t, ok) in conds {
            let entry = run
                .transitions
                .entry(t.to_string())
                .or_insert_with(|| (ok, now.clone()));
            if entry.0 != ok {
                *entry = (ok, now.clone());
            }
            let mut c = json!({
                "type": t,
                "status": if ok { "True" } else { "False" },
                "lastTransitionTime": entry.1,
                "lastProbeTime": null,
            });
            if !ok && (t == "Ready" || t == "ContainersReady") {
                let not_ready: Vec<&str> = run
                    .app
                    .iter()
                    .filter(|s| !s.ready)
                    .map(|s| s.name.as_str())
                    .collect();
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
            conditions.push(c);
        }
        let mut status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": run.start_time,
            "conditions": conditions,
            "containerStatuses": run.app.iter().map(|s| s.to_json(&self.uid)).collect::<Vec<_>>(),
        });
        if !run.init.is_empty() {
            status["initContainerStatuses"] = json!(
                run.init
                    .iter()
                    .map(|s| s.to_json(&self.uid))
                    .collect::<Vec<_>>()
            );
        }
        status
    }

    /// Sends this agent's view of the pod again when the server's Ready condition disagrees with
    /// the last one sent. A kubelet owns that condition, but the node lifecycle controller also
    /// sets it to False when a node's heartbeat is late; without this, a pod stays not ready
    /// after its node is Ready again.
    async fn reassert_readiness(&self, server: &Pod) {
        let on_server = server
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        let diverged = {
            let mut last = self.last_sent.lock().await;
            let sent = last
                .as_ref()
                .and_then(|v| v["conditions"].as_array())
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str())
                .map(str::to_string);
            let diverged = sent.is_some() && on_server.is_some() && sent != on_server;
            if diverged {
                *last = None;
            }
            diverged
        };
        if diverged {
            tracing::info!(pod = %self.key, "agent: Ready condition changed by someone else; reporting again");
            self.report().await;
        }
    }

    /// Patches the pod status if it changed since the last successful write.
    async fn report(&self) {
        let status = self.build_status();
        let mut last = self.last_sent.lock().await;
        if last.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.ns);
        let patch = json!({"status": status});
        match api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => *last = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => *last = Some(status),
            Err(e) => {
                tracing::warn!(pod = %self.key, "agent: status update failed: {e}");
                *last = None;
            }
        }
    }
}
