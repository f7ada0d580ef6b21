//! A real local control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler on loopback ports chosen at run time, in a temporary directory, with
//! generated certificates. Dropping the [`Cluster`] stops everything by process id (also when
//! the test panics).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, Config};

use crate::agent::{Agent, AgentConfig, AgentHandle};
use crate::bins::Bins;
use crate::certs::{self, CertFiles};
use crate::node::{NodeBins, NodeMode, NodeParams, Nodes, RealNode};
use crate::process::{ManagedProcess, free_port, log_tail, wait_until};

/// Options for [`Cluster::start_with`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Use this directory instead of a fresh temporary one (it is not deleted on drop).
    pub dir: Option<PathBuf>,
    /// Extra `--flag=value` arguments for kube-apiserver.
    pub apiserver_args: Vec<String>,
    /// Extra arguments for kube-controller-manager.
    pub controller_manager_args: Vec<String>,
    /// Do not start the scheduler (pods then stay unbound unless the test binds them).
    pub no_scheduler: bool,
    /// Do not start the controller manager.
    pub no_controller_manager: bool,
}

/// A running local control plane. See the crate docs for an example.
pub struct Cluster {
    // Field order matters for drop: the agent (pod processes) goes first, then the control
    // plane processes in reverse start order (see `Drop`), then the directory.
    agent: Option<Agent>,
    node: Option<RealNode>,
    procs: Vec<ManagedProcess>,
    client: Client,
    bins: Bins,
    certs: CertFiles,
    api_port: u16,
    etcd_port: u16,
    kubeconfig: PathBuf,
    root: PathBuf,
    tempdir: Option<tempfile::TempDir>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// At most `$MOE_E2E_MAX_CLUSTERS` (default: the number of CPUs, at most 4) clusters run at
/// once in a test process; further `start` calls wait. Keeps parallel tests from starving a
/// 2-core machine.
fn cluster_slots() -> std::sync::Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let n = std::env::var("MOE_E2E_MAX_CLUSTERS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2)
                        .clamp(1, 4)
                });
            std::sync::Arc::new(tokio::sync::Semaphore::new(n))
        })
        .clone()
}

/// How long start-up may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl Cluster {
    /// Starts a cluster if the binaries are installed; otherwise prints a `SKIPPED` line
    /// naming `test` and what is missing, and returns `None`.
    pub async fn start_or_skip(test: &str) -> Result<Option<Cluster>> {
        match Bins::locate() {
            Ok(bins) => Ok(Some(
                Self::start_with_bins(bins, ClusterOptions::default()).await?,
            )),
            Err(why) => {
                print_skip(test, &why);
                Ok(None)
            }
        }
    }

    /// Starts a cluster with default options (fails if the binaries are missing).
    pub async fn start() -> Result<Cluster> {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(opts: ClusterOptions) -> Result<Cluster> {
        let bins = Bins::locate().map_err(|e| anyhow!(e))?;
        Self::start_with_bins(bins, opts).await
    }

    pub async fn start_with_bins(bins: Bins, opts: ClusterOptions) -> Result<Cluster> {
        let permit = cluster_slots()
            .acquire_owned()
            .await
            .map_err(|_| anyhow!("cluster slots closed"))?;

        // Ports are picked by binding :0 and releasing; a rare collision with another process
        // shows up as a component exiting at start-up, so retry a couple of times.
        let mut last = None;
        for attempt in 1..=3 {
            match Self::try_start(bins.clone(), opts.clone()).await {
                Ok(mut c) => {
                    c._permit = Some(permit);
                    return Ok(c);
                }
                Err(e) => {
                    let port_clash = format!("{e:#}").contains("address already in use");
                    if !port_clash {
                        return Err(e);
                    }
                    tracing::warn!(attempt, "control plane failed to start: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("control plane failed to start")))
    }

    async fn try_start(bins: Bins, opts: ClusterOptions) -> Result<Cluster> {
        let t0 = Instant::now();
        let (tempdir, root) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("moe-e2e-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let pki = root.join("pki");
        let certs = certs::generate(&pki)?;
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs)?;

        let etcd_port = free_port()?;
        let api_port = free_port()?;
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(api_port, &certs))?;

        let mut procs = Vec::new();

        // etcd
        let mut cmd = Command::new(&bins.etcd);
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        cmd.arg("--name=e2e")
            .arg(format!("--data-dir={}", root.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg("--listen-peer-urls=http://127.0.0.1:0")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=e2e=http://127.0.0.1:2380")
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        procs.push(ManagedProcess::spawn("etcd", cmd, &logs.join("etcd.log"))?);
        wait_until(&mut procs, START_TIMEOUT, "etcd /health", || async {
            matches!(crate::http::get("127.0.0.1", etcd_port, "/health", Duration::from_secs(2)).await,
                Ok((200, body)) if body.contains("true"))
        })
        .await?;

        // kube-apiserver
        let mut cmd = Command::new(&bins.kube_apiserver);
        let d = |p: &Path| p.display().to_string();
        cmd.arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--secure-port={api_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", d(&pki)))
            .arg(format!("--tls-cert-file={}", d(&certs.server_cert)))
            .arg(format!("--tls-private-key-file={}", d(&certs.server_key)))
            .arg(format!("--client-ca-file={}", d(&certs.ca_cert)))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-issuer=https://127.0.0.1:{api_port}"
            ))
            .arg(format!("--service-account-key-file={}", d(&certs.sa_pub)))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d(&certs.sa_key)
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            .arg("--endpoint-reconciler-type=none")
            // `kubectl logs/exec` on the real node: the kubelet trusts the cluster CA.
            .arg(format!(
                "--kubelet-client-certificate={}",
                d(&certs.admin_cert)
            ))
            .arg(format!("--kubelet-client-key={}", d(&certs.admin_key)))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--profiling=false")
            .args(&opts.apiserver_args);
        procs.push(ManagedProcess::spawn(
            "kube-apiserver",
            cmd,
            &logs.join("kube-apiserver.log"),
        )?);

        let client = client_from_kubeconfig(&kubeconfig).await?;
        {
            // First the `default` namespace (the API server creates it once its post-start
            // hooks run; 404s before that are not logged as errors by the client, unlike the
            // 500s of an early /readyz), then /readyz itself.
            let ns_api: Api<Namespace> = Api::all(client.clone());
            wait_until(&mut procs, START_TIMEOUT, "kube-apiserver", || {
                let ns_api = ns_api.clone();
                async move {
                    // Connect first, so the client does not log errors while the port is closed.
                    if tokio::net::TcpStream::connect(("127.0.0.1", api_port))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                    matches!(ns_api.get_opt("default").await, Ok(Some(_)))
                }
            })
            .await?;
            let c = client.clone();
            wait_until(&mut procs, START_TIMEOUT, "kube-apiserver /readyz", || {
                let c = c.clone();
                async move {
                    let req = http::Request::get("/readyz").body(Vec::new());
                    match req {
                        Ok(req) => matches!(c.request_text(req).await, Ok(t) if t.trim() == "ok"),
                        Err(_) => false,
                    }
                }
            })
            .await?;
        }

        if !opts.no_controller_manager {
            let mut cmd = Command::new(&bins.kube_controller_manager);
            let kc = format!("--kubeconfig={}", d(&kubeconfig));
            cmd.arg(&kc)
                .arg(format!("--authentication-kubeconfig={}", d(&kubeconfig)))
                .arg(format!("--authorization-kubeconfig={}", d(&kubeconfig)))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--controllers=*")
                .arg(format!("--root-ca-file={}", d(&certs.ca_cert)))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    d(&certs.sa_key)
                ))
                .arg("--use-service-account-credentials=false")
                .arg("--concurrent-gc-syncs=5")
                .args(&opts.controller_manager_args);
            procs.push(ManagedProcess::spawn(
                "kube-controller-manager",
                cmd,
                &logs.join("kube-controller-manager.log"),
            )?);
        }
        if !opts.no_scheduler {
            let mut cmd = Command::new(&bins.kube_scheduler);
            cmd.arg(format!("--kubeconfig={}", d(&kubeconfig)))
                .arg(format!("--authentication-kubeconfig={}", d(&kubeconfig)))
                .arg(format!("--authorization-kubeconfig={}", d(&kubeconfig)))
                .arg("--leader-elect=false")
                .arg("--secure-port=0");
            procs.push(ManagedProcess::spawn(
                "kube-scheduler",
                cmd,
                &logs.join("kube-scheduler.log"),
            )?);
        }
        if !opts.no_controller_manager {
            // The service-account controller creating `default` proves the controller manager
            // is up (pods cannot be created in a namespace before its `default` SA exists).
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            wait_until(&mut procs, START_TIMEOUT, "default service account", || {
                let sas = sas.clone();
                async move { matches!(sas.get_opt("default").await, Ok(Some(_))) }
            })
            .await?;
        }
        tracing::info!(
            api_port,
            dir = %root.display(),
            secs = t0.elapsed().as_secs_f32(),
            "local control plane ready"
        );
        Ok(Cluster {
            agent: None,
            node: None,
            procs,
            client,
            bins,
            certs,
            api_port,
            etcd_port,
            kubeconfig,
            root,
            tempdir,
            _permit: None,
        })
    }

    /// A client with cluster-admin rights (`system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig file (admin credentials, embedded certificates).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    pub fn etcd_port(&self) -> u16 {
        self.etcd_port
    }

    /// The cluster's working directory (certificates, logs, etcd data, pod directories).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The CA certificate (PEM) that signs the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.certs.ca_pem
    }

    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// Log file of a control-plane component (`etcd`, `kube-apiserver`, ...).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.root.join("logs").join(format!("{component}.log"))
    }

    /// Fails if a control-plane process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.ensure_running()?;
        }
        Ok(())
    }

    /// `kubectl --kubeconfig <this cluster>` (the cached kubectl 1.35, else the one on PATH).
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(
            self.bins
                .kubectl
                .clone()
                .unwrap_or_else(|| PathBuf::from("kubectl")),
        );
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        c
    }

    /// `helm` with `KUBECONFIG` pointing at this cluster; `None` if helm is not installed.
    pub fn helm(&self) -> Option<Command> {
        let helm = self.bins.helm.clone()?;
        let mut c = Command::new(helm);
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.root.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.root.join("helm/config"))
            .env("HELM_DATA_HOME", self.root.join("helm/data"));
        Some(c)
    }

    /// Runs kubectl against this cluster; returns stdout, or fails with stderr.
    pub fn run_kubectl(&self, args: &[&str]) -> Result<String> {
        run_output(self.kubectl().args(args), "kubectl")
    }

    /// Runs helm against this cluster (e.g. `["install", "moe", "helm/moe-operator",
    /// "-n", "moe-system", "--create-namespace"]`); returns stdout, or fails with stderr.
    pub fn run_helm(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self
            .helm()
            .ok_or_else(|| anyhow!("helm is not installed (run e2e/bootstrap.sh)"))?;
        run_output(cmd.args(args), "helm")
    }

    /// Registers the agent's fake nodes and starts the kubelet stand-in (see [`crate::agent`]).
    /// The cluster owns it: it is stopped (all pod processes killed) when the cluster drops.
    pub async fn start_agent(&mut self, mut cfg: AgentConfig) -> Result<AgentHandle> {
        if self.agent.is_some() {
            bail!("an agent is already running on this cluster");
        }
        if cfg.work_dir.is_none() {
            cfg.work_dir = Some(self.root.join("pods"));
        }
        cfg.api_port = Some(self.api_port);
        cfg.ca_pem = Some(self.certs.ca_pem.clone());
        let agent = Agent::start(self.client.clone(), cfg).await?;
        let h = agent.handle();
        self.agent = Some(agent);
        Ok(h)
    }

    /// Stops the agent (kills all its pod processes) without touching API objects: what a node
    /// outage looks like.
    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// Starts the node pods run on: the real node ([`RealNode`]: kubelet, containerd, pods from
    /// the project's images) with `count * gpus` GPUs, or the kubelet stand-in with `count`
    /// fake nodes of `gpus` GPUs, as `MOE_E2E_NODE` says (see [`NodeMode`]).
    pub async fn start_nodes(&mut self, count: usize, gpus: u32) -> Result<Nodes> {
        let mode = NodeMode::from_env()?;
        if mode != NodeMode::StandIn {
            match self.start_real_node(count as u32 * gpus).await {
                Ok(h) => return Ok(Nodes::Real(h)),
                Err(e) if mode == NodeMode::Real => {
                    return Err(e.context("the real node could not start (MOE_E2E_NODE=real)"));
                }
                Err(e) => crate::node::select::loud_warning(&format!("{e:#}")),
            }
        }
        Ok(Nodes::StandIn(
            self.start_agent(AgentConfig::gpu_nodes(count, gpus))
                .await?,
        ))
    }

    /// Starts the real node (see [`crate::node`]) with `gpus` GPUs.
    pub async fn start_real_node(&mut self, gpus: u32) -> Result<crate::node::RealNodeHandle> {
        if self.node.is_some() || self.agent.is_some() {
            bail!("this cluster already has a node");
        }
        let nb = NodeBins::locate(&self.bins).map_err(|e| anyhow!(e))?;
        let images = crate::node::project_images().map_err(|e| anyhow!(e))?;
        let params = NodeParams {
            dir: self.root.join("node"),
            api_port: self.api_port,
            kubeconfig: self.kubeconfig.clone(),
            ca_cert: self.certs.ca_cert.clone(),
            gpus,
            images,
        };
        let node = RealNode::start(&self.client, &nb, &params).await?;
        let h = node.handle(self.client.clone());
        self.node = Some(node);
        Ok(h)
    }

    /// The real node, when one runs.
    pub fn real_node(&self) -> Option<&RealNode> {
        self.node.as_ref()
    }

    /// Server-side applies every document of a multi-document YAML string (any kind the API
    /// server knows, CRDs and custom resources included). Namespaced objects without a
    /// namespace go to `default_ns`.
    pub async fn apply_yaml(&self, yaml: &str, default_ns: &str) -> Result<Vec<DynamicObject>> {
        apply_yaml(&self.client, yaml, default_ns).await
    }

    /// [`Self::apply_yaml`] on a file.
    pub async fn apply_file(&self, path: &Path, default_ns: &str) -> Result<Vec<DynamicObject>> {
        let yaml =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        self.apply_yaml(&yaml, default_ns).await
    }

    fn dump_logs_on_panic(&self) {
        eprintln!(
            "moe-e2e: test failed; control plane logs under {} (set MOE_E2E_KEEP=1 to keep them)",
            self.root.join("logs").display()
        );
        for p in &self.procs {
            eprintln!(
                "---- last lines of {} ----\n{}",
                p.name(),
                log_tail(p.log_path(), 15)
            );
        }
        if let Some(n) = &self.node {
            eprintln!("{}", n.log_tails(15));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs_on_panic();
        }
        self.agent = None;
        self.node = None;
        while let Some(mut p) = self.procs.pop() {
            p.kill();
        }
        if std::env::var_os("MOE_E2E_KEEP").is_some()
            && let Some(t) = self.tempdir.take()
        {
            let p = t.keep();
            eprintln!("moe-e2e: kept {}", p.display());
        }
    }
}

fn kubeconfig_yaml(api_port: u16, c: &CertFiles) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: moe-e2e
  cluster:
    server: https://127.0.0.1:{api_port}
    certificate-authority-data: {ca}
users:
- name: moe-e2e-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: moe-e2e
  context:
    cluster: moe-e2e
    user: moe-e2e-admin
current-context: moe-e2e
",
        ca = b64(&c.ca_pem),
        cert = b64(&c.admin_cert_pem),
        key = b64(&c.admin_key_pem),
    )
}

fn run_output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} {:?} failed ({}):\n{}{}",
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Prints `SKIPPED <test>: ...` straight to the process's stderr, so that it shows in a
/// plain `cargo test` run (libtest captures `println!`/`eprintln!` of passing tests).
pub fn print_skip(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no local control plane: {why}"
    );
}

/// A client for a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.connect_timeout = Some(Duration::from_secs(5));
    Ok(Client::try_from(config)?)
}

/// Server-side applies every document of `yaml` (field manager `moe-e2e`, forced).
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    default_ns: &str,
) -> Result<Vec<DynamicObject>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_yaml::from_value(value).context("parsing a YAML document")?;
        let types = obj
            .types
            .as_ref()
            .ok_or_else(|| anyhow!("document without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(types)?;
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("{} without metadata.name", types.kind))?;
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {gvk:?}"))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &ar),
            Scope::Namespaced => {
                let ns = obj.metadata.namespace.as_deref().unwrap_or(default_ns);
                Api::namespaced_with(client.clone(), ns, &ar)
            }
        };
        let applied = api
            .patch(
                &name,
                &PatchParams::apply("moe-e2e").force(),
                &Patch::Apply(&obj),
            )
            .await
            .with_context(|| format!("applying {} {name}", types.kind))?;
        out.push(applied);
    }
    Ok(out)
}
