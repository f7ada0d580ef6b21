//! Security settings of the worker pods: what the `restricted` Pod Security Standard requires
//! (non-root, a numeric user, RuntimeDefault seccomp, no privilege escalation, every capability
//! dropped) plus a read-only root filesystem. The only place these defaults live.

use k8s_openapi::api::core::v1::{
    Capabilities, EmptyDirVolumeSource, PodSecurityContext, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};

/// User and group of the worker process: the non-root user of the project's images (see
/// `images/`). Also the pods' `fsGroup`, so the control Secret (mode 0440) is readable.
pub const WORKER_UID: i64 = 65532;
/// Writable scratch space (an emptyDir): everything else on the root filesystem is read-only.
pub const SCRATCH_DIR: &str = "/tmp";
const SCRATCH_VOLUME: &str = "tmp";

/// Pod-level security context of a worker pod.
pub fn worker_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        fs_group: Some(WORKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level security context of the worker container.
pub fn worker_container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The scratch volume (an emptyDir) and its mount on [`SCRATCH_DIR`].
pub fn scratch_volume() -> (Volume, VolumeMount) {
    (
        Volume {
            name: SCRATCH_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        VolumeMount {
            name: SCRATCH_VOLUME.into(),
            mount_path: SCRATCH_DIR.into(),
            ..Default::default()
        },
    )
}
