//! How the operator names a MoEDeployment's worker pods and their API ports: one contract for
//! the operator that makes them and the tools that find them (`moectl record --deployment`).

/// `app.kubernetes.io/name` of every worker pod is [`WORKER_NAME`].
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const WORKER_NAME: &str = "moe-worker";
/// `app.kubernetes.io/instance` of a worker pod: its MoEDeployment's name.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The StatefulSet's ordinal of a pod (Kubernetes 1.28 and later; the name's suffix before).
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The container that runs the worker.
pub const WORKER_CONTAINER: &str = "worker";

/// The name of the worker container's API port of the pod's rank `local`: `http` for the
/// first, `http-i` for the others (several ranks per pod).
pub fn http_port_name(local: usize) -> String {
    if local == 0 {
        "http".into()
    } else {
        format!("http-{local}")
    }
}

/// The pod's rank whose API port is named `name` ([`http_port_name`]'s inverse).
pub fn local_rank_of_port(name: &str) -> Option<usize> {
    if name == "http" {
        return Some(0);
    }
    name.strip_prefix("http-")?
        .parse()
        .ok()
        .filter(|&local| local > 0)
}

/// A worker pod's ordinal: its [`POD_INDEX_LABEL`] when it has one, else the number after its
/// name's last `-`.
pub fn ordinal(index_label: Option<&str>, pod_name: &str) -> Option<usize> {
    match index_label {
        Some(i) => i.parse().ok(),
        None => pod_name.rsplit('-').next()?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_and_ordinals_round_trip() {
        for local in 0..4 {
            assert_eq!(local_rank_of_port(&http_port_name(local)), Some(local));
        }
        for other in ["comm", "http-0", "http-x", "https", "forward"] {
            assert_eq!(local_rank_of_port(other), None, "{other}");
        }
        assert_eq!(ordinal(Some("3"), "demo-1"), Some(3));
        assert_eq!(ordinal(Some("x"), "demo-1"), None);
        assert_eq!(ordinal(None, "demo-12"), Some(12));
        assert_eq!(ordinal(None, "stray"), None);
    }
}
