//! Which node runs the pods: the real node, or (only where it cannot start, and only when
//! allowed) the kubelet stand-in. `MOE_E2E_NODE`:
//!
//! * `real`: the real node; a test fails when it cannot start (what `scripts/test` and CI use);
//! * `stand-in`: the kubelet stand-in ([`crate::agent`]), chosen explicitly;
//! * `auto` (the default outside CI): the real node, else the stand-in after a loud warning
//!   that says why. With `CI` set the default is `real`.

use anyhow::{Result, bail};

use super::RealNodeHandle;
use crate::agent::AgentHandle;

/// `MOE_E2E_NODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    Real,
    StandIn,
    Auto,
}

impl NodeMode {
    pub fn from_env() -> Result<NodeMode> {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        Self::parse(std::env::var("MOE_E2E_NODE").ok().as_deref(), ci)
    }

    /// `MOE_E2E_NODE`'s value; `ci`: whether `CI` is set.
    pub fn parse(value: Option<&str>, ci: bool) -> Result<NodeMode> {
        match value {
            Some("real") => Ok(NodeMode::Real),
            Some("stand-in") => Ok(NodeMode::StandIn),
            Some("auto") => Ok(NodeMode::Auto),
            None | Some("") if ci => Ok(NodeMode::Real),
            None | Some("") => Ok(NodeMode::Auto),
            Some(other) => {
                bail!("MOE_E2E_NODE={other:?}: expected `real`, `stand-in` or `auto`")
            }
        }
    }
}

/// Prints a warning that cannot be missed in a test log (straight to stderr: libtest captures
/// `eprintln!` of passing tests).
pub fn loud_warning(msg: &str) {
    use std::io::Write as _;
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "{bar}\n!! moe-e2e: NO REAL NODE: {msg}\n!! Pods run on the kubelet stand-in (host processes, no images, no DNS, \
         no kubectl logs).\n!! Set MOE_E2E_NODE=real to make this an error, MOE_E2E_NODE=stand-in to silence it.\n{bar}"
    );
}

/// The node(s) pods of a test run on, with the hooks the scenarios use.
#[derive(Clone)]
pub enum Nodes {
    Real(RealNodeHandle),
    StandIn(AgentHandle),
}

impl Nodes {
    pub fn is_real(&self) -> bool {
        matches!(self, Nodes::Real(_))
    }

    /// The stand-in's handle, when pods run there.
    pub fn agent(&self) -> Option<&AgentHandle> {
        match self {
            Nodes::StandIn(a) => Some(a),
            Nodes::Real(_) => None,
        }
    }

    /// The current log of a container: `kubectl logs` (through the API server and the
    /// kubelet) on the real node, the stand-in's log file otherwise.
    pub async fn logs(&self, ns: &str, pod: &str, container: &str) -> Result<String> {
        match self {
            Nodes::Real(n) => n.logs(ns, pod, container).await,
            Nodes::StandIn(a) => a.logs(ns, pod, container),
        }
    }

    /// Sends `signal` to a container's main process (SIGKILL: a crash).
    pub async fn kill_container(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        signal: i32,
    ) -> Result<()> {
        match self {
            Nodes::Real(n) => n.kill_container(ns, pod, container, signal).await,
            Nodes::StandIn(a) => a.kill_container(ns, pod, container, signal),
        }
    }

    /// Pods (`namespace/name`) on the node(s).
    pub async fn pods(&self) -> Result<Vec<String>> {
        match self {
            Nodes::Real(n) => n.pods().await,
            Nodes::StandIn(a) => Ok(a.pods()),
        }
    }

    /// Whether anything still runs for pods of namespace `ns` on the node.
    pub fn runs_pods_of(&self, ns: &str) -> Result<bool> {
        match self {
            Nodes::Real(n) => Ok(!n.containers_of_namespace(ns)?.is_empty()),
            Nodes::StandIn(a) => Ok(a.pods().iter().any(|p| p.starts_with(&format!("{ns}/")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::NodeMode;

    #[test]
    fn node_mode_defaults_to_real_in_ci_and_rejects_typos() {
        assert_eq!(NodeMode::parse(None, true).unwrap(), NodeMode::Real);
        assert_eq!(NodeMode::parse(Some(""), false).unwrap(), NodeMode::Auto);
        assert_eq!(
            NodeMode::parse(Some("stand-in"), true).unwrap(),
            NodeMode::StandIn
        );
        assert_eq!(
            NodeMode::parse(Some("real"), false).unwrap(),
            NodeMode::Real
        );
        let e = NodeMode::parse(Some("standin"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MOE_E2E_NODE") && e.contains("stand-in"), "{e}");
    }
}
