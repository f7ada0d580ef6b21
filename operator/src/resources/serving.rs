//! The expert tier's objects: what the workers need to serve the forward API (environment,
//! ports, the client-token mount), the `<name>-experts` Service attention instances call and
//! the `<name>-client-token` Secret they present. See docs/operator.md "Serving".

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, Secret, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use moe_api::env;

use super::{Names, Resolved, TOKEN_KEY, env_value, meta, selector_labels};
use crate::crd::MoEDeploymentSpec;

/// Where the workers find the client token (the `<name>-client-token` Secret).
pub const CLIENT_TOKEN_DIR: &str = "/etc/moe/client";
/// The label that admits a pod to a deployment's forward port when `spec.serving.clients` is
/// unset (value: the MoEDeployment's name).
pub const CLIENT_LABEL: &str = "moe-operator.github.io/expert-client";
const CLIENT_VOLUME: &str = "client-token";

/// Name of the forward port of local rank `i` of a pod (`forward`, `forward-1`, ...; at most
/// 15 characters, as container port names must be).
fn port_name(i: u32) -> String {
    if i == 0 {
        "forward".into()
    } else {
        format!("forward-{i}")
    }
}

/// The traffic source and, when serving, the forward API's settings. The operator always
/// sets `MOE_TRAFFIC`, so a worker's own default never decides what a group does.
pub(super) fn worker_env(spec: &MoEDeploymentSpec) -> Vec<EnvVar> {
    if !spec.serving_enabled() {
        return vec![env_value(env::TRAFFIC, "generator")];
    }
    let s = spec.serving_or_default();
    vec![
        env_value(env::TRAFFIC, "api"),
        env_value(env::FORWARD_PORT, s.port),
        env_value(env::MAX_REQUEST_ROWS, s.max_rows_per_request),
        env_value(
            env::CLIENT_TOKEN_FILE,
            format!("{CLIENT_TOKEN_DIR}/{TOKEN_KEY}"),
        ),
    ]
}

/// The forward ports of a serving pod: `forward` (first rank), `forward-i` (port + i).
pub(super) fn container_ports(spec: &MoEDeploymentSpec) -> Vec<ContainerPort> {
    if !spec.serving_enabled() {
        return Vec::new();
    }
    let base = u32::from(spec.serving_or_default().port);
    (0..spec.ranks_per_pod())
        .map(|i| ContainerPort {
            name: Some(port_name(i)),
            container_port: (base + i) as i32,
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect()
}

/// The client-token Secret mounted read-only into serving workers.
pub(super) fn client_token_volume(
    names: &Names,
    spec: &MoEDeploymentSpec,
) -> Option<(Volume, VolumeMount)> {
    spec.serving_enabled().then(|| {
        (
            Volume {
                name: CLIENT_VOLUME.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(names.client_secret.clone()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
            VolumeMount {
                name: CLIENT_VOLUME.into(),
                mount_path: CLIENT_TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        )
    })
}

/// `<name>-experts`: a ClusterIP Service over the ready worker pods' forward ports (any rank
/// answers a request). Port `forward` reaches each pod's first rank; `forward-i` its rank i.
/// Not-ready pods are left out: a rank answers only once the whole group formed.
pub fn experts_service(r: &Resolved, spec: &MoEDeploymentSpec) -> Service {
    let names = Names::new(&r.name);
    let base = i32::from(spec.serving_or_default().port);
    let ports = (0..spec.ranks_per_pod())
        .map(|i| ServicePort {
            name: Some(port_name(i)),
            port: base + i as i32,
            target_port: Some(IntOrString::String(port_name(i))),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    let mut metadata = meta(r, &names.experts_service);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app.kubernetes.io/component".into(), "expert-tier".into());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&r.name)),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `<name>-client-token`, created once with the client token derived for the deployment
/// ([`crate::tokens`]) and never read or rewritten by the operator (the attention pods hold
/// that token). Rotation: a new value of the `token-rotation` annotation, then delete the
/// Secret (docs/operator.md "Tokens").
pub fn client_token_secret(r: &Resolved, token: &str) -> Secret {
    let names = Names::new(&r.name);
    let mut metadata = meta(r, &names.client_secret);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app.kubernetes.io/component".into(), "client-token".into());
    Secret {
        metadata,
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token.to_string())])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// `<name>-experts.<namespace>.svc:<port>`.
pub fn service_endpoint(r: &Resolved, spec: &MoEDeploymentSpec) -> String {
    format!(
        "{}.{}.svc:{}",
        Names::new(&r.name).experts_service,
        r.namespace,
        spec.serving_or_default().port
    )
}

/// Each rank's forward endpoint through the headless Service's pod names:
/// `<name>-<pod>.<name>-workers.<namespace>.svc:<port + local rank>`, in rank order.
pub fn rank_endpoints(r: &Resolved, spec: &MoEDeploymentSpec) -> Vec<String> {
    let names = Names::new(&r.name);
    let base = u32::from(spec.serving_or_default().port);
    let per_pod = spec.ranks_per_pod();
    (0..spec.expert_parallel.ranks)
        .map(|rank| {
            format!(
                "{}-{}.{}.{}.svc:{}",
                names.statefulset,
                rank / per_pod,
                names.service,
                r.namespace,
                base + rank % per_pod
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ServingSpec;
    use crate::crd::tests::sample_spec;
    use crate::resources::statefulset;
    use crate::resources::tests::{env_of, resolved, value};

    fn serving_spec() -> MoEDeploymentSpec {
        let mut s = sample_spec();
        s.serving = Some(ServingSpec {
            enabled: Some(true),
            port: 9000,
            max_rows_per_request: 512,
            ..Default::default()
        });
        s
    }

    #[test]
    fn serving_workers_get_the_api_settings_and_the_token_mount() {
        let sts = statefulset(&resolved(), &serving_spec());
        let envs = env_of(&sts);
        assert_eq!(value(&envs, env::TRAFFIC).as_deref(), Some("api"));
        assert_eq!(value(&envs, env::FORWARD_PORT).as_deref(), Some("9000"));
        assert_eq!(value(&envs, env::MAX_REQUEST_ROWS).as_deref(), Some("512"));
        assert_eq!(
            value(&envs, env::CLIENT_TOKEN_FILE).as_deref(),
            Some("/etc/moe/client/token")
        );
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let fwd = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some("forward"))
            .unwrap();
        assert_eq!(fwd.container_port, 9000);
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == CLIENT_TOKEN_DIR)
            .unwrap();
        let volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("demo-client-token")
        );
    }

    #[test]
    fn a_synthetic_group_generates_and_has_no_forward_port() {
        let sts = statefulset(&resolved(), &sample_spec());
        let envs = env_of(&sts);
        assert_eq!(value(&envs, env::TRAFFIC).as_deref(), Some("generator"));
        assert!(value(&envs, env::FORWARD_PORT).is_none());
        assert!(value(&envs, env::CLIENT_TOKEN_FILE).is_none());
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert!(
            pod.containers[0].ports.as_ref().unwrap().iter().all(|p| !p
                .name
                .as_deref()
                .unwrap()
                .starts_with("forward"))
        );
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != CLIENT_VOLUME));
    }

    #[test]
    fn experts_service_covers_every_rank_of_a_pod() {
        let mut spec = serving_spec();
        spec.expert_parallel.ranks_per_pod = Some(2);
        let svc = experts_service(&resolved(), &spec);
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-experts"));
        assert_eq!(
            svc.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let s = svc.spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(s.selector.unwrap(), selector_labels("demo"));
        let ports: Vec<(String, i32)> = s
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            vec![("forward".into(), 9000), ("forward-1".into(), 9001)]
        );
        // The pod template names the same ports.
        let sts = statefulset(&resolved(), &spec);
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        let names: Vec<String> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|p| p.name.clone())
            .collect();
        assert!(names.contains(&"forward-1".to_string()), "{names:?}");
    }

    #[test]
    fn endpoints_name_the_service_and_each_rank() {
        let mut spec = serving_spec();
        assert_eq!(
            service_endpoint(&resolved(), &spec),
            "demo-experts.ml.svc:9000"
        );
        spec.expert_parallel.ranks_per_pod = Some(2);
        assert_eq!(
            rank_endpoints(&resolved(), &spec),
            vec![
                "demo-0.demo-workers.ml.svc:9000",
                "demo-0.demo-workers.ml.svc:9001",
                "demo-1.demo-workers.ml.svc:9000",
                "demo-1.demo-workers.ml.svc:9001",
            ]
        );
    }

    #[test]
    fn client_secret_holds_the_token_under_token() {
        let s = client_token_secret(&resolved(), "abc");
        assert_eq!(s.metadata.name.as_deref(), Some("demo-client-token"));
        assert_eq!(s.string_data.unwrap()[TOKEN_KEY], "abc");
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
    }

    /// Enabling serving changes what the pods run (so the group restarts into it); a spec
    /// without `serving` hashes as before serving existed.
    #[test]
    fn serving_is_part_of_the_spec_hash_only_when_set() {
        use crate::resources::{fnv1a, spec_hash};
        let r = resolved();
        let plain = sample_spec();
        // The hash as the operator computed it before spec.serving existed.
        let before_serving = serde_json::json!({
            "model": plain.model,
            "weights": plain.weights,
            "expertParallel": plain.expert_parallel,
            "worker": plain.worker,
            "traffic": plain.traffic,
            "redundantExperts": r.redundant_experts,
            "rollout": r.rollout,
        });
        assert_eq!(
            spec_hash(&r, &plain),
            fnv1a(&serde_json::to_vec(&before_serving).unwrap())
        );
        assert_ne!(spec_hash(&r, &plain), spec_hash(&r, &serving_spec()));
    }
}
