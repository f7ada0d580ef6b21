//! A real node for the local clusters: kubelet and kube-proxy (built from the pinned Kubernetes
//! sources by `e2e/bootstrap.sh`), containerd + runc + the CNI plugins (the distribution's
//! packages), and CoreDNS, running in a network namespace of their own (see [`net`]). Pods run
//! from the project's images (`scripts/images build`), imported into containerd's `k8s.io`
//! namespace: real pod IPs, cluster DNS, volumes, probes, security contexts, `kubectl logs` and
//! `kubectl exec`.
//!
//! One node per cluster, named `gpu-node-0`, with `nvidia.com/gpu` capacity patched into its
//! status (no device plugin: the GPUs are only a schedulable count; workers run the CPU
//! backend). Dropping the [`RealNode`] stops its processes, kills every container left in its
//! cgroup root, unmounts what the kubelet and containerd mounted under its directory and
//! deletes the namespace.

pub mod cgroups;
mod config;
mod images;
pub mod net;
pub mod select;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

pub use config::NodePaths;
pub use net::NodeNet;
pub use select::{NodeMode, Nodes};

use crate::bins::Bins;
use crate::nodes::GPU_RESOURCE;
use crate::process::{ManagedProcess, log_tail, wait_until};

/// Name of the sandbox image `e2e/bootstrap.sh` builds (`bin/pause.oci.tar`).
/// (Fully qualified: containerd would read `moe-e2e/pause` as `docker.io/moe-e2e/pause`.)
pub const PAUSE_IMAGE: &str = "localhost/moe-e2e/pause:2";
/// The node's name.
pub const NODE_NAME: &str = "gpu-node-0";

/// What a real node needs from the cluster that hosts it.
#[derive(Debug, Clone)]
pub struct NodeParams {
    pub dir: PathBuf,
    pub api_port: u16,
    /// The cluster's admin kubeconfig (its server URL is rewritten to the forwarder).
    pub kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    /// `nvidia.com/gpu` capacity of the node.
    pub gpus: u32,
    /// OCI archives imported into containerd (the pause image is added).
    pub images: Vec<PathBuf>,
}

/// Binaries and files a real node needs, or why it cannot start here.
#[derive(Debug, Clone)]
pub struct NodeBins {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub coredns: PathBuf,
    pub pause_archive: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub cni_bin: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl NodeBins {
    /// Finds everything, or says what is missing and how to get it.
    pub fn locate(bins: &Bins) -> Result<NodeBins, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (a node needs network namespaces, mounts and cgroups)".into());
        }
        let mut missing = Vec::new();
        let mut need = |p: Option<PathBuf>, what: &str| {
            p.unwrap_or_else(|| {
                missing.push(what.to_string());
                PathBuf::new()
            })
        };
        let cached = |n: &str| Some(bins.dir.join(n)).filter(|p| p.is_file());
        let nb = NodeBins {
            kubelet: need(cached("kubelet"), "kubelet (e2e/bootstrap.sh)"),
            kube_proxy: need(cached("kube-proxy"), "kube-proxy (e2e/bootstrap.sh)"),
            coredns: need(cached("coredns"), "coredns (e2e/bootstrap.sh)"),
            pause_archive: need(cached("pause.oci.tar"), "pause.oci.tar (e2e/bootstrap.sh)"),
            containerd: need(
                on_path("containerd"),
                "containerd (apt-get install containerd)",
            ),
            ctr: need(on_path("ctr"), "ctr (apt-get install containerd)"),
            cni_bin: need(
                net::cni_bin_dir(),
                "CNI plugins (apt-get install containernetworking-plugins)",
            ),
        };
        need(on_path("runc"), "runc (apt-get install runc)");
        need(on_path("iptables"), "iptables (apt-get install iptables)");
        need(on_path("ip"), "ip (apt-get install iproute2)");
        if !missing.is_empty() {
            return Err(format!("missing {}", missing.join(", ")));
        }
        Ok(nb)
    }
}

/// The project's image archives (`scripts/images build`): `$MOE_E2E_IMAGES_DIR`, else
/// `<workspace>/target/images`.
pub fn project_images() -> Result<Vec<PathBuf>, String> {
    let dir = std::env::var_os("MOE_E2E_IMAGES_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/images"));
    let files: Vec<PathBuf> = ["moe-operator.oci.tar", "moe-worker.oci.tar"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    match files.iter().find(|f| !f.is_file()) {
        Some(f) => Err(format!(
            "{} is missing (run scripts/images build, or set MOE_E2E_IMAGES_DIR)",
            f.display()
        )),
        None => Ok(files),
    }
}

/// A running real node. See the module docs.
pub struct RealNode {
    // Drop order: processes (kubelet first), then containers, mounts, the forwarder, the
    // network namespace (see `Drop`).
    procs: Vec<ManagedProcess>,
    paths: NodePaths,
    ctr: PathBuf,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    net: Option<NodeNet>,
}

const START_TIMEOUT: Duration = Duration::from_secs(180);

impl RealNode {
    /// Starts containerd, imports the images, starts the kubelet, kube-proxy and CoreDNS, and
    /// waits until the node is Ready with its GPUs.
    pub async fn start(client: &Client, nb: &NodeBins, p: &NodeParams) -> Result<RealNode> {
        let t0 = Instant::now();
        let paths = NodePaths { dir: p.dir.clone() };
        for sub in [
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "logs",
        ] {
            std::fs::create_dir_all(paths.p(sub))?;
        }
        let net = NodeNet::create().context("creating the node's network namespace")?;
        cgroups::create(&net.cgroup_root())?;
        let mut node = RealNode {
            procs: Vec::new(),
            paths: paths.clone(),
            ctr: nb.ctr.clone(),
            forwarder: None,
            net: None,
        };
        let net = node.net.insert(net);
        node.forwarder = Some(
            spawn_forwarder(&net.host_ip(), p.api_port)
                .await
                .context("API server forwarder")?,
        );

        // Components inside the namespace reach the API server through the forwarder; the
        // serving certificate is for localhost.
        let kc = std::fs::read_to_string(&p.kubeconfig)?;
        let kc = kc.replace(
            &format!("server: https://127.0.0.1:{}", p.api_port),
            &format!(
                "server: https://{}:{}\n    tls-server-name: localhost",
                net.host_ip(),
                p.api_port
            ),
        );
        std::fs::write(paths.kubeconfig(), kc)?;
        let write = |rel: &str, text: String| -> Result<PathBuf> {
            let f = paths.p(rel);
            std::fs::write(&f, text).with_context(|| format!("writing {}", f.display()))?;
            Ok(f)
        };
        let logs = paths.p("logs");

        // containerd, its root seeded with the images
        let t_import = Instant::now();
        let mut archives = vec![nb.pause_archive.clone()];
        archives.extend(p.images.iter().cloned());
        let cache = crate::bins::cache_dir().context("no cache directory (HOME unset)")?;
        let nb2 = nb.clone();
        let seed = tokio::task::spawn_blocking(move || images::seed_root(&nb2, &archives, &cache))
            .await??;
        images::clone_root(&seed, &paths.p("containerd/root"))?;
        let import_secs = t_import.elapsed().as_secs_f32();
        let toml = write(
            "containerd/config.toml",
            config::containerd_toml(&paths, &nb.cni_bin, PAUSE_IMAGE),
        )?;
        let mut cmd = Command::new(&nb.containerd);
        cmd.arg("--config").arg(&toml);
        let net = node.net.as_ref().context("net")?;
        net.enter(&mut cmd)?;
        node.procs.push(ManagedProcess::spawn(
            "containerd",
            cmd,
            &logs.join("containerd.log"),
        )?);
        wait_until(
            &mut node.procs,
            Duration::from_secs(60),
            "containerd",
            || async { paths.containerd_sock().exists() },
        )
        .await?;

        // CNI, kubelet
        write(
            "cni/net.d/10-moe-e2e.conflist",
            net::cni_conflist(&net.pod_cidr(), &paths.p("cni/ipam")),
        )?;
        let kubelet_cfg = write(
            "kubelet/config.yaml",
            config::kubelet_yaml(&paths, net, &p.ca_cert),
        )?;
        let mut cmd = Command::new(&nb.kubelet);
        cmd.arg(format!("--config={}", kubelet_cfg.display()))
            .arg(format!("--kubeconfig={}", paths.kubeconfig().display()))
            .arg(format!("--root-dir={}", paths.p("kubelet/root").display()))
            .arg(format!("--cert-dir={}", paths.p("kubelet/pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={}", net.node_ip()))
            .arg("--node-labels=nvidia.com/gpu.present=true,moe-e2e/real-node=true")
            .arg("--v=1");
        net.enter(&mut cmd)?;
        node.procs.push(ManagedProcess::spawn(
            "kubelet",
            cmd,
            &logs.join("kubelet.log"),
        )?);

        // kube-proxy and CoreDNS
        let kp = write(
            "kube-proxy.yaml",
            config::kube_proxy_yaml(&paths, net, NODE_NAME),
        )?;
        let mut cmd = Command::new(&nb.kube_proxy);
        cmd.arg(format!("--config={}", kp.display())).arg("--v=1");
        net.enter(&mut cmd)?;
        node.procs.push(ManagedProcess::spawn(
            "kube-proxy",
            cmd,
            &logs.join("kube-proxy.log"),
        )?);
        let corefile = write("Corefile", config::corefile(&paths, net))?;
        let mut cmd = Command::new(&nb.coredns);
        cmd.arg("-conf").arg(&corefile);
        net.enter(&mut cmd)?;
        node.procs.push(ManagedProcess::spawn(
            "coredns",
            cmd,
            &logs.join("coredns.log"),
        )?);

        // The `kubernetes` Service's endpoint: the forwarder (the API server's endpoint
        // reconciler is off; it would publish 127.0.0.1, which pods cannot reach).
        publish_api_endpoint(client, &net.host_ip(), p.api_port).await?;

        // The node registers itself; give it its GPUs and wait until it is Ready.
        let nodes: Api<Node> = Api::all(client.clone());
        wait_until(
            &mut node.procs,
            START_TIMEOUT,
            "node registration",
            || async { matches!(nodes.get_opt(NODE_NAME).await, Ok(Some(_))) },
        )
        .await?;
        let gpus = p.gpus.to_string();
        let patch = serde_json::json!({"status": {"capacity": {GPU_RESOURCE: gpus}}});
        nodes
            .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("patching the node's GPU capacity")?;
        wait_until(
            &mut node.procs,
            START_TIMEOUT,
            "node Ready with its GPUs",
            || async {
                nodes
                    .get_opt(NODE_NAME)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|n| {
                        let st = n.status.unwrap_or_default();
                        let ready = st
                            .conditions
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True");
                        let gpus_ok = st
                            .allocatable
                            .and_then(|a| a.get(GPU_RESOURCE).cloned())
                            .is_some_and(|q| q.0 == gpus);
                        ready && gpus_ok
                    })
            },
        )
        .await?;
        tracing::info!(
            node = NODE_NAME,
            netns = node.net.as_ref().map(|n| n.netns.clone()),
            import_secs,
            secs = t0.elapsed().as_secs_f32(),
            "real node ready"
        );
        Ok(node)
    }

    /// Fails if a node process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.ensure_running()?;
        }
        Ok(())
    }

    pub fn paths(&self) -> &NodePaths {
        &self.paths
    }

    pub fn handle(&self, client: Client) -> RealNodeHandle {
        RealNodeHandle {
            client,
            ctr: self.ctr.clone(),
            sock: self.paths.containerd_sock(),
            state: self.paths.containerd_state(),
        }
    }

    /// Last lines of each node component's log (for failure messages).
    pub fn log_tails(&self, n: usize) -> String {
        self.procs
            .iter()
            .map(|p| format!("---- {} ----\n{}", p.name(), log_tail(p.log_path(), n)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The kubelet first, so it restarts nothing; then containerd and the rest.
        for name in ["kubelet", "kube-proxy", "coredns", "containerd"] {
            if let Some(p) = self.procs.iter_mut().find(|p| p.name() == name) {
                p.kill();
            }
        }
        if let Some(net) = &self.net {
            cgroups::remove(&net.cgroup_root());
        }
        kill_shims(&self.paths.containerd_sock());
        unmount_under(&self.paths.dir);
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
        self.net = None;
    }
}

/// Test hooks on a real node's containers.
#[derive(Clone)]
pub struct RealNodeHandle {
    client: Client,
    ctr: PathBuf,
    sock: PathBuf,
    state: PathBuf,
}

impl RealNodeHandle {
    /// The host pid of a running container's main process.
    pub fn container_pid(&self, container_id: &str) -> Result<u32> {
        let f = self
            .state
            .join("io.containerd.runtime.v2.task/k8s.io")
            .join(container_id)
            .join("init.pid");
        let s = std::fs::read_to_string(&f).with_context(|| {
            format!("container {container_id} is not running ({})", f.display())
        })?;
        s.trim()
            .parse()
            .with_context(|| format!("bad pid in {}", f.display()))
    }

    /// Sends `signal` to the main process of `container` of `ns/pod` (a crash, an OOM kill).
    pub async fn kill_container(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        signal: i32,
    ) -> Result<()> {
        let p: Pod = Api::namespaced(self.client.clone(), ns).get(pod).await?;
        let id = p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == container)
            .and_then(|c| c.container_id)
            .ok_or_else(|| anyhow!("{ns}/{pod} has no running container {container}"))?;
        let id = id.rsplit("://").next().unwrap_or(&id).to_string();
        let pid = self.container_pid(&id)?;
        crate::process::kill_pid(pid, signal);
        Ok(())
    }

    /// The current log of a container, through the API server and the kubelet (`kubectl logs`).
    pub async fn logs(&self, ns: &str, pod: &str, container: &str) -> Result<String> {
        let lp = kube::api::LogParams {
            container: Some(container.to_string()),
            ..Default::default()
        };
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .logs(pod, &lp)
            .await
            .with_context(|| format!("logs of {ns}/{pod}/{container}"))
    }

    /// Names (`namespace/name`) of the pods the API server binds to the node.
    pub async fn pods(&self) -> Result<Vec<String>> {
        let list = Api::<Pod>::all(self.client.clone())
            .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE_NAME}")))
            .await?;
        Ok(list
            .items
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or("")
                )
            })
            .collect())
    }

    /// Containers (ids) containerd runs for pods of namespace `ns`.
    pub fn containers_of_namespace(&self, ns: &str) -> Result<Vec<String>> {
        let out = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.sock)
            .args(["-n", "k8s.io", "containers", "list", "-q"])
            .arg(format!("labels.\"io.kubernetes.pod.namespace\"=={ns}"))
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr containers list: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }
}

/// Listens on `host_ip:port` and forwards each connection to the API server on
/// `127.0.0.1:port` (TLS passes through untouched).
async fn spawn_forwarder(host_ip: &str, port: u16) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind((host_ip, port))
        .await
        .with_context(|| format!("binding {host_ip}:{port}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    }))
}

/// Points the `kubernetes` Service (default namespace) at `ip:port`.
async fn publish_api_endpoint(client: &Client, ip: &str, port: u16) -> Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "moe-e2e",
            }
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .patch(
            "kubernetes",
            &PatchParams::apply("moe-e2e").force(),
            &Patch::Apply(&slice),
        )
        .await
        .context("publishing the kubernetes EndpointSlice")?;
    Ok(())
}

/// SIGKILLs containerd shims (they outlive containerd) started for the containerd at `sock`.
fn kill_shims(sock: &Path) {
    let needle = sock.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            crate::process::kill_pid(pid, libc::SIGKILL);
        }
    }
}

/// Lazily unmounts everything mounted under `dir` (volumes, container root filesystems,
/// sandbox /dev/shm), deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2(2) with a valid NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}
