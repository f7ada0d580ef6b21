//! Problems the worker pods show by themselves (not scheduled, image or configuration errors,
//! a worker that refused its configuration, crash loops), turned into `Degraded` reasons with
//! the cause the scheduler, the kubelet or the worker gave.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use crate::conditions::Problem;

/// Whether the scheduler could not place the pod (`PodScheduled=False`, `Unschedulable`).
pub fn unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

/// Problems visible on pods: unschedulable, crash looping.
pub fn pod_problems(pods: &[Pod]) -> Vec<Problem> {
    let mut out = Vec::new();
    for pod in pods {
        let Some(status) = &pod.status else { continue };
        if let Some(c) = status.conditions.as_ref().and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        }) && c.reason.as_deref() == Some("Unschedulable")
        {
            out.push(Problem::new(
                "Unschedulable",
                format!(
                    "pod {} cannot be scheduled: {}",
                    pod.name_any(),
                    c.message.clone().unwrap_or_default()
                ),
            ));
            break;
        }
        if let Some(p) = status
            .container_statuses
            .iter()
            .flatten()
            .find_map(container_problem)
        {
            out.push(Problem::new(
                &p.reason,
                format!("pod {}: {}", pod.name_any(), p.message),
            ));
            break;
        }
        let crash = status.container_statuses.iter().flatten().find(|cs| {
            cs.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff")
        });
        if let Some(cs) = crash {
            out.push(Problem::new(
                "WorkerCrashLoop",
                format!(
                    "pod {} is crash looping ({} restarts)",
                    pod.name_any(),
                    cs.restart_count
                ),
            ));
            break;
        }
    }
    out
}

/// A problem a container status shows by itself, with the cause the kubelet or the worker
/// gave; `None` when the container is fine or merely restarting.
struct ContainerProblem {
    reason: String,
    message: String,
}

/// Exit code with which a worker refuses its configuration before joining the group (bad
/// flags, a checkpoint that disagrees with spec.model): restarting cannot help.
const WORKER_CONFIG_EXIT: i32 = 2;

/// Reasons a worker may put first in its termination message (`Reason: message`); anything
/// else from an exit code 2 is reported as `WorkerConfigInvalid`.
const WORKER_REASONS: [&str; 2] = ["ModelMismatch", "CheckpointInvalid"];

fn container_problem(cs: &ContainerStatus) -> Option<ContainerProblem> {
    // The kubelet cannot start the container: the image or its configuration is wrong.
    if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref())
        && let Some(reason) = w.reason.as_deref()
        && matches!(
            reason,
            "ErrImagePull"
                | "ImagePullBackOff"
                | "InvalidImageName"
                | "CreateContainerConfigError"
                | "CreateContainerError"
        )
    {
        return Some(ContainerProblem {
            reason: reason.to_string(),
            message: w
                .message
                .clone()
                .unwrap_or_else(|| format!("container {} is waiting: {reason}", cs.name)),
        });
    }
    // The worker ended refusing its configuration: say what it said.
    let terminated = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()))?;
    if terminated.exit_code != WORKER_CONFIG_EXIT {
        return None;
    }
    let text = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or("the worker refused its configuration (exit code 2); see its log");
    let (reason, message) = match text.split_once(": ") {
        Some((r, m)) if WORKER_REASONS.contains(&r) => (r.to_string(), m.to_string()),
        _ => ("WorkerConfigInvalid".to_string(), text.to_string()),
    };
    Some(ContainerProblem { reason, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodStatus,
    };

    fn pod_with(cs: ContainerStatus) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("demo-1".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![cs]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn terminated(exit_code: i32, message: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            name: "worker".into(),
            restart_count: 3,
            last_state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    message: message.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_worker_refusing_the_checkpoint_reports_its_reason_and_message() {
        let msg = "ModelMismatch: spec.model.numExperts is 64 but the checkpoint has 60";
        let p = pod_problems(&[pod_with(terminated(2, Some(msg)))]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].reason, "ModelMismatch");
        assert_eq!(
            p[0].message,
            "pod demo-1: spec.model.numExperts is 64 but the checkpoint has 60"
        );
    }

    #[test]
    fn an_unknown_reason_or_no_message_is_a_config_error() {
        let p = pod_problems(&[pod_with(terminated(2, Some("error: bad --top-k")))]);
        assert_eq!(p[0].reason, "WorkerConfigInvalid");
        assert!(p[0].message.contains("bad --top-k"));
        let p = pod_problems(&[pod_with(terminated(2, None))]);
        assert_eq!(p[0].reason, "WorkerConfigInvalid");
    }

    #[test]
    fn other_exit_codes_are_crash_loops() {
        let p = pod_problems(&[pod_with(terminated(1, Some("boom")))]);
        assert_eq!(p[0].reason, "WorkerCrashLoop");
    }

    #[test]
    fn image_and_config_errors_carry_the_kubelets_message() {
        let cs = ContainerStatus {
            name: "worker".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("Back-off pulling image \"nope:1\"".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = pod_problems(&[pod_with(cs)]);
        assert_eq!(p[0].reason, "ImagePullBackOff");
        assert_eq!(
            p[0].message,
            "pod demo-1: Back-off pulling image \"nope:1\""
        );
    }
}
