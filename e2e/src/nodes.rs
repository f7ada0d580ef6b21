//! Fake GPU nodes: `Node` objects with `nvidia.com/gpu` capacity and a `Ready` condition,
//! kept healthy by renewing their `kube-node-lease` Lease and refreshing the node conditions
//! (what a kubelet does), so the node lifecycle controller neither taints nor evicts them.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// The extended resource name GPU requests use.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A node the agent registers and serves.
#[derive(Debug, Clone)]
pub struct FakeNode {
    pub name: String,
    /// `nvidia.com/gpu` capacity.
    pub gpus: u32,
    /// CPU capacity (a Kubernetes quantity).
    pub cpu: String,
    /// Memory capacity (a Kubernetes quantity).
    pub memory: String,
    /// Maximum pods on the node.
    pub max_pods: u32,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

impl FakeNode {
    /// A node with `gpus` GPUs, 64 CPUs, 512 GiB and the usual GPU-node labels.
    pub fn gpu(name: impl Into<String>, gpus: u32) -> Self {
        let name = name.into();
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), name.clone());
        labels.insert("kubernetes.io/os".to_string(), "linux".to_string());
        labels.insert("kubernetes.io/arch".to_string(), "amd64".to_string());
        labels.insert("nvidia.com/gpu.present".to_string(), "true".to_string());
        labels.insert("moe-e2e/fake-node".to_string(), "true".to_string());
        Self {
            name,
            gpus,
            cpu: "64".to_string(),
            memory: "512Gi".to_string(),
            max_pods: 110,
            labels,
            taints: Vec::new(),
        }
    }

    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn taint(mut self, t: Taint) -> Self {
        self.taints.push(t);
        self
    }

    fn resources(&self) -> serde_json::Value {
        json!({
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": self.max_pods.to_string(),
            "ephemeral-storage": "1Ti",
            GPU_RESOURCE: self.gpus.to_string(),
        })
    }

    fn status(&self, now: &str) -> serde_json::Value {
        let cond = |t: &str, s: &str, reason: &str, msg: &str| {
            json!({"type": t, "status": s, "reason": reason, "message": msg,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        json!({
            "capacity": self.resources(),
            "allocatable": self.resources(),
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "moe-e2e fake node"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "moe-e2e fake node"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "moe-e2e fake node"),
                cond("Ready", "True", "KubeletReady", "moe-e2e agent is serving this node"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": format!("moe-e2e-{}", self.name),
                "systemUUID": format!("moe-e2e-{}", self.name),
                "bootID": format!("moe-e2e-{}", self.name),
                "kernelVersion": "moe-e2e",
                "osImage": "moe-e2e fake node",
                "containerRuntimeVersion": "moe-e2e-agent://0.1",
                "kubeletVersion": "v1.35.4",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        })
    }

    /// The Node object (with status) that [`register`] creates.
    pub fn to_node(&self) -> Result<Node> {
        let now = now_rfc3339();
        let v = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"taints": self.taints},
            "status": self.status(&now),
        });
        Ok(serde_json::from_value(v)?)
    }
}

pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::TimestampRound::new().smallest(jiff::Unit::Second))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

/// Creates (or refreshes) the Node object, its status and its Lease.
pub async fn register(client: &Client, n: &FakeNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = n.to_node()?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = json!({"metadata": {"labels": n.labels}, "spec": {"taints": n.taints}});
            nodes
                .patch(&n.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("updating node {}", n.name))?;
        }
        Err(e) => return Err(e).with_context(|| format!("creating node {}", n.name)),
    }
    heartbeat(client, n).await
}

/// Renews the node's Lease and refreshes its status (conditions, capacity).
pub async fn heartbeat(client: &Client, n: &FakeNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = now_rfc3339();
    let status = json!({"status": n.status(&now)});
    nodes
        .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("updating status of node {}", n.name))?;

    let uid = nodes.get(&n.name).await?.metadata.uid.unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": n.name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": n.name, "uid": uid}],
        },
        "spec": {"holderIdentity": n.name, "leaseDurationSeconds": 40},
    }))?;
    if let Some(spec) = lease.spec.as_mut() {
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    }
    leases
        .patch(
            &n.name,
            &PatchParams::apply("moe-e2e-agent").force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| format!("renewing lease of node {}", n.name))?;
    Ok(())
}
