//! `spec.worker`'s pod-level settings for real GPU clusters: scheduling (affinity, spread,
//! scheduler, runtime class), pulls, extra labels/annotations/volumes, `/dev/shm`, probe timings,
//! termination grace and security-context overrides. Flattened into `spec.worker`.
//!
//! Admission (CEL) refuses what would break the operator's own use of the pod: labels it selects
//! pods by, annotations it keys rollouts on, volume names and mount paths it uses. The operator
//! re-checks the same in [`WorkerPodSpec::validate`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, SecurityContext, TopologySpreadConstraint,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SpecError;

/// Pod labels the operator sets and selects by (the StatefulSet selector, the owner label) and
/// the ones the StatefulSet controller sets: `spec.worker.podLabels` may not set them.
pub const RESERVED_LABELS: [&str; 8] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "moe-operator.github.io/deployment",
    "apps.kubernetes.io/pod-index",
    "statefulset.kubernetes.io/pod-name",
    "controller-revision-hash",
];
/// Pod annotations of the operator (the group and spec hashes rollouts are decided by).
pub const RESERVED_ANNOTATIONS: [&str; 2] = [
    "moe-operator.github.io/group-hash",
    "moe-operator.github.io/spec-hash",
];
/// Volumes of the operator's pod template, which `spec.worker.volumes` may not reuse.
pub const RESERVED_VOLUMES: [&str; 5] = ["placement", "control", "tmp", "weights", "dshm"];
/// Mount paths of the operator's volumes, which `spec.worker.volumeMounts` may not reuse.
pub const RESERVED_MOUNT_PATHS: [&str; 5] = [
    "/etc/moe/placement",
    "/etc/moe/control",
    "/tmp",
    "/var/lib/moe/weights",
    "/dev/shm",
];

/// Timing of one probe; unset fields keep the operator's values (docs/operator.md).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTiming {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub failure_threshold: Option<i32>,
}

/// The worker's probes: startup (`/healthz`, up to 10 minutes by default for weights and
/// rendezvous), readiness (`/readyz`: the whole group formed) and liveness (`/healthz`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerProbes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<ProbeTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<ProbeTiming>,
}

/// Pod-level settings of the worker pods. Every field is optional and left out of the stored
/// object when unset, so adding them changed no existing group's spec hash; changing one is a
/// change of the worker spec and restarts the group as a whole (like an image change).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSpec {
    /// Pod affinity and anti-affinity (e.g. keep a group's pods within one NVLink domain or
    /// rack, or apart from other groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the group's pods spread over topology domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Scheduler of the worker pods (e.g. Volcano or the coscheduling plugin for gang
    /// scheduling; their pod-group labels/annotations go in `podLabels`/`podAnnotations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// RuntimeClass of the worker pods (e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
    /// Secrets (same namespace) used to pull the worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Extra labels of the worker pods. The operator's own (`app.kubernetes.io/name`,
    /// `instance`, `managed-by`, `component`, `moe-operator.github.io/*`) and the StatefulSet
    /// controller's are refused: the operator selects its pods by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// Extra annotations of the worker pods (`moe-operator.github.io/*` is the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Extra volumes of the worker pods (names `placement`, `control`, `tmp`, `weights`, `dshm`
    /// are the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub volumes: Option<Vec<Volume>>,
    /// Mounts of `volumes` into the worker container (not on the operator's paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// Size limit of the memory-backed `/dev/shm` (an emptyDir with medium Memory; NCCL's
    /// shared-memory transport needs more than the runtime's 64 MiB). Counts against the pod's
    /// memory. Unset: no limit of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,
    /// Termination grace of the worker pods, seconds (default 75: longer than the worker's own
    /// stop grace, so a stopping group finishes its collectives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
    /// Probe timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<WorkerProbes>,
    /// Merged field by field over the worker container's restricted-level security context
    /// (fields left unset keep the operator's values, e.g. `capabilities.add: [IPC_LOCK]` keeps
    /// `drop: [ALL]`). What the namespace's Pod Security level forbids is rejected by the API
    /// server and reported as `Degraded/PodSecurityViolation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Merged the same way over the worker pod's security context (non-root user 65532,
    /// RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
}

fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `!('a' in self.m) && !('b' in self.m) ...`: map lookups of constant cost (a rule that
/// iterates over the keys would be estimated at the API server's maximal key length and count,
/// which blows the CRD's CEL cost budget).
fn none_of(map: &str, keys: &[&str]) -> String {
    let lookups = keys
        .iter()
        .map(|k| format!("!('{k}' in self.{map})"))
        .collect::<Vec<_>>()
        .join(" && ");
    format!("!has(self.{map}) || ({lookups})")
}

/// CEL rules of the pod settings (added to `spec.worker`'s rules). A mount naming no volume is
/// not a rule (its cost, every mount against every volume, is over the API server's budget): the
/// operator refuses it as `InvalidSpec` ([`WorkerPodSpec::validate`]).
pub fn cel_rules() -> Vec<serde_json::Value> {
    let volumes = quoted(&RESERVED_VOLUMES);
    let paths = quoted(&RESERVED_MOUNT_PATHS);
    vec![
        serde_json::json!({
            "rule": none_of("podLabels", &RESERVED_LABELS),
            "message": format!("spec.worker.podLabels must not set {}: the operator and the StatefulSet select the group's pods by them; use other keys", RESERVED_LABELS.join(", ")),
            "fieldPath": ".podLabels",
            "reason": "FieldValueForbidden"
        }),
        serde_json::json!({
            "rule": none_of("podAnnotations", &RESERVED_ANNOTATIONS),
            "message": format!("spec.worker.podAnnotations must not set {} (the operator decides rollouts by them): use other keys", RESERVED_ANNOTATIONS.join(", ")),
            "fieldPath": ".podAnnotations",
            "reason": "FieldValueForbidden"
        }),
        serde_json::json!({
            "rule": format!("!has(self.volumes) || self.volumes.all(v, !(v.name in [{volumes}]))"),
            "message": format!("spec.worker.volumes must not be named {}: the operator's pod template uses those names; rename the volume", RESERVED_VOLUMES.join(", ")),
            "fieldPath": ".volumes",
            "reason": "FieldValueForbidden"
        }),
        serde_json::json!({
            "rule": format!("!has(self.volumeMounts) || self.volumeMounts.all(m, !(m.mountPath in [{paths}]))"),
            "message": format!("spec.worker.volumeMounts must not mount on {}: the operator mounts its own volumes there; choose another mountPath", RESERVED_MOUNT_PATHS.join(", ")),
            "fieldPath": ".volumeMounts",
            "reason": "FieldValueForbidden"
        }),
        serde_json::json!({
            "rule": "!has(self.shmSize) || (isQuantity(string(self.shmSize)) && quantity(string(self.shmSize)).isGreaterThan(quantity('0')))",
            "message": "spec.worker.shmSize must be a positive quantity (e.g. 16Gi): fix it or remove it",
            "fieldPath": ".shmSize",
            "reason": "FieldValueInvalid"
        }),
    ]
}

impl WorkerPodSpec {
    /// The same checks as [`cel_rules`], for specs that did not go through them.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, message: String| Err(SpecError { field, message });
        if let Some(k) = self
            .pod_labels
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .find(|k| RESERVED_LABELS.contains(&k.as_str()))
        {
            return err(
                "spec.worker.podLabels",
                format!(
                    "{k} is the operator's (it selects the group's pods by it): use another key"
                ),
            );
        }
        if let Some(k) = self
            .pod_annotations
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .find(|k| RESERVED_ANNOTATIONS.contains(&k.as_str()))
        {
            return err(
                "spec.worker.podAnnotations",
                format!("{k} is the operator's: use another key"),
            );
        }
        let volumes = self.volumes.as_deref().unwrap_or_default();
        if let Some(v) = volumes
            .iter()
            .find(|v| RESERVED_VOLUMES.contains(&v.name.as_str()))
        {
            return err(
                "spec.worker.volumes",
                format!(
                    "{} is a volume of the operator's pod template: rename it",
                    v.name
                ),
            );
        }
        for m in self.volume_mounts.iter().flatten() {
            if RESERVED_MOUNT_PATHS.contains(&m.mount_path.as_str()) {
                return err(
                    "spec.worker.volumeMounts",
                    format!(
                        "{} is where the operator mounts its own volume: choose another mountPath",
                        m.mount_path
                    ),
                );
            }
            if !volumes.iter().any(|v| v.name == m.name) {
                return err(
                    "spec.worker.volumeMounts",
                    format!("{} names no volume of spec.worker.volumes", m.name),
                );
            }
        }
        if let Some(q) = &self.shm_size
            && crate::quantity::parse_bytes(&q.0).is_none_or(|b| b == 0)
        {
            return err(
                "spec.worker.shmSize",
                format!("{:?} is not a positive byte quantity (e.g. 16Gi)", q.0),
            );
        }
        Ok(())
    }
}

/// Bounds the CEL rules need (the API server estimates a rule's cost from the longest string
/// and list it may see): a volume name is a DNS label (63), a mount path at most 4096 bytes
/// (PATH_MAX). Called on `spec.worker`'s schema.
pub fn bound_strings(schema: &mut schemars::Schema) {
    let limits = [
        ("volumes", "name", 63),
        ("volumeMounts", "name", 63),
        ("volumeMounts", "mountPath", 4096),
    ];
    for (list, field, max) in limits {
        if let Some(prop) = schema
            .get_mut("properties")
            .and_then(|p| p.get_mut(list))
            .and_then(|l| l.get_mut("items"))
            .and_then(|i| i.get_mut("properties"))
            .and_then(|p| p.get_mut(field))
            .and_then(|f| f.as_object_mut())
        {
            prop.insert("maxLength".into(), max.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_keys_volumes_and_paths_are_refused() {
        let ok = WorkerPodSpec {
            pod_labels: Some(BTreeMap::from([("team".into(), "ml".into())])),
            volumes: Some(vec![Volume {
                name: "cache".into(),
                ..Default::default()
            }]),
            volume_mounts: Some(vec![VolumeMount {
                name: "cache".into(),
                mount_path: "/cache".into(),
                ..Default::default()
            }]),
            shm_size: Some(Quantity("16Gi".into())),
            ..Default::default()
        };
        ok.validate().unwrap();
        let field = |s: WorkerPodSpec| s.validate().unwrap_err().field;
        let mut s = ok.clone();
        s.pod_labels = Some(BTreeMap::from([(
            "app.kubernetes.io/instance".into(),
            "x".into(),
        )]));
        assert_eq!(field(s), "spec.worker.podLabels");
        let mut s = ok.clone();
        s.pod_annotations = Some(BTreeMap::from([(
            "moe-operator.github.io/spec-hash".into(),
            "x".into(),
        )]));
        assert_eq!(field(s), "spec.worker.podAnnotations");
        let mut s = ok.clone();
        s.volumes.as_mut().unwrap()[0].name = "control".into();
        assert_eq!(field(s), "spec.worker.volumes");
        let mut s = ok.clone();
        s.volume_mounts.as_mut().unwrap()[0].mount_path = "/dev/shm".into();
        assert_eq!(field(s), "spec.worker.volumeMounts");
        let mut s = ok.clone();
        s.volume_mounts.as_mut().unwrap()[0].name = "nope".into();
        assert_eq!(field(s), "spec.worker.volumeMounts");
        let mut s = ok;
        s.shm_size = Some(Quantity("lots".into()));
        assert_eq!(field(s), "spec.worker.shmSize");
    }
}
