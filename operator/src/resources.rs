//! Desired owned objects of a `MoEDeployment`, as pure functions of the resource.
//!
//! Everything here is applied with server-side apply (field manager `moe-operator`) and carries a
//! controller owner reference, so deleting the `MoEDeployment` garbage-collects it all.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, Service, ServiceAccount,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use moe_api::{env, pods};

use crate::crd::{Backend, MoEDeployment, MoEDeploymentSpec};

mod network;
mod security;
mod serving;
pub use network::{ControlPlanePeers, network_policy};
mod disruption;
mod pod_settings;
pub use disruption::pod_disruption_budget;
pub use pod_settings::SHM_DIR;
pub use security::{
    SCRATCH_DIR, WORKER_UID, worker_container_security_context, worker_pod_security_context,
};
pub use serving::{
    CLIENT_LABEL, CLIENT_TOKEN_DIR, client_token_secret, experts_service, rank_endpoints,
    service_endpoint,
};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "moe-operator";
/// Label naming the `MoEDeployment` an object belongs to.
pub const DEPLOYMENT_LABEL: &str = "moe-operator.github.io/deployment";
/// Pod-template annotation: hash of everything whose change restarts the whole group.
pub const GROUP_HASH_ANNOTATION: &str = "moe-operator.github.io/group-hash";
/// On worker pods: hash of what the MoEDeployment's own spec asks of the pods
/// ([`spec_hash`]). Only a change of this restarts a running group.
pub const SPEC_HASH_ANNOTATION: &str = "moe-operator.github.io/spec-hash";
/// On a MoEDeployment: change its value (any string, e.g. a date) to restart the group onto
/// the operator's current pod template (new default image, probes...), which is otherwise
/// applied only at the group's next own restart.
pub const ROLLOUT_ANNOTATION: &str = "moe-operator.github.io/rollout";
/// ConfigMap annotation: what the committed placement was initialised from.
pub const PLACEMENT_SOURCE_ANNOTATION: &str = "moe-operator.github.io/placement-source";
/// ConfigMap annotation: the committed generation (mirrors the document, for `kubectl`).
pub const PLACEMENT_GENERATION_ANNOTATION: &str = "moe-operator.github.io/placement-generation";
/// The last manual `spec.remapRequest` the operator acted on, written in the same apply as the
/// placement generation it produced. Status records it too, but status is written after the
/// ConfigMap: an operator that dies between the two writes, or a reconcile that starts from a
/// cached object older than its own status write, would otherwise see the request as pending
/// and run it a second time.
pub const HANDLED_REMAP_REQUEST_ANNOTATION: &str = "moe-operator.github.io/handled-remap-request";
/// Label the StatefulSet controller puts on each pod with its ordinal; the worker container's
/// name. Shared with the tools that find the pods (`moe_api::pods`).
pub use moe_api::pods::{POD_INDEX_LABEL, WORKER_CONTAINER};
/// Key of the control token in the owned Secret.
pub const TOKEN_KEY: &str = "token";
pub use crate::crd::GPU_RESOURCE;
/// Worker pods' termination grace period, seconds.
pub const TERMINATION_GRACE_SECONDS: i64 = 75;

pub const PLACEMENT_DIR: &str = "/etc/moe/placement";
pub const CONTROL_DIR: &str = "/etc/moe/control";
pub const WEIGHTS_DIR: &str = "/var/lib/moe/weights";

/// Names of the owned objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub statefulset: String,
    pub service: String,
    pub configmap: String,
    pub secret: String,
    pub service_account: String,
    /// ClusterIP Service of the forward API (the expert tier).
    pub experts_service: String,
    /// Secret with the token attention instances present to the forward API.
    pub client_secret: String,
    pub network_policy: String,
    pub disruption_budget: String,
}

impl Names {
    pub fn new(name: &str) -> Self {
        Self {
            statefulset: name.to_string(),
            service: format!("{name}-workers"),
            configmap: format!("{name}-placement"),
            secret: format!("{name}-control"),
            service_account: format!("{name}-worker"),
            experts_service: format!("{name}-experts"),
            client_secret: format!("{name}-client-token"),
            network_policy: format!("{name}-workers"),
            disruption_budget: name.to_string(),
        }
    }
}

/// Operator-wide defaults of worker pods (flags / environment of the operator), used where
/// the spec leaves a field unset.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerDefaults {
    pub image: Option<String>,
    pub image_pull_policy: Option<String>,
    pub resources: Option<ResourceRequirements>,
}

/// Inputs of the desired objects that are not in the spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
    /// Redundant experts in effect (the spec's, or the smallest valid number).
    pub redundant_experts: u32,
    pub defaults: WorkerDefaults,
    /// The MoEDeployment's [`ROLLOUT_ANNOTATION`] value.
    pub rollout: Option<String>,
}

/// Labels selecting the worker pods of one deployment (stable: the StatefulSet selector).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (pods::NAME_LABEL.to_string(), pods::WORKER_NAME.to_string()),
        (pods::INSTANCE_LABEL.to_string(), name.to_string()),
    ])
}

/// `key=value,...` form of [`selector_labels`] for list calls.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn common_labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert("app.kubernetes.io/managed-by".into(), "moe-operator".into());
    labels.insert(DEPLOYMENT_LABEL.into(), name.into());
    labels
}

fn meta(r: &Resolved, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(r.namespace.clone()),
        labels: Some(common_labels(&r.name)),
        owner_references: Some(vec![r.owner.clone()]),
        ..Default::default()
    }
}

pub fn service_account(r: &Resolved) -> ServiceAccount {
    let names = Names::new(&r.name);
    ServiceAccount {
        metadata: meta(r, &names.service_account),
        ..Default::default()
    }
}

/// Headless Service: stable DNS names `<pod>.<service>` for every rank, published before the
/// pods are ready (rendezvous happens before readiness).
pub fn service(r: &Resolved, spec: &MoEDeploymentSpec) -> Service {
    let names = Names::new(&r.name);
    Service {
        metadata: meta(r, &names.service),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&r.name)),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: i32::from(spec.worker.http_port),
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("comm".into()),
                    port: i32::from(spec.worker.comm_port),
                    target_port: Some(IntOrString::String("comm".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ConfigMap holding the committed placement document.
pub fn placement_configmap(
    r: &Resolved,
    doc: &moe_api::PlacementDocument,
    source: &str,
    handled_remap_request: Option<&str>,
) -> Result<ConfigMap, serde_json::Error> {
    let names = Names::new(&r.name);
    let mut metadata = meta(r, &names.configmap);
    let mut annotations = BTreeMap::from([
        (PLACEMENT_SOURCE_ANNOTATION.to_string(), source.to_string()),
        (
            PLACEMENT_GENERATION_ANNOTATION.to_string(),
            doc.generation.to_string(),
        ),
    ]);
    if let Some(request) = handled_remap_request {
        annotations.insert(
            HANDLED_REMAP_REQUEST_ANNOTATION.to_string(),
            request.to_string(),
        );
    }
    metadata.annotations = Some(annotations);
    Ok(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            moe_api::PLACEMENT_CONFIGMAP_KEY.to_string(),
            serde_json::to_string(doc)?,
        )])),
        ..Default::default()
    })
}

/// The control-token Secret `<name>-control`, holding the token derived for the deployment
/// ([`crate::tokens`]); created once and never read or rewritten by the operator.
pub fn control_secret(r: &Resolved, token: &str) -> k8s_openapi::api::core::v1::Secret {
    let names = Names::new(&r.name);
    k8s_openapi::api::core::v1::Secret {
        metadata: meta(r, &names.secret),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token.to_string())])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

fn env_value(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.to_string(),
            }),
            ..Default::default()
        }),
    }
}

/// Environment the operator sets on every worker (names from [`moe_api::env`]); user entries
/// with the same name replace the operator's.
pub fn worker_env(r: &Resolved, spec: &MoEDeploymentSpec) -> Vec<EnvVar> {
    let names = Names::new(&r.name);
    let m = &spec.model;
    let leader = format!(
        "{}-0.{}.{}.svc:{}",
        names.statefulset, names.service, r.namespace, spec.worker.comm_port
    );
    let weights = match (
        &spec.weights.synthetic,
        &spec.weights.persistent_volume_claim,
    ) {
        (_, Some(pvc)) => match &pvc.path {
            Some(p) if !p.is_empty() => format!("{WEIGHTS_DIR}/{}", p.trim_start_matches('/')),
            _ => WEIGHTS_DIR.to_string(),
        },
        (Some(s), None) => format!("synthetic:{}", s.seed),
        (None, None) => "synthetic:0".to_string(),
    };
    // The pod ordinal places the pod: its rank, or with several ranks per pod its process
    // index (first rank = index x ranksPerPod).
    let ordinal = format!("metadata.labels['{POD_INDEX_LABEL}']");
    let placement_env = if spec.ranks_per_pod() > 1 {
        vec![
            env_field(env::PROCESS_INDEX, &ordinal),
            env_value(env::LOCAL_RANKS, spec.ranks_per_pod()),
        ]
    } else {
        vec![env_field(env::RANK, &ordinal)]
    };
    let mut out = placement_env;
    out.extend([
        env_value(env::WORLD_SIZE, spec.expert_parallel.ranks),
        env_value(env::RANKS_PER_NODE, spec.ranks_per_node()),
        env_value(env::LEADER_ADDR, leader),
        env_value(env::COMM_PORT, spec.worker.comm_port),
        env_value(env::HTTP_PORT, spec.worker.http_port),
        env_field(env::ADVERTISE_ADDR, "status.podIP"),
        env_value(
            env::CONTROL_TOKEN_FILE,
            format!("{CONTROL_DIR}/{TOKEN_KEY}"),
        ),
        env_value(
            env::PLACEMENT_FILE,
            format!("{PLACEMENT_DIR}/{}", moe_api::PLACEMENT_CONFIGMAP_KEY),
        ),
        env_value(env::BACKEND, spec.worker.backend.env_value()),
        env_value(env::NUM_LAYERS, m.num_layers),
        env_value(env::NUM_EXPERTS, m.num_experts),
        env_value(env::HIDDEN, m.hidden),
        env_value(env::INTERMEDIATE, m.intermediate),
        env_value(env::TOP_K, m.top_k),
        env_value(env::EXPERT_GROUPS, m.expert_groups),
        env_value(env::TOPK_GROUPS, m.topk_groups),
        env_value(env::SCORING, m.scoring.env_value()),
        env_value(env::REDUNDANT_EXPERTS, r.redundant_experts),
        // The operator always commits the placement (generation 0 = the strategy's), so the
        // worker always loads it from the file.
        env_value(env::INITIAL_PLACEMENT, "file"),
        env_value(env::WEIGHTS, weights),
        env_value(env::STATS_WINDOW, spec.eplb.window_steps),
    ]);
    out.extend(serving::worker_env(spec));
    // What spec.model says of the checkpoint beyond its shape: only what the user set, so a
    // worker falls back to the checkpoint's (or the architecture's) own values otherwise.
    if let Some(a) = &m.architecture {
        out.push(env_value(env::ARCHITECTURE, a));
    }
    if let Some(v) = m.norm_topk_prob {
        out.push(env_value(env::NORM_TOPK_PROB, v));
    }
    if let Some(v) = m.routed_scaling_factor {
        out.push(env_value(env::ROUTED_SCALING_FACTOR, v));
    }
    if let Some(v) = m.shared_experts {
        out.push(env_value(env::SHARED_EXPERTS, v));
    }
    if let Some(t) = &spec.traffic {
        if let Some(v) = t.tokens_per_step {
            out.push(env_value(env::TRAFFIC_TOKENS_PER_STEP, v));
        }
        if let Some(v) = t.skew {
            out.push(env_value(env::TRAFFIC_SKEW, v));
        }
        if let Some(v) = t.drift {
            out.push(env_value(env::TRAFFIC_DRIFT, v));
        }
        if let Some(v) = t.seed {
            out.push(env_value(env::TRAFFIC_SEED, v));
        }
        if let Some(v) = t.steps_per_second {
            out.push(env_value(env::TRAFFIC_STEPS_PER_SECOND, v));
        }
    }
    if let Some(user) = &spec.worker.env {
        out.retain(|e| !user.iter().any(|u| u.name == e.name));
        out.extend(user.iter().cloned());
    }
    out
}

/// The worker container's ports: `http` and `comm` for the pod's first rank, `http-i` and
/// `comm-i` (base + i) for its other ranks. The readiness probe uses `http`: a worker is ready
/// only once the whole group formed and loaded, so the first rank speaks for the pod.
fn container_ports(spec: &MoEDeploymentSpec) -> Vec<ContainerPort> {
    let port = |name: String, p: u32| ContainerPort {
        name: Some(name),
        container_port: p as i32,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let (http, comm) = (
        u32::from(spec.worker.http_port),
        u32::from(spec.worker.comm_port),
    );
    let mut out = vec![
        port(pods::http_port_name(0), http),
        port("comm".into(), comm),
    ];
    for i in 1..spec.ranks_per_pod() {
        out.push(port(pods::http_port_name(i as usize), http + i));
        out.push(port(format!("comm-{i}"), comm + i));
    }
    out.extend(serving::container_ports(spec));
    out
}

fn resources(r: &Resolved, spec: &MoEDeploymentSpec) -> ResourceRequirements {
    let from_spec = spec.worker.resources.is_some();
    let mut res = spec
        .worker
        .resources
        .clone()
        .or_else(|| r.defaults.resources.clone())
        .unwrap_or_default();
    if spec.worker.backend == Backend::Cpu && !from_spec {
        // The operator's defaults are for GPU groups: a CPU group must not wait for a GPU.
        for list in [res.limits.as_mut(), res.requests.as_mut()]
            .into_iter()
            .flatten()
        {
            list.remove(GPU_RESOURCE);
        }
    }
    if spec.worker.backend == Backend::Cuda {
        // One GPU per rank: a spec that sets the count is checked by `validate`; the operator's
        // defaults are per rank, so their count is replaced by the pod's rank count.
        let gpus = Quantity(spec.ranks_per_pod().to_string());
        let limits = res.limits.get_or_insert_with(BTreeMap::new);
        if from_spec {
            limits.entry(GPU_RESOURCE.to_string()).or_insert(gpus);
        } else {
            limits.insert(GPU_RESOURCE.to_string(), gpus);
        }
    }
    res
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// Pod template of a worker rank, without the group-hash annotation.
fn pod_template(r: &Resolved, spec: &MoEDeploymentSpec) -> PodTemplateSpec {
    let names = Names::new(&r.name);
    let mut mounts = vec![
        VolumeMount {
            name: "placement".into(),
            mount_path: PLACEMENT_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "control".into(),
            mount_path: CONTROL_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "placement".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.configmap.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "control".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.secret.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some((volume, mount)) = serving::client_token_volume(&names, spec) {
        volumes.push(volume);
        mounts.push(mount);
    }
    let (scratch, scratch_mount) = security::scratch_volume();
    volumes.push(scratch);
    mounts.push(scratch_mount);
    if let Some(pvc) = &spec.weights.persistent_volume_claim {
        mounts.push(VolumeMount {
            name: "weights".into(),
            mount_path: WEIGHTS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "weights".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
    }
    let container = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(
            spec.worker
                .image
                .clone()
                .or_else(|| r.defaults.image.clone())
                .unwrap_or_else(crate::crd::default_image),
        ),
        image_pull_policy: spec
            .worker
            .image_pull_policy
            .clone()
            .or_else(|| r.defaults.image_pull_policy.clone()),
        command: spec.worker.command.clone(),
        args: spec.worker.args.clone(),
        env: Some(worker_env(r, spec)),
        ports: Some(container_ports(spec)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        // Loading weights and forming the group may take minutes: allow 10 before liveness counts.
        startup_probe: Some(probe("/healthz", 5, 120)),
        resources: Some(resources(r, spec)),
        volume_mounts: Some(mounts),
        // A worker that refuses its configuration writes `Reason: message` to the termination
        // log; without one the log's tail stands in, so the operator can still say why.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(worker_container_security_context()),
        ..Default::default()
    };
    let mut labels = common_labels(&r.name);
    labels.insert("app.kubernetes.io/component".into(), "ep-rank".into());
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names.service_account.clone()),
            // Workers never call the API server (placement and token come as mounted files):
            // no token in the pod, and no Role for the account.
            automount_service_account_token: Some(false),
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: spec.worker.node_selector.clone(),
            tolerations: spec.worker.tolerations.clone(),
            priority_class_name: spec.worker.priority_class_name.clone(),
            // Longer than the worker's own stop grace (its comm timeout, 60 s by default, + 5 s),
            // so a stopping group finishes its collectives instead of being killed mid-way.
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            security_context: Some(worker_pod_security_context()),
            ..Default::default()
        }),
    };
    pod_settings::apply(&mut template, &spec.worker.pod);
    template
}

pub(crate) fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Hash of what the MoEDeployment's own spec asks of its pods: model, weights, EP group,
/// worker settings, traffic, serving (when set), the redundant experts in effect and the rollout annotation. Not
/// the operator's defaults (image, resources, probes, security context), so an operator
/// upgrade never restarts running groups by itself; nor what applies live (eplb, placement
/// strategy, remap requests, restart policy). Stable across releases as long as new spec
/// fields are optional and left out of the JSON when unset.
pub fn spec_hash(r: &Resolved, spec: &MoEDeploymentSpec) -> String {
    let mut v = serde_json::json!({
        "model": spec.model,
        "weights": spec.weights,
        "expertParallel": spec.expert_parallel,
        "worker": spec.worker,
        "traffic": spec.traffic,
        "redundantExperts": r.redundant_experts,
        "rollout": r.rollout,
    });
    // Only when set, so that the hash of a spec written before serving existed stays the same.
    if let (Some(serving), Some(map)) = (&spec.serving, v.as_object_mut()) {
        map.insert(
            "serving".into(),
            serde_json::to_value(serving).unwrap_or_default(),
        );
    }
    fnv1a(&serde_json::to_vec(&v).unwrap_or_default())
}

/// Hash of the pod template with the fields that apply without a restart blanked out
/// (the statistics window: workers read it at their next start). Stable across releases
/// (FNV-1a over the JSON).
pub fn group_hash(template: &PodTemplateSpec) -> String {
    let mut t = template.clone();
    if let Some(c) = t
        .spec
        .as_mut()
        .and_then(|s| s.containers.first_mut())
        .and_then(|c| c.env.as_mut())
    {
        c.retain(|e| e.name != env::STATS_WINDOW);
    }
    fnv1a(&serde_json::to_vec(&t).unwrap_or_default())
}

/// The worker StatefulSet: one pod per `ranksPerPod` ranks, created and deleted in parallel, updated only when
/// the operator deletes pods (`OnDelete`), so that the whole EP group restarts together.
pub fn statefulset(r: &Resolved, spec: &MoEDeploymentSpec) -> StatefulSet {
    let names = Names::new(&r.name);
    let mut template = pod_template(r, spec);
    let hash = group_hash(&template);
    if let Some(m) = template.metadata.as_mut() {
        // Beside the spec's podAnnotations (which may not use the operator's keys).
        let annotations = m.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(GROUP_HASH_ANNOTATION.to_string(), hash);
        annotations.insert(SPEC_HASH_ANNOTATION.to_string(), spec_hash(r, spec));
    }
    StatefulSet {
        metadata: meta(r, &names.statefulset),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.num_pods() as i32),
            service_name: Some(names.service.clone()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&r.name)),
                match_expressions: None,
            },
            template,
            ..Default::default()
        }),
        status: None,
    }
}

/// The group hash (of the whole template) the desired StatefulSet's pods carry.
pub fn desired_group_hash(sts: &StatefulSet) -> Option<String> {
    template_annotation(sts, GROUP_HASH_ANNOTATION)
}

/// The spec hash the desired StatefulSet's pods carry.
pub fn desired_spec_hash(sts: &StatefulSet) -> Option<String> {
    template_annotation(sts, SPEC_HASH_ANNOTATION)
}

fn template_annotation(sts: &StatefulSet, key: &str) -> Option<String> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

/// Convenience: the owner reference for a `MoEDeployment`.
pub fn owner_reference(moed: &MoEDeployment) -> Option<OwnerReference> {
    use kube::Resource;
    moed.controller_owner_ref(&())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::tests::sample_spec;

    pub(crate) fn resolved() -> Resolved {
        Resolved {
            name: "demo".into(),
            namespace: "ml".into(),
            owner: OwnerReference {
                api_version: "moe-operator.github.io/v1alpha1".into(),
                kind: "MoEDeployment".into(),
                name: "demo".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
            redundant_experts: 4,
            rollout: None,
            defaults: WorkerDefaults::default(),
        }
    }

    /// The worker container of a StatefulSet's pod template.
    pub(crate) fn worker_container(sts: &StatefulSet) -> &Container {
        &sts.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    pub(crate) fn env_of(sts: &StatefulSet) -> Vec<EnvVar> {
        worker_container(sts).env.clone().unwrap()
    }

    pub(crate) fn value(envs: &[EnvVar], name: &str) -> Option<String> {
        envs.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn statefulset_is_parallel_ondelete_with_one_gpu_per_rank() {
        let spec = sample_spec();
        let sts = statefulset(&resolved(), &spec);
        let s = sts.spec.as_ref().unwrap();
        assert_eq!(s.replicas, Some(4));
        assert_eq!(s.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            s.update_strategy.as_ref().unwrap().type_.as_deref(),
            Some("OnDelete")
        );
        assert_eq!(s.service_name.as_deref(), Some("demo-workers"));
        let pod = s.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("1".into())
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("demo-worker"));
        // The restricted Pod Security level admits it; the root filesystem is read-only with
        // an emptyDir for scratch space.
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(WORKER_UID));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(
            csc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let scratch = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == SCRATCH_DIR);
        let scratch_volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == scratch.unwrap().name);
        assert!(scratch_volume.unwrap().empty_dir.is_some());
        assert_eq!(
            sts.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert!(desired_group_hash(&sts).is_some());
    }

    #[test]
    fn env_follows_the_contract() {
        let spec = sample_spec();
        let envs = env_of(&statefulset(&resolved(), &spec));
        let rank = envs.iter().find(|e| e.name == env::RANK).unwrap();
        assert_eq!(
            rank.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.labels['apps.kubernetes.io/pod-index']"
        );
        assert_eq!(value(&envs, env::WORLD_SIZE).as_deref(), Some("4"));
        assert_eq!(value(&envs, env::REDUNDANT_EXPERTS).as_deref(), Some("4"));
        assert_eq!(
            value(&envs, env::LEADER_ADDR).as_deref(),
            Some("demo-0.demo-workers.ml.svc:29500")
        );
        assert_eq!(
            value(&envs, env::PLACEMENT_FILE).as_deref(),
            Some("/etc/moe/placement/placement.json")
        );
        assert_eq!(
            value(&envs, env::CONTROL_TOKEN_FILE).as_deref(),
            Some("/etc/moe/control/token")
        );
        assert_eq!(value(&envs, env::WEIGHTS).as_deref(), Some("synthetic:0"));
        assert_eq!(
            value(&envs, env::INITIAL_PLACEMENT).as_deref(),
            Some("file")
        );
    }

    #[test]
    fn several_ranks_per_pod_share_one_pod() {
        let mut spec = sample_spec();
        spec.expert_parallel.ranks_per_pod = Some(2);
        let sts = statefulset(&resolved(), &spec);
        let envs = env_of(&sts);
        // The pod ordinal becomes the process index; no MOE_RANK.
        assert!(envs.iter().all(|e| e.name != env::RANK));
        let index = envs.iter().find(|e| e.name == env::PROCESS_INDEX).unwrap();
        assert_eq!(
            index
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.labels['apps.kubernetes.io/pod-index']"
        );
        assert_eq!(value(&envs, env::LOCAL_RANKS).as_deref(), Some("2"));
        assert_eq!(value(&envs, env::WORLD_SIZE).as_deref(), Some("4"));
        let s = sts.spec.unwrap();
        assert_eq!(s.replicas, Some(2));
        let c = &s.template.spec.unwrap().containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("2".into())
        );
        let ports: Vec<(String, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("http".into(), 8080),
                ("comm".into(), 29500),
                ("http-1".into(), 8081),
                ("comm-1".into(), 29501)
            ]
        );
    }

    #[test]
    fn user_env_replaces_operator_env_and_cpu_requests_no_gpu() {
        let mut spec = sample_spec();
        spec.worker.backend = Backend::Cpu;
        spec.worker.env = Some(vec![env_value(env::LEADER_ADDR, "127.0.0.1:1234")]);
        let sts = statefulset(&resolved(), &spec);
        let envs = env_of(&sts);
        assert_eq!(
            envs.iter().filter(|e| e.name == env::LEADER_ADDR).count(),
            1
        );
        assert_eq!(
            value(&envs, env::LEADER_ADDR).as_deref(),
            Some("127.0.0.1:1234")
        );
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        assert!(c.resources.as_ref().unwrap().limits.is_none());
    }

    #[test]
    fn group_hash_ignores_window_but_not_shape() {
        let spec = sample_spec();
        let base = desired_group_hash(&statefulset(&resolved(), &spec));
        let mut window = spec.clone();
        window.eplb.window_steps = 77;
        window.eplb.imbalance_threshold = 1.5;
        assert_eq!(base, desired_group_hash(&statefulset(&resolved(), &window)));
        let mut shape = spec.clone();
        shape.expert_parallel.ranks = 8;
        assert_ne!(base, desired_group_hash(&statefulset(&resolved(), &shape)));
        let mut image = spec;
        image.worker.image = Some("other:1".into());
        assert_ne!(base, desired_group_hash(&statefulset(&resolved(), &image)));
    }

    /// The operator's own defaults change the template (and its hash) but not the spec hash,
    /// which alone restarts groups; the spec's fields and the rollout annotation change both.
    #[test]
    fn spec_hash_ignores_operator_defaults_but_not_the_spec_or_a_rollout() {
        let spec = sample_spec();
        let hashes = |r: &Resolved, s: &MoEDeploymentSpec| {
            let sts = statefulset(r, s);
            (desired_group_hash(&sts), desired_spec_hash(&sts))
        };
        let (template, base) = hashes(&resolved(), &spec);
        assert!(base.is_some());
        let mut upgraded = resolved();
        upgraded.defaults.image = Some("ghcr.io/moe-operator/moe-worker:9.9.9".into());
        let (t2, s2) = hashes(&upgraded, &spec);
        assert_ne!(
            template, t2,
            "the template follows the operator's default image"
        );
        assert_eq!(base, s2, "an operator default never restarts the group");
        let mut rolled = resolved();
        rolled.rollout = Some("2026-12-05".into());
        assert_ne!(base, hashes(&rolled, &spec).1);
        let mut live = spec.clone();
        live.eplb.window_steps = 77;
        live.eplb.history_windows = 2;
        live.remap_request = Some("now".into());
        assert_eq!(base, hashes(&resolved(), &live).1);
        let mut image = spec;
        image.worker.image = Some("other:1".into());
        assert_ne!(base, hashes(&resolved(), &image).1);
    }

    #[test]
    fn operator_defaults_fill_unset_worker_fields() {
        let mut r = resolved();
        r.defaults = WorkerDefaults {
            image: Some("registry.local/moe-worker:dev".into()),
            image_pull_policy: Some("Never".into()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("cpu".to_string(), Quantity("2".into()))])),
                ..Default::default()
            }),
        };
        let sts = statefulset(&r, &sample_spec());
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/moe-worker:dev"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.requests.as_ref().unwrap()["cpu"], Quantity("2".into()));
        assert_eq!(
            res.limits.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("1".into())
        );
        // The defaults' GPU count is per rank: a pod of two ranks gets two.
        r.defaults.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                GPU_RESOURCE.to_string(),
                Quantity("1".into()),
            )])),
            ..Default::default()
        });
        let mut paired = sample_spec();
        paired.expert_parallel.ranks_per_pod = Some(2);
        let sts = statefulset(&r, &paired);
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("2".into())
        );
        let mut spec = sample_spec();
        spec.worker.image = Some("mine:1".into());
        let sts = statefulset(&r, &spec);
        let c = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("mine:1"));
        let plain = statefulset(&resolved(), &sample_spec());
        let c = &plain.spec.unwrap().template.spec.unwrap().containers[0];
        assert!(
            c.image
                .as_deref()
                .unwrap()
                .starts_with("ghcr.io/moe-operator/moe-worker:")
        );
    }

    /// A CPU group does not inherit the GPU limit of the operator's (GPU) defaults; a CUDA
    /// group gets one GPU per rank of the pod.
    #[test]
    fn cpu_groups_request_no_gpu_from_the_defaults() {
        let mut r = resolved();
        let mut limits = BTreeMap::new();
        limits.insert(GPU_RESOURCE.to_string(), Quantity("1".into()));
        limits.insert("memory".to_string(), Quantity("64Gi".into()));
        r.defaults.resources = Some(ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        });
        let mut spec = sample_spec();
        spec.worker.resources = None;
        spec.worker.backend = Backend::Cpu;
        let limits = resources(&r, &spec).limits.unwrap();
        assert!(!limits.contains_key(GPU_RESOURCE), "{limits:?}");
        assert!(limits.contains_key("memory"));
        spec.worker.backend = Backend::Cuda;
        assert_eq!(
            resources(&r, &spec).limits.unwrap()[GPU_RESOURCE],
            Quantity("1".into())
        );
    }

    #[test]
    fn workers_get_no_api_token() {
        let sts = statefulset(&resolved(), &sample_spec());
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(TERMINATION_GRACE_SECONDS)
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("demo-worker"));
    }

    #[test]
    fn service_is_headless_and_publishes_not_ready() {
        let svc = service(&resolved(), &sample_spec());
        let s = svc.spec.unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        assert_eq!(s.publish_not_ready_addresses, Some(true));
        assert_eq!(s.ports.unwrap().len(), 2);
    }

    #[test]
    fn pvc_weights_are_mounted_read_only() {
        let mut spec = sample_spec();
        spec.weights = crate::crd::WeightsSpec {
            synthetic: None,
            persistent_volume_claim: Some(crate::crd::PvcWeights {
                claim_name: "weights".into(),
                path: Some("dsv3".into()),
            }),
        };
        let sts = statefulset(&resolved(), &spec);
        assert_eq!(
            value(&env_of(&sts), env::WEIGHTS).as_deref(),
            Some("/var/lib/moe/weights/dsv3")
        );
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert!(
            pod.volumes
                .unwrap()
                .iter()
                .any(|v| v.persistent_volume_claim.is_some())
        );
    }
}
