//! `spec.worker`'s pod-level settings ([`WorkerPodSpec`]) applied to the operator's worker pod
//! template: scheduling, pulls, extra labels/annotations/volumes, the memory-backed `/dev/shm`,
//! probe timings, termination grace and security-context overrides.

use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, PodTemplateSpec, Probe, Volume, VolumeMount,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{ProbeTiming, WorkerPodSpec};

/// The memory-backed `/dev/shm` of every worker pod.
pub const SHM_DIR: &str = "/dev/shm";
const SHM_VOLUME: &str = "dshm";

/// Applies the settings to a template built by [`super::pod_template`] (one container, the
/// worker). Labels and annotations are added, never replacing the operator's (admission and
/// [`WorkerPodSpec::validate`] refuse those keys; here the operator's win regardless).
pub fn apply(template: &mut PodTemplateSpec, settings: &WorkerPodSpec) {
    let meta = template.metadata.get_or_insert_with(Default::default);
    if let Some(extra) = &settings.pod_labels {
        let labels = meta.labels.get_or_insert_with(Default::default);
        for (k, v) in extra {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if let Some(extra) = &settings.pod_annotations {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        for (k, v) in extra {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    if settings.affinity.is_some() {
        pod.affinity = settings.affinity.clone();
    }
    if settings.topology_spread_constraints.is_some() {
        pod.topology_spread_constraints = settings.topology_spread_constraints.clone();
    }
    if settings.scheduler_name.is_some() {
        pod.scheduler_name = settings.scheduler_name.clone();
    }
    if settings.runtime_class_name.is_some() {
        pod.runtime_class_name = settings.runtime_class_name.clone();
    }
    if settings.image_pull_secrets.is_some() {
        pod.image_pull_secrets = settings.image_pull_secrets.clone();
    }
    if let Some(grace) = settings.termination_grace_period_seconds {
        pod.termination_grace_period_seconds = Some(grace);
    }
    if let Some(over) = &settings.pod_security_context {
        pod.security_context = Some(merged(pod.security_context.take(), over));
    }
    // NCCL's shared-memory transport needs more /dev/shm than a container runtime's 64 MiB.
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: SHM_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: settings.shm_size.clone(),
        }),
        ..Default::default()
    });
    volumes.extend(settings.volumes.iter().flatten().cloned());
    let Some(c) = pod.containers.first_mut() else {
        return;
    };
    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    mounts.push(VolumeMount {
        name: SHM_VOLUME.into(),
        mount_path: SHM_DIR.into(),
        ..Default::default()
    });
    mounts.extend(settings.volume_mounts.iter().flatten().cloned());
    if let Some(over) = &settings.security_context {
        c.security_context = Some(merged(c.security_context.take(), over));
    }
    if let Some(p) = &settings.probes {
        timing(c.startup_probe.as_mut(), p.startup.as_ref());
        timing(c.readiness_probe.as_mut(), p.readiness.as_ref());
        timing(c.liveness_probe.as_mut(), p.liveness.as_ref());
    }
}

fn timing(probe: Option<&mut Probe>, t: Option<&ProbeTiming>) {
    let (Some(probe), Some(t)) = (probe, t) else {
        return;
    };
    if t.initial_delay_seconds.is_some() {
        probe.initial_delay_seconds = t.initial_delay_seconds;
    }
    if t.period_seconds.is_some() {
        probe.period_seconds = t.period_seconds;
    }
    if t.timeout_seconds.is_some() {
        probe.timeout_seconds = t.timeout_seconds;
    }
    if t.failure_threshold.is_some() {
        probe.failure_threshold = t.failure_threshold;
    }
}

/// `over` merged field by field (recursively through objects) over `base`: what `over` leaves
/// unset keeps the base's value, so an override that adds a capability keeps `drop: [ALL]`,
/// `runAsNonRoot` and the seccomp profile. Lists are replaced as a whole.
fn merged<T: Serialize + DeserializeOwned + Default>(base: Option<T>, over: &T) -> T {
    fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
        match (base, over) {
            (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
                for (k, v) in o {
                    match b.get_mut(k) {
                        Some(slot) if !v.is_null() => merge(slot, v),
                        None if !v.is_null() => {
                            b.insert(k.clone(), v.clone());
                        }
                        _ => {}
                    }
                }
            }
            (slot, v) => *slot = v.clone(),
        }
    }
    let mut value = serde_json::to_value(base.unwrap_or_default()).unwrap_or_default();
    if let Ok(o) = serde_json::to_value(over) {
        merge(&mut value, &o);
    }
    serde_json::from_value(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Capabilities, SecurityContext};

    use super::*;

    #[test]
    fn an_override_keeps_what_it_does_not_set() {
        let base = crate::resources::worker_container_security_context();
        let over = SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["IPC_LOCK".into()]),
                drop: None,
            }),
            ..Default::default()
        };
        let m = merged(Some(base), &over);
        let caps = m.capabilities.unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["IPC_LOCK".to_string()][..]));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(m.allow_privilege_escalation, Some(false));
        assert_eq!(m.run_as_non_root, Some(true));
        let off = SecurityContext {
            read_only_root_filesystem: Some(false),
            ..Default::default()
        };
        let m = merged(
            Some(crate::resources::worker_container_security_context()),
            &off,
        );
        assert_eq!(m.read_only_root_filesystem, Some(false));
        assert_eq!(m.allow_privilege_escalation, Some(false));
    }

    /// Every setting reaches the StatefulSet's pod template; the operator's labels, volumes and
    /// mounts stay; changing a setting changes the spec hash (the group restarts onto it).
    #[test]
    fn settings_reach_the_rendered_statefulset() {
        use std::collections::BTreeMap;

        use k8s_openapi::api::core::v1::{
            Affinity, LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement,
            NodeSelectorTerm, PodSecurityContext, Toleration, TopologySpreadConstraint,
        };
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

        use crate::crd::WorkerProbes;
        use crate::resources::tests::resolved;
        use crate::resources::{desired_spec_hash, selector_labels, statefulset};

        let plain = statefulset(&resolved(), &crate::crd::tests::sample_spec());
        let pod = plain.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let shm = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == SHM_VOLUME);
        let shm = shm.unwrap().empty_dir.as_ref().unwrap();
        assert_eq!(
            (shm.medium.as_deref(), shm.size_limit.as_ref()),
            (Some("Memory"), None)
        );
        assert!(
            pod.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == SHM_DIR)
        );

        let mut spec = crate::crd::tests::sample_spec();
        spec.worker.tolerations = Some(vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        spec.worker.node_selector = Some(BTreeMap::from([("gpu".into(), "h200".into())]));
        spec.worker.priority_class_name = Some("training".into());
        spec.worker.pod = WorkerPodSpec {
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "nvlink-domain".into(),
                                operator: "In".into(),
                                values: Some(vec!["a".into()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "kubernetes.io/hostname".into(),
                when_unsatisfiable: "DoNotSchedule".into(),
                ..Default::default()
            }]),
            scheduler_name: Some("volcano".into()),
            runtime_class_name: Some("nvidia".into()),
            image_pull_secrets: Some(vec![LocalObjectReference {
                name: "regcred".into(),
            }]),
            pod_labels: Some(BTreeMap::from([("team".into(), "ml".into())])),
            pod_annotations: Some(BTreeMap::from([(
                "scheduling.k8s.io/group-name".into(),
                "demo".into(),
            )])),
            volumes: Some(vec![Volume {
                name: "cache".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            volume_mounts: Some(vec![VolumeMount {
                name: "cache".into(),
                mount_path: "/cache".into(),
                ..Default::default()
            }]),
            shm_size: Some(Quantity("16Gi".into())),
            termination_grace_period_seconds: Some(120),
            probes: Some(WorkerProbes {
                startup: Some(ProbeTiming {
                    failure_threshold: Some(360),
                    ..Default::default()
                }),
                readiness: Some(ProbeTiming {
                    period_seconds: Some(2),
                    timeout_seconds: Some(5),
                    ..Default::default()
                }),
                liveness: None,
            }),
            security_context: Some(k8s_openapi::api::core::v1::SecurityContext {
                capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                    add: Some(vec!["IPC_LOCK".into()]),
                    drop: None,
                }),
                ..Default::default()
            }),
            pod_security_context: Some(PodSecurityContext {
                supplemental_groups: Some(vec![44]),
                ..Default::default()
            }),
        };
        spec.validate().unwrap();
        let sts = statefulset(&resolved(), &spec);
        let template = &sts.spec.as_ref().unwrap().template;
        let meta = template.metadata.as_ref().unwrap();
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "ml");
        for (k, v) in selector_labels("demo") {
            assert_eq!(labels[&k], v, "selector label {k} kept");
        }
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations["scheduling.k8s.io/group-name"], "demo");
        assert!(annotations.contains_key(crate::resources::SPEC_HASH_ANNOTATION));
        assert!(annotations.contains_key(crate::resources::GROUP_HASH_ANNOTATION));
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.affinity, spec.worker.pod.affinity);
        assert_eq!(
            pod.topology_spread_constraints,
            spec.worker.pod.topology_spread_constraints
        );
        assert_eq!(pod.scheduler_name.as_deref(), Some("volcano"));
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert_eq!(pod.tolerations, spec.worker.tolerations);
        assert_eq!(pod.node_selector, spec.worker.node_selector);
        assert_eq!(pod.priority_class_name.as_deref(), Some("training"));
        assert_eq!(pod.termination_grace_period_seconds, Some(120));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.supplemental_groups.as_deref(), Some(&[44][..]));
        assert_eq!(psc.run_as_non_root, Some(true), "the defaults stay");
        let volumes = pod.volumes.as_ref().unwrap();
        assert!(volumes.iter().any(|v| v.name == "cache"));
        assert!(volumes.iter().any(|v| v.name == "control"));
        let shm = volumes.iter().find(|v| v.name == SHM_VOLUME).unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().size_limit,
            Some(Quantity("16Gi".into()))
        );
        let c = &pod.containers[0];
        let mounts = c.volume_mounts.as_ref().unwrap();
        assert!(mounts.iter().any(|m| m.mount_path == "/cache"));
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == crate::resources::CONTROL_DIR)
        );
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(
            csc.capabilities.as_ref().unwrap().add.as_deref(),
            Some(&["IPC_LOCK".to_string()][..])
        );
        assert_eq!(
            csc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let startup = c.startup_probe.as_ref().unwrap();
        assert_eq!(
            (startup.failure_threshold, startup.period_seconds),
            (Some(360), Some(5))
        );
        let ready = c.readiness_probe.as_ref().unwrap();
        assert_eq!(
            (
                ready.period_seconds,
                ready.timeout_seconds,
                ready.failure_threshold
            ),
            (Some(2), Some(5), Some(3))
        );
        assert_eq!(
            c.liveness_probe,
            crate::resources::tests::worker_container(&plain).liveness_probe
        );

        // A template change: the spec hash moves, so the group restarts onto it.
        let base = desired_spec_hash(&sts);
        let mut changed = spec.clone();
        changed.worker.pod.scheduler_name = Some("default-scheduler".into());
        assert_ne!(base, desired_spec_hash(&statefulset(&resolved(), &changed)));
        let mut changed = spec;
        changed.worker.pod.termination_grace_period_seconds = Some(90);
        assert_ne!(base, desired_spec_hash(&statefulset(&resolved(), &changed)));
        // Unset settings leave the stored spec (and so the hash of existing groups) as it was.
        let json = serde_json::to_value(&crate::crd::tests::sample_spec().worker).unwrap();
        assert!(json.get("affinity").is_none() && json.get("probes").is_none());
    }
}
