//! The kubelet stand-in.
//!
//! **This agent replaces the kubelet and the container runtime**, which these machines cannot
//! run (no Docker, no containerd, no root-level cgroup setup). It registers fake GPU nodes and,
//! for every pod the real scheduler binds to one of them, runs each container's command as a
//! plain local process: no image is pulled, no filesystem or network namespace is created, no
//! resource limits are enforced. What it does do, see `docs/e2e.md` for the full list:
//!
//! * container image -> local binary through an [`ImageMap`];
//! * env with `value`, `$(VAR)` expansion, `fieldRef` (`metadata.name`, `metadata.namespace`,
//!   `metadata.uid`, `metadata.labels['..']`, `metadata.annotations['..']`, `spec.nodeName`,
//!   `spec.serviceAccountName`, `status.podIP`, `status.hostIP`), `resourceFieldRef`,
//!   `configMapKeyRef`, `secretKeyRef`, `envFrom`;
//! * volumes: configMap, secret, downwardAPI, projected (incl. serviceAccountToken), emptyDir,
//!   hostPath, materialised in a per-pod directory and kept in sync with the API (every 2 s).
//!   Mount paths are rewritten (see [`env::rewrite_mounts`]) in command, args and env values;
//! * a loopback pod IP `127.A.B.C` per pod name (unique within the process, stable across
//!   re-creation of a pod with the same name), exported through the downward API and as
//!   `MOE_LISTEN_ADDR` (the workers of different pods share one network namespace here, so
//!   each listens on its own pod IP instead of every address);
//!   `hostNetwork` pods get 127.0.0.1; StatefulSet pod DNS names
//!   (`<pod>.<service>.<namespace>.svc`) in env values and args are replaced by pod IPs
//!   ([`env::rewrite_pod_dns`]);
//! * `KUBERNETES_SERVICE_HOST/PORT` pointing at the API server and, when the pod mounts a
//!   service-account token, `KUBECONFIG` pointing at a kubeconfig holding a real token for the
//!   pod's service account (so in-cluster RBAC is exercised by `kube::Config::infer()`);
//! * pod status: phase, pod IP, conditions, container states, restart counts, readiness from
//!   the readiness probe (httpGet / tcpSocket / exec), liveness-probe restarts;
//! * init containers (sequentially, before the app containers), restartPolicy
//!   Always / OnFailure / Never with exponential back-off;
//! * deletion: SIGTERM to the container's process group, SIGKILL after the grace period
//!   (capped by [`AgentConfig::max_grace`]), then the pod is removed with grace 0.

pub mod env;
pub mod images;
mod pod;
pub mod probe;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::task::AbortHandle;

pub use images::ImageMap;

use crate::nodes::{self, FakeNode};

/// Configuration of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The nodes it registers and serves.
    pub nodes: Vec<FakeNode>,
    /// Container image -> binary.
    pub images: ImageMap,
    /// Where pod directories go (default: `<cluster dir>/pods`).
    pub work_dir: Option<PathBuf>,
    /// API server port, for `KUBERNETES_SERVICE_PORT` and pod kubeconfigs (set by the cluster).
    pub api_port: Option<u16>,
    /// API server CA (PEM), for pod kubeconfigs (set by the cluster).
    pub ca_pem: Option<String>,
    /// Upper bound on the termination grace period, to keep tests fast.
    pub max_grace: Duration,
    /// First restart back-off; doubles up to `backoff_max` (kubelet: 10 s and 5 min).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Host environment variables passed to every container (containers otherwise get only
    /// their pod's env). Default: PATH, LD_LIBRARY_PATH, RUST_BACKTRACE.
    pub inherit_env: Vec<String>,
    /// Node lease renewal interval.
    pub heartbeat: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            images: ImageMap::workspace_default(),
            work_dir: None,
            api_port: None,
            ca_pem: None,
            max_grace: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            inherit_env: vec![
                "PATH".to_string(),
                "LD_LIBRARY_PATH".to_string(),
                "RUST_BACKTRACE".to_string(),
            ],
            heartbeat: Duration::from_secs(10),
        }
    }
}

impl AgentConfig {
    /// `count` GPU nodes `gpu-node-0..` with `gpus` GPUs each, and the workspace image table.
    pub fn gpu_nodes(count: usize, gpus: u32) -> Self {
        Self {
            nodes: (0..count)
                .map(|i| FakeNode::gpu(format!("gpu-node-{i}"), gpus))
                .collect(),
            ..Self::default()
        }
    }

    pub fn node(mut self, n: FakeNode) -> Self {
        self.nodes.push(n);
        self
    }

    pub fn images(mut self, images: ImageMap) -> Self {
        self.images = images;
        self
    }

    /// Adds an image rule (see [`ImageMap::image`]).
    pub fn image(mut self, pattern: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        self.images = self.images.image(pattern, binary);
        self
    }
}

/// What the agent knows about a pod it runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct PodInfo {
    pub uid: String,
    pub ip: String,
    pub dir: PathBuf,
    /// container name -> (pid of the current process, current log file)
    pub containers: HashMap<String, (Option<u32>, PathBuf)>,
}

pub(crate) struct Shared {
    pub client: Client,
    pub cfg: AgentConfig,
    pub work_dir: PathBuf,
    node_names: HashSet<String>,
    /// Process-group leaders of every live container process.
    pub pids: Mutex<HashSet<u32>>,
    pub pods: Mutex<HashMap<String, PodInfo>>,
    tasks: Mutex<Vec<AbortHandle>>,
    ip_octet: u8,
    ip_next: AtomicU32,
    /// `namespace/pod name` -> loopback IP. Kept after a pod is gone, so a replacement pod of
    /// the same name (StatefulSet) gets the same IP, and names can be resolved before their
    /// pod starts (see [`env::rewrite_pod_dns`]).
    ips: Mutex<HashMap<String, String>>,
}

impl Shared {
    fn new_ip(&self) -> String {
        let n = self.ip_next.fetch_add(1, Ordering::Relaxed);
        format!(
            "127.{}.{}.{}",
            self.ip_octet,
            1 + (n / 250) % 250,
            1 + n % 250
        )
    }

    /// The IP of pod `ns/name`, allocated on first use.
    pub fn ip_for(&self, ns: &str, name: &str) -> String {
        let mut ips = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        ips.entry(key(ns, name))
            .or_insert_with(|| self.new_ip())
            .clone()
    }

    /// Records an IP a pod already has (agent restarted on a running cluster).
    pub fn remember_ip(&self, ns: &str, name: &str, ip: &str) {
        let mut ips = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        ips.insert(key(ns, name), ip.to_string());
    }

    pub fn track_task(&self, h: AbortHandle) {
        if let Ok(mut t) = self.tasks.lock() {
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
    }

    pub fn with_pod<R>(&self, key: &str, f: impl FnOnce(&mut PodInfo) -> R) -> Option<R> {
        self.pods.lock().ok()?.get_mut(key).map(f)
    }
}

/// A running agent; dropping it aborts its tasks and SIGKILLs every container process group.
pub struct Agent {
    shared: Arc<Shared>,
}

/// A cheap handle for tests: pod IPs, logs, killing container processes.
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
}

static AGENTS: AtomicU32 = AtomicU32::new(0);

impl Agent {
    /// Registers the nodes and starts serving them.
    pub async fn start(client: Client, cfg: AgentConfig) -> Result<Agent> {
        let work_dir = match &cfg.work_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("moe-e2e-agent-{}", std::process::id())),
        };
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        for n in &cfg.nodes {
            nodes::register(&client, n).await?;
        }
        // Second octet of pod IPs: distinct per agent in this process, and spread by pid so
        // concurrently running test binaries rarely collide.
        let k = AGENTS.fetch_add(1, Ordering::Relaxed);
        let ip_octet = (10 + (std::process::id().wrapping_mul(7).wrapping_add(k * 13)) % 240) as u8;
        let shared = Arc::new(Shared {
            client: client.clone(),
            node_names: cfg.nodes.iter().map(|n| n.name.clone()).collect(),
            cfg,
            work_dir,
            pids: Mutex::new(HashSet::new()),
            pods: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            ip_octet,
            ip_next: AtomicU32::new(0),
            ips: Mutex::new(HashMap::new()),
        });

        let hb = tokio::spawn(heartbeat_loop(shared.clone()));
        shared.track_task(hb.abort_handle());
        let w = tokio::spawn(watch_loop(shared.clone()));
        shared.track_task(w.abort_handle());
        tracing::info!(nodes = ?shared.node_names, "moe-e2e agent started");
        Ok(Agent { shared })
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(tasks) = self.shared.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
        if let Ok(pids) = self.shared.pids.lock() {
            for pid in pids.iter() {
                crate::process::kill_group(*pid, libc::SIGKILL);
            }
        }
    }
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl AgentHandle {
    /// The loopback IP the agent gave the pod.
    pub fn pod_ip(&self, ns: &str, pod: &str) -> Option<String> {
        self.shared.with_pod(&key(ns, pod), |p| p.ip.clone())
    }

    /// The pod's directory (volumes, logs, kubeconfig).
    pub fn pod_dir(&self, ns: &str, pod: &str) -> Option<PathBuf> {
        self.shared.with_pod(&key(ns, pod), |p| p.dir.clone())
    }

    /// Log file of the container's current (or last) run.
    pub fn log_path(&self, ns: &str, pod: &str, container: &str) -> Option<PathBuf> {
        self.shared
            .with_pod(&key(ns, pod), |p| {
                p.containers.get(container).map(|c| c.1.clone())
            })
            .flatten()
    }

    /// Output of the container's current (or last) run.
    pub fn logs(&self, ns: &str, pod: &str, container: &str) -> Result<String> {
        let p = self
            .log_path(ns, pod, container)
            .ok_or_else(|| anyhow!("no container {container} in pod {ns}/{pod} on this agent"))?;
        Ok(String::from_utf8_lossy(&std::fs::read(&p)?).into_owned())
    }

    /// Pid (= process group) of the container's running process.
    pub fn container_pid(&self, ns: &str, pod: &str, container: &str) -> Option<u32> {
        self.shared
            .with_pod(&key(ns, pod), |p| {
                p.containers.get(container).and_then(|c| c.0)
            })
            .flatten()
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`) to the container's process group: a crash, as
    /// far as the pod is concerned (it restarts per restartPolicy).
    pub fn kill_container(&self, ns: &str, pod: &str, container: &str, signal: i32) -> Result<()> {
        let pid = self
            .container_pid(ns, pod, container)
            .ok_or_else(|| anyhow!("container {container} of {ns}/{pod} is not running"))?;
        crate::process::kill_group(pid, signal);
        Ok(())
    }

    /// Names of the nodes this agent serves.
    pub fn node_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.node_names.iter().cloned().collect();
        v.sort();
        v
    }

    /// `namespace/name` of every pod the agent currently runs.
    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .pods
            .lock()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

async fn heartbeat_loop(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(sh.cfg.heartbeat).await;
        for n in &sh.cfg.nodes {
            if let Err(e) = nodes::heartbeat(&sh.client, n).await {
                tracing::warn!(node = %n.name, "heartbeat failed: {e:#}");
            }
        }
    }
}

/// Watches all pods, starts a runner for each pod bound to one of our nodes, and feeds it the
/// latest object (`None` once the pod is gone from the API).
async fn watch_loop(sh: Arc<Shared>) {
    let api: Api<Pod> = Api::all(sh.client.clone());
    let cfg = watcher::Config::default().any_semantic();
    let mut stream = watcher(api, cfg).boxed();
    let mut runners: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut seen_in_init: HashSet<String> = HashSet::new();
    let ours = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some_and(|n| sh.node_names.contains(n))
    };
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("pod watch error: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let apply = |pod: Pod, runners: &mut HashMap<String, watch::Sender<Option<Pod>>>| {
            let Some(uid) = pod.metadata.uid.clone() else {
                return;
            };
            if !ours(&pod) {
                return;
            }
            if let Some(tx) = runners.get(&uid) {
                if !tx.is_closed() {
                    let _ = tx.send(Some(pod));
                    return;
                }
                // The runner finished (terminal pod already removed); nothing more to do
                // unless the pod is being deleted and still exists.
                if pod.metadata.deletion_timestamp.is_none() {
                    return;
                }
            }
            let (tx, rx) = watch::channel(Some(pod));
            let h = tokio::spawn(pod::run_pod(sh.clone(), rx));
            sh.track_task(h.abort_handle());
            runners.insert(uid, tx);
        };
        match ev {
            watcher::Event::Init => seen_in_init.clear(),
            watcher::Event::InitApply(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    seen_in_init.insert(uid.clone());
                }
                apply(pod, &mut runners);
            }
            watcher::Event::InitDone => {
                // Pods that vanished while the watch was down.
                runners.retain(|uid, tx| {
                    if seen_in_init.contains(uid) {
                        true
                    } else {
                        let _ = tx.send(None);
                        false
                    }
                });
            }
            watcher::Event::Apply(pod) => apply(pod, &mut runners),
            watcher::Event::Delete(pod) => {
                if let Some(uid) = &pod.metadata.uid
                    && let Some(tx) = runners.remove(uid)
                {
                    let _ = tx.send(None);
                }
            }
        }
    }
}
