//! End-to-end test harness: a real local Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) started from binaries that `e2e/bootstrap.sh`
//! installs, fake GPU nodes, and a kubelet stand-in ([`agent`]) that runs pods' containers as
//! local processes. See `docs/e2e.md`.
//!
//! ```no_run
//! use moe_e2e::{AgentConfig, Cluster};
//! # async fn t() -> anyhow::Result<()> {
//! // Prints "SKIPPED ..." and returns None when the binaries are not installed.
//! let Some(mut cluster) = Cluster::start_or_skip("my_test").await? else { return Ok(()) };
//! let agent = cluster.start_agent(AgentConfig::gpu_nodes(2, 4)).await?;
//! let client = cluster.client();
//! cluster.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n", "default").await?;
//! // ... create workloads with `client`, read pod output with `agent.logs(ns, pod, container)`
//! # let _ = (agent, client); Ok(()) }
//! ```
//! Everything is stopped by process id when `cluster` drops, also when the test panics.

pub mod agent;
pub mod bins;
pub mod certs;
pub mod cluster;
pub mod http;
pub mod node;
pub mod nodes;
pub mod process;
pub mod wait;

/// The checkout the tests were started from (the workspace root): the image archives, the
/// chart and the CRDs are read from there. `cargo test` sets `CARGO_MANIFEST_DIR` for the test
/// process, and that is preferred to the path compiled in: clones that share a target
/// directory (two versions measured side by side) share one test binary when their e2e
/// sources are the same, and the compiled-in path is then the clone that built it, so a run
/// from the other clone read the first clone's images (found 2026-12-07: the before/after
/// live-loop runs of that day all ran the "before" operator).
pub fn workspace_root() -> std::path::PathBuf {
    let e2e = std::env::var_os("CARGO_MANIFEST_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    e2e.parent()
        .map_or_else(|| e2e.join(".."), std::path::Path::to_path_buf)
}

pub use agent::{Agent, AgentConfig, AgentHandle, ImageMap};
pub use bins::Bins;
pub use cluster::{Cluster, ClusterOptions};
pub use node::{NodeMode, Nodes, RealNode};
pub use nodes::{FakeNode, GPU_RESOURCE};

/// Starts a [`Cluster`] or, when the control-plane binaries are missing, prints why and returns
/// `Ok(())` from the enclosing test (which must return `anyhow::Result<()>`).
#[macro_export]
macro_rules! cluster_or_skip {
    () => {
        match $crate::Cluster::start_or_skip(module_path!()).await? {
            Some(c) => c,
            None => return Ok(()),
        }
    };
    ($name:expr) => {
        match $crate::Cluster::start_or_skip($name).await? {
            Some(c) => c,
            None => return Ok(()),
        }
    };
}

/// Installs a tracing subscriber honouring `RUST_LOG`, once. The default shows this crate at
/// `info` and others at `warn`, minus kube-client's per-request error lines (the API server
/// answers 500 while it starts; failures still reach the caller as errors).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("moe_e2e=info,warn,kube_client::client::builder=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    /// Under `cargo test` the root is the checkout the tests run from (the runtime variable).
    #[test]
    fn workspace_root_is_the_checkout_running_the_tests() {
        let root = super::workspace_root();
        assert!(root.join("crds/moedeployment.yaml").is_file(), "{root:?}");
        let runtime = std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets it");
        assert_eq!(root, std::path::Path::new(&runtime).parent().unwrap());
    }
}
