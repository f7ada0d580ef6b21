//! One pod's life on the agent: volumes, init containers, app containers with restarts and
//! probes (`pod/container.rs`), status reporting (`pod/status.rs`), graceful deletion.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{Api, DeleteParams, Preconditions};
use serde_json::Value;
use tokio::sync::watch;

use super::env::{EnvContext, container_env, expand, rewrite_mounts, rewrite_pod_dns};
use super::volumes::{self, VolumeCtx};
use super::{PodInfo, Shared};
use crate::nodes::now_rfc3339;

mod container;
mod status;

use container::supervise;
use status::{CState, CStatus, RunState};

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
        // No network namespaces here: every pod's workers listen on their own loopback address
        // (the worker's default, every address, would make the second pod's ports collide).
        base.push(("MOE_LISTEN_ADDR".into(), self.ip.clone()));
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
}
