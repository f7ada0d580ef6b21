//! The NetworkPolicy each MoEDeployment owns (`<name>-workers`). Owned by the resource, it
//! exists wherever the deployment does, whatever namespaces the chart was told about, and
//! outlives an uninstalled chart. It isolates the group's pods for ingress and admits:
//!
//! * the control port(s) (`spec.worker.httpPort`: remaps, statistics, /metrics) from the
//!   operator's pods only (their namespace and labels come from the operator's flags), plus
//!   the extra peers the operator was given (e.g. Prometheus);
//! * every port from the group's own pods: the rendezvous listens on `commPort` and NCCL picks
//!   its own ports, so nothing else reaches `commPort`;
//! * the forward port(s), while the group serves, from the selected client pods.
//!
//! Egress is not restricted. Kubelet probes come from the node and are not subject to it on
//! the common CNIs.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, Resolved, meta, selector_labels};
use crate::crd::MoEDeploymentSpec;

/// Who may reach the workers' control port besides nobody: the operator's own pods, and
/// extra peers (metrics scrapers). From the operator's flags / Helm values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ControlPlanePeers {
    /// Create the per-deployment NetworkPolicy at all.
    pub enabled: bool,
    /// The operator's namespace. Unset (an operator running outside the cluster, or without
    /// `POD_NAMESPACE`): pods with the operator's labels in any namespace.
    pub namespace: Option<String>,
    /// Labels of the operator's pods.
    pub pod_labels: BTreeMap<String, String>,
    /// Further peers admitted to the control port (e.g. Prometheus scraping /metrics).
    pub extra: Vec<NetworkPolicyPeer>,
}

fn labels(m: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(m),
        match_expressions: None,
    }
}

/// TCP ports `base..base+count-1` as one NetworkPolicyPort.
fn port_range(base: u16, count: u32) -> NetworkPolicyPort {
    let end = u32::from(base) + count.max(1) - 1;
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(i32::from(base))),
        end_port: (count > 1).then_some(end as i32),
    }
}

/// The peers of the forward port: `spec.serving.clients` (default: pods labelled
/// [`super::CLIENT_LABEL`]`=<name>`), in `spec.serving.namespaceSelector`'s namespaces
/// (default: the deployment's own).
fn client_peer(r: &Resolved, spec: &MoEDeploymentSpec) -> NetworkPolicyPeer {
    let s = spec.serving_or_default();
    let pods = s.clients.unwrap_or_else(|| {
        labels(BTreeMap::from([(
            super::CLIENT_LABEL.to_string(),
            r.name.clone(),
        )]))
    });
    NetworkPolicyPeer {
        pod_selector: Some(pods),
        namespace_selector: s.namespace_selector,
        ip_block: None,
    }
}

pub fn network_policy(
    r: &Resolved,
    spec: &MoEDeploymentSpec,
    peers: &ControlPlanePeers,
) -> NetworkPolicy {
    let names = Names::new(&r.name);
    let per_pod = spec.ranks_per_pod();
    let operator = NetworkPolicyPeer {
        pod_selector: Some(labels(peers.pod_labels.clone())),
        namespace_selector: Some(match &peers.namespace {
            Some(ns) => labels(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                ns.clone(),
            )])),
            None => LabelSelector::default(),
        }),
        ip_block: None,
    };
    let mut control_from = vec![operator];
    control_from.extend(peers.extra.iter().cloned());
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: Some(control_from),
            ports: Some(vec![port_range(spec.worker.http_port, per_pod)]),
        },
        NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(labels(selector_labels(&r.name))),
                namespace_selector: None,
                ip_block: None,
            }]),
            ports: None,
        },
    ];
    if spec.serving_enabled() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![client_peer(r, spec)]),
            ports: Some(vec![port_range(spec.serving_or_default().port, per_pod)]),
        });
    }
    NetworkPolicy {
        metadata: meta(r, &names.network_policy),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels(selector_labels(&r.name))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ServingSpec;
    use crate::crd::tests::sample_spec;
    use crate::resources::tests::resolved;

    fn peers() -> ControlPlanePeers {
        ControlPlanePeers {
            enabled: true,
            namespace: Some("moe-system".into()),
            pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "moe-operator".to_string(),
            )]),
            extra: Vec::new(),
        }
    }

    fn rule_ports(rule: &NetworkPolicyIngressRule) -> Vec<(i32, Option<i32>)> {
        rule.ports
            .iter()
            .flatten()
            .map(|p| {
                let IntOrString::Int(n) = p.port.clone().unwrap() else {
                    panic!("named port")
                };
                (n, p.end_port)
            })
            .collect()
    }

    #[test]
    fn control_port_from_the_operator_group_ports_from_the_group() {
        let np = network_policy(&resolved(), &sample_spec(), &peers());
        assert_eq!(np.metadata.name.as_deref(), Some("demo-workers"));
        assert_eq!(
            np.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let s = np.spec.unwrap();
        assert_eq!(
            s.pod_selector.unwrap().match_labels.unwrap(),
            selector_labels("demo")
        );
        assert_eq!(s.policy_types.unwrap(), vec!["Ingress".to_string()]);
        assert!(s.egress.is_none());
        let ingress = s.ingress.unwrap();
        assert_eq!(ingress.len(), 2, "no forward rule without serving");
        let control = &ingress[0];
        assert_eq!(rule_ports(control), vec![(8080, None)]);
        let from = &control.from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "moe-system"
        );
        assert_eq!(
            from.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app.kubernetes.io/name"],
            "moe-operator"
        );
        let group = &ingress[1];
        assert!(group.ports.is_none(), "rendezvous and NCCL ports");
        let peer = &group.from.as_ref().unwrap()[0];
        assert!(peer.namespace_selector.is_none(), "own namespace only");
        assert_eq!(
            peer.pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector_labels("demo"))
        );
    }

    #[test]
    fn forward_ports_from_the_selected_clients() {
        let mut spec = sample_spec();
        spec.expert_parallel.ranks_per_pod = Some(2);
        spec.serving = Some(ServingSpec {
            enabled: Some(true),
            port: 9000,
            ..Default::default()
        });
        let np = network_policy(&resolved(), &spec, &peers());
        let ingress = np.spec.unwrap().ingress.unwrap();
        assert_eq!(rule_ports(&ingress[0]), vec![(8080, Some(8081))]);
        let fwd = &ingress[2];
        assert_eq!(rule_ports(fwd), vec![(9000, Some(9001))]);
        let peer = &fwd.from.as_ref().unwrap()[0];
        assert_eq!(
            peer.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[super::super::CLIENT_LABEL],
            "demo"
        );
        assert!(peer.namespace_selector.is_none());
        // Explicit clients and namespaces.
        let clients = labels(BTreeMap::from([("app".to_string(), "attn".to_string())]));
        let namespaces = labels(BTreeMap::from([("team".to_string(), "ml".to_string())]));
        spec.serving = Some(ServingSpec {
            enabled: Some(true),
            clients: Some(clients.clone()),
            namespace_selector: Some(namespaces.clone()),
            ..Default::default()
        });
        let np = network_policy(&resolved(), &spec, &peers());
        let peer = np.spec.unwrap().ingress.unwrap()[2].from.clone().unwrap()[0].clone();
        assert_eq!(peer.pod_selector, Some(clients));
        assert_eq!(peer.namespace_selector, Some(namespaces));
    }

    #[test]
    fn an_operator_of_unknown_namespace_and_extra_peers() {
        let mut p = peers();
        p.namespace = None;
        p.extra = vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(labels(BTreeMap::from([(
                "app".to_string(),
                "prometheus".to_string(),
            )]))),
            ip_block: None,
        }];
        let np = network_policy(&resolved(), &sample_spec(), &p);
        let from = np.spec.unwrap().ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(from[0].namespace_selector, Some(LabelSelector::default()));
        assert_eq!(from[1], p.extra[0]);
    }
}
