//! Configuration files of the node's components, as text. What each setting is for is in
//! `docs/e2e.md` ("The real node") and `../shared/docs/real-cluster.md`.

use std::path::Path;

use super::net::NodeNet;

/// Paths of one node's files, all under its directory.
#[derive(Debug, Clone)]
pub struct NodePaths {
    pub dir: std::path::PathBuf,
}

impl NodePaths {
    pub fn p(&self, rel: &str) -> std::path::PathBuf {
        self.dir.join(rel)
    }
    pub fn containerd_sock(&self) -> std::path::PathBuf {
        self.p("containerd/containerd.sock")
    }
    pub fn containerd_state(&self) -> std::path::PathBuf {
        self.p("containerd/state")
    }
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.p("kubeconfig")
    }
    pub fn pod_logs(&self) -> std::path::PathBuf {
        self.p("pod-logs")
    }
}

fn d(p: &Path) -> String {
    p.display().to_string()
}

/// containerd 1.6 with its CRI plugin, everything under the node's directory.
pub fn containerd_toml(paths: &NodePaths, cni_bin: &Path, sandbox_image: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  # Nothing can be pulled: the sandbox image is imported from the bootstrap cache.
  sandbox_image = "{sandbox_image}"
  # The machine forbids lowering oom_score_adj; without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  # Pod network namespaces under the state directory (not /var/run/netns), removed with it.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
        root = d(&paths.p("containerd/root")),
        state = d(&paths.containerd_state()),
        sock = d(&paths.containerd_sock()),
        opt = d(&paths.p("containerd/opt")),
        cni_bin = d(cni_bin),
        cni_conf = d(&paths.p("cni/net.d")),
    )
}

/// The kubelet's configuration file.
pub fn kubelet_yaml(paths: &NodePaths, net: &NodeNet, ca: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# PID 1 is not systemd and the host has a cgroup v1 hierarchy.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: {cgroup_root}
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzPort: 0
# The API server authenticates with the cluster's admin client certificate (logs, exec).
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
clusterDNS: [{node_ip}]
clusterDomain: cluster.local
resolvConf: ""
podLogsDir: {pod_logs}
volumePluginDir: {plugins}
# The images are imported, never pulled, and must not be garbage collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
evictionHard: {{memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}}
localStorageCapacityIsolation: false
# ConfigMap and Secret volumes refresh within seconds, as the scenarios expect.
syncFrequency: 5s
configMapAndSecretChangeDetectionStrategy: Watch
oomScoreAdj: 0
maxPods: 110
shutdownGracePeriod: 0s
rotateCertificates: false
serverTLSBootstrap: false
"#,
        cgroup_root = net.cgroup_root(),
        sock = d(&paths.containerd_sock()),
        node_ip = net.node_ip(),
        ca = d(ca),
        pod_logs = d(&paths.pod_logs()),
        plugins = d(&paths.p("kubelet-plugins")),
    )
}

/// kube-proxy in iptables mode, inside the node's namespace.
pub fn kube_proxy_yaml(paths: &NodePaths, net: &NodeNet, node: &str) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
bindAddress: {node_ip}
healthzBindAddress: ""
metricsBindAddress: "127.0.0.1:10249"
mode: iptables
clusterCIDR: {pod_cidr}
detectLocalMode: ClusterCIDR
# Leave the machine's conntrack settings alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
# The machine forbids lowering oom_score_adj.
oomScoreAdj: 0
"#,
        kubeconfig = d(&paths.kubeconfig()),
        node_ip = net.node_ip(),
        pod_cidr = net.pod_cidr(),
    )
}

/// CoreDNS serving the cluster domain from the API server on the node IP (the kubelet's
/// clusterDNS). No upstream: names outside the cluster do not resolve.
pub fn corefile(paths: &NodePaths, net: &NodeNet) -> String {
    format!(
        r#".:53 {{
    bind {node_ip}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} moe-e2e
        pods insecure
        ttl 1
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
"#,
        node_ip = net.node_ip(),
        kubeconfig = d(&paths.kubeconfig()),
    )
}
