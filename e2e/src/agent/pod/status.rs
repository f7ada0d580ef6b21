//! A pod's status as the agent reports it: each container's state (waiting, running,
//! terminated, with restarts), the pod's conditions and their transition times, and the
//! status patch sent to the API server.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::{PodCtx, lock};
use crate::nodes::now_rfc3339;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

impl CState {
    fn to_json(&self) -> Value {
        match self {
            CState::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            CState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            CState::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => json!({"terminated": {
                "exitCode": exit_code, "signal": signal, "reason": reason, "message": message,
                "startedAt": started_at, "finishedAt": finished_at,
            }}),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct CStatus {
    pub(super) name: String,
    pub(super) image: String,
    pub(super) state: CState,
    pub(super) last: Option<CState>,
    pub(super) restart_count: i32,
    pub(super) ready: bool,
    pub(super) started: bool,
    /// Terminated for good (no more restarts).
    pub(super) done: bool,
}

impl CStatus {
    pub(super) fn new(c: &Container) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
            done: false,
        }
    }

    fn to_json(&self, uid: &str) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("moe-e2e-agent://{}", self.image),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state.to_json(),
            "lastState": self.last.as_ref().map(CState::to_json).unwrap_or_else(|| json!({})),
        });
        if !matches!(self.state, CState::Waiting { .. }) || self.restart_count > 0 {
            v["containerID"] = json!(format!(
                "moe-e2e-agent://{uid}/{}/{}",
                self.name, self.restart_count
            ));
        }
        v
    }

    pub(super) fn exit_code(&self) -> Option<i32> {
        match &self.state {
            CState::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(super) struct RunState {
    pub(super) init: Vec<CStatus>,
    pub(super) app: Vec<CStatus>,
    pub(super) sandbox_ready: bool,
    pub(super) initialized: bool,
    pub(super) init_failed: bool,
    pub(super) start_time: String,
    /// condition type -> (status, lastTransitionTime)
    pub(super) transitions: HashMap<String, (bool, String)>,
}

impl PodCtx {
    fn build_status(&self) -> Value {
        let mut run = lock(&self.run);
        let all_ready = run.initialized && !run.app.is_empty() && run.app.iter().all(|s| s.ready);
        let phase = if run.init_failed {
            "Failed"
        } else if !run.initialized {
            "Pending"
        } else if run.app.iter().all(|s| s.done) {
            if run.app.iter().all(|s| s.exit_code() == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if run.app.iter().any(|s| s.started) {
            "Running"
        } else {
            "Pending"
        };
        let now = now_rfc3339();
        let conds = [
            ("PodReadyToStartContainers", run.sandbox_ready),
            ("Initialized", run.initialized),
            ("ContainersReady", all_ready),
            ("Ready", all_ready),
        ];
        let mut conditions = Vec::new();
        for (t, ok) in conds {
            let entry = run
                .transitions
                .entry(t.to_string())
                .or_insert_with(|| (ok, now.clone()));
            if entry.0 != ok {
                *entry = (ok, now.clone());
            }
            let mut c = json!({
                "type": t,
                "status": if ok { "True" } else { "False" },
                "lastTransitionTime": entry.1,
                "lastProbeTime": null,
            });
            if !ok && (t == "Ready" || t == "ContainersReady") {
                let not_ready: Vec<&str> = run
                    .app
                    .iter()
                    .filter(|s| !s.ready)
                    .map(|s| s.name.as_str())
                    .collect();
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
            conditions.push(c);
        }
        let mut status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": run.start_time,
            "conditions": conditions,
            "containerStatuses": run.app.iter().map(|s| s.to_json(&self.uid)).collect::<Vec<_>>(),
        });
        if !run.init.is_empty() {
            status["initContainerStatuses"] = json!(
                run.init
                    .iter()
                    .map(|s| s.to_json(&self.uid))
                    .collect::<Vec<_>>()
            );
        }
        status
    }

    /// Sends this agent's view of the pod again when the server's Ready condition disagrees with
    /// the last one sent. A kubelet owns that condition, but the node lifecycle controller also
    /// sets it to False when a node's heartbeat is late; without this, a pod stays not ready
    /// after its node is Ready again.
    pub(super) async fn reassert_readiness(&self, server: &Pod) {
        let on_server = server
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        let diverged = {
            let mut last = self.last_sent.lock().await;
            let sent = last
                .as_ref()
                .and_then(|v| v["conditions"].as_array())
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str())
                .map(str::to_string);
            let diverged = sent.is_some() && on_server.is_some() && sent != on_server;
            if diverged {
                *last = None;
            }
            diverged
        };
        if diverged {
            tracing::info!(pod = %self.key, "agent: Ready condition changed by someone else; reporting again");
            self.report().await;
        }
    }

    /// Patches the pod status if it changed since the last successful write.
    pub(super) async fn report(&self) {
        let status = self.build_status();
        let mut last = self.last_sent.lock().await;
        if last.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.ns);
        let patch = json!({"status": status});
        match api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => *last = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => *last = Some(status),
            Err(e) => {
                tracing::warn!(pod = %self.key, "agent: status update failed: {e}");
                *last = None;
            }
        }
    }
}
