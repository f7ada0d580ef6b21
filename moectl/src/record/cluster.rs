//! A MoEDeployment's ranks found from its pods and reached through the API server's
//! port-forward, as `kubectl port-forward` reaches them: with the kubeconfig's credentials and
//! RBAC, from wherever the API server answers. The pods' IPs need not route from here, and the
//! deployment's NetworkPolicy (which opens the workers' control port to the operator only) does
//! not stand in the way: the kubelet connects to the port inside the pod.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Portforwarder};
use kube::config::KubeConfigOptions;
use kube::{Client, Config, ResourceExt};

use moe_api::pods;

use super::REQUEST_TIMEOUT;
use super::answer::{Fetched, Poll};

/// The MoEDeployment resource (crds/moedeployment.yaml).
const CRD_GROUP: &str = "moe-operator.github.io";
const CRD_VERSION: &str = "v1alpha1";

/// What a recording keeps of the MoEDeployment ([`ClusterRanks::settings`]).
pub struct Settings {
    /// `namespace/name`.
    pub deployment: String,
    /// `spec.eplb`.
    pub eplb: serde_json::Value,
    /// The bytes the operator counts per moved expert (`spec.model`'s hidden and
    /// intermediate sizes); `None` where they do not read.
    pub expert_bytes: Option<u64>,
}

/// Where the deployment is and who asks.
pub struct Target<'a> {
    pub deployment: &'a str,
    pub namespace: Option<&'a str>,
    pub context: Option<&'a str>,
}

/// One rank: the pod serving it and the port of its worker API there.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRank {
    pub rank: usize,
    pub pod: String,
    pub port: u16,
}

/// The deployment's ranks, each with its own port-forward, opened at its first request and
/// again after a failure (a pod restarted, the API server dropped the stream).
pub struct ClusterRanks {
    /// `namespace/name` of the MoEDeployment.
    deployment: String,
    deployments: Api<DynamicObject>,
    pods: Api<Pod>,
    ranks: Vec<PodRank>,
    labels: Vec<String>,
    connections: Vec<Option<Connection>>,
}

/// An HTTP/1 connection to one rank over a port-forward stream.
struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    forwarder: Portforwarder,
    /// What the kubelet reports when the port cannot be reached (nothing listens, the pod is
    /// gone): the reason a request over the stream failed.
    error: Option<Pin<Box<dyn Future<Output = Option<String>> + Send>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

impl ClusterRanks {
    /// Finds the deployment's worker pods in the kubeconfig's cluster (the current context
    /// unless `context` names one; its namespace unless `namespace` does).
    pub async fn discover(target: &Target<'_>) -> Result<Self, String> {
        // Also keeps the label selector below one equality per label.
        let name = target.deployment;
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(format!(
                "--deployment {name:?} is not a MoEDeployment name (lower-case letters, digits, \
                 '-' and '.', at most 63)"
            ));
        }
        let config = match target.context {
            Some(context) => Config::from_kubeconfig(&KubeConfigOptions {
                context: Some(context.to_string()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("--context {context}: {e}"))?,
            None => Config::infer().await.map_err(|e| {
                format!("cannot find a cluster to ask (kubeconfig or in-cluster): {e}")
            })?,
        };
        let namespace = target
            .namespace
            .map_or_else(|| config.default_namespace.clone(), str::to_string);
        let client =
            Client::try_from(config).map_err(|e| format!("cannot reach the cluster: {e}"))?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(CRD_GROUP, CRD_VERSION, "MoEDeployment"),
            "moedeployments",
        );
        let deployments: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &resource);
        let selector = format!(
            "{}={},{}={}",
            pods::NAME_LABEL,
            pods::WORKER_NAME,
            pods::INSTANCE_LABEL,
            target.deployment
        );
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                format!(
                    "cannot list the pods of MoEDeployment {} in namespace {namespace}: {e}",
                    target.deployment
                )
            })?;
        let ranks = pod_ranks(&listed.items);
        if ranks.is_empty() {
            // No pods: say whether the deployment is missing or has none yet.
            return Err(match deployments.get(name).await {
                Err(kube::Error::Api(s)) if s.is_not_found() => format!(
                    "there is no MoEDeployment {name} in namespace {namespace}: `kubectl get \
                     moedeployments -n {namespace}` lists those there; give --namespace or \
                     --context if it is elsewhere"
                ),
                Ok(o) => format!(
                    "MoEDeployment {namespace}/{name} has no worker pods (labels {selector}; \
                     phase {}): record once `kubectl get moedeployment {name} -n {namespace}` \
                     shows it Ready",
                    o.data["status"]["phase"].as_str().unwrap_or("not reported")
                ),
                Err(e) => format!(
                    "MoEDeployment {namespace}/{name} has no worker pods (labels {selector}), \
                     and reading it failed: {e}"
                ),
            });
        }
        let labels = ranks
            .iter()
            .map(|r| format!("{namespace}/{}:{}", r.pod, r.port))
            .collect();
        let connections = ranks.iter().map(|_| None).collect();
        Ok(Self {
            deployment: format!("{namespace}/{name}"),
            deployments,
            pods,
            ranks,
            labels,
            connections,
        })
    }

    /// The MoEDeployment's settings a replay follows, as the API server returns them (the
    /// CRD's defaults filled in).
    pub async fn settings(&self) -> Result<Settings, String> {
        let name = self.deployment.rsplit('/').next().unwrap_or_default();
        let object = tokio::time::timeout(REQUEST_TIMEOUT, self.deployments.get(name))
            .await
            .map_err(|_| format!("no answer in {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| format!("GET MoEDeployment {}: {e}", self.deployment))?;
        let spec = &object.data["spec"];
        let eplb = spec["eplb"].clone();
        if eplb.is_null() {
            return Err(format!(
                "MoEDeployment {} has no spec.eplb",
                self.deployment
            ));
        }
        let dim = |key: &str| {
            spec["model"][key]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
        };
        Ok(Settings {
            deployment: self.deployment.clone(),
            eplb,
            expert_bytes: dim("hidden")
                .zip(dim("intermediate"))
                .map(|(h, i)| moe_api::quantity::expert_bytes(h, i)),
        })
    }

    /// `namespace/pod:port` of each rank, in rank order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// `GET path` (`/v1/...`) from rank `i`'s worker API.
    pub async fn get(&mut self, i: usize, path: &str) -> Result<Fetched, Poll> {
        let (pods, rank, label) = (&self.pods, &self.ranks[i], &self.labels[i]);
        fetch(pods, rank, label, &mut self.connections[i], path).await
    }

    /// `GET path` from every rank, in [`ClusterRanks::labels`] order, at most `concurrent` at
    /// once (each over its own port-forward stream).
    pub async fn get_all(&mut self, path: &str, concurrent: usize) -> Vec<Result<Fetched, Poll>> {
        let (pods, ranks, labels) = (&self.pods, &self.ranks, &self.labels);
        futures::stream::iter(self.connections.iter_mut().enumerate())
            .map(|(i, connection)| fetch(pods, &ranks[i], &labels[i], connection, path))
            .buffered(concurrent.max(1))
            .collect()
            .await
    }
}

/// `GET path` from one rank over its connection (`connection`; opened first where there is
/// none or it closed). A failed request drops the connection, and the kubelet's reason, where
/// it gave one, is in the message.
async fn fetch(
    pods: &Api<Pod>,
    rank: &PodRank,
    label: &str,
    connection: &mut Option<Connection>,
    path: &str,
) -> Result<Fetched, Poll> {
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, request(pods, rank, connection, path)).await;
    let failure = match answer {
        Ok(Ok(fetched)) => return Ok(fetched),
        Ok(Err(Poll::Stop(m))) => return Err(Poll::Stop(format!("GET {label}{path}: {m}"))),
        Ok(Err(Poll::Retry(m))) => m,
        Err(_) => format!("no answer in {} s", REQUEST_TIMEOUT.as_secs()),
    };
    // The stream may be dead: the next request opens another. The kubelet may have said why
    // on the port-forward's error channel.
    let reason = match connection.take() {
        Some(mut c) => kubelet_error(&mut c).await,
        None => None,
    };
    Err(Poll::Retry(match reason {
        Some(r) if r.contains("connection refused") => format!(
            "GET {label}{path}: {failure}; the kubelet: {r} (nothing listens on the pod's \
             loopback: a worker image from before --listen-addr listens on the pod IP only; \
             upgrade spec.worker.image, or give --worker http://POD_IP:PORT from where the pod \
             IPs route)"
        ),
        Some(r) => format!("GET {label}{path}: {failure}; the kubelet: {r}"),
        None => format!("GET {label}{path}: {failure}"),
    }))
}

async fn request(
    pods: &Api<Pod>,
    rank: &PodRank,
    connection: &mut Option<Connection>,
    path: &str,
) -> Result<Fetched, Poll> {
    if connection.as_ref().is_none_or(|c| c.sender.is_closed()) {
        *connection = Some(connect(pods, &rank.pod, rank.port).await?);
    }
    let Some(c) = connection.as_mut() else {
        return Err(Poll::Retry("no connection".into()));
    };
    send(c, path).await.map_err(Poll::Retry)
}

/// One request over an open connection.
async fn send(c: &mut Connection, path: &str) -> Result<Fetched, String> {
    c.sender.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = c
        .sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Fetched { status, body })
}

/// Opens a port-forward to `pod`'s `port` and an HTTP/1 connection over it. A refusal by the
/// API server's authorization ends the recording: it will not change by waiting.
async fn connect(pods: &Api<Pod>, pod: &str, port: u16) -> Result<Connection, Poll> {
    let mut forwarder = pods.portforward(pod, &[port]).await.map_err(|e| match e {
        kube::Error::Api(s) if s.is_forbidden() => Poll::Stop(format!(
            "port-forward to pod {pod} forbidden ({}): the kubeconfig's user needs `get` and \
             `create` on pods/portforward in the deployment's namespace",
            s.message
        )),
        e => Poll::Retry(format!("port-forward to pod {pod}: {e}")),
    })?;
    let error = forwarder
        .take_error(port)
        .map(|f| Box::pin(f) as Pin<Box<dyn Future<Output = Option<String>> + Send>>);
    let stream = forwarder.take_stream(port).ok_or_else(|| {
        Poll::Retry(format!(
            "port-forward to pod {pod} opened no stream for port {port}"
        ))
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Poll::Retry(format!("HTTP over the port-forward to pod {pod}: {e}")))?;
    // Drives the connection; it ends when the stream does (the sender then reports closed).
    tokio::spawn(connection);
    Ok(Connection {
        sender,
        forwarder,
        error,
    })
}

/// The kubelet's reason a port-forward failed, if it gave one promptly.
async fn kubelet_error(c: &mut Connection) -> Option<String> {
    let error = c.error.take()?;
    tokio::time::timeout(Duration::from_millis(500), error)
        .await
        .ok()
        .flatten()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
}

/// Every rank the worker pods serve: pod `p`'s port named `http` is rank `p * n`, `http-i`
/// rank `p * n + i`, where `n` is the number of such ports a pod has (the operator gives each
/// pod the same). Pods without an ordinal or those ports are left out; the group check then
/// names the ranks missing.
pub fn pod_ranks(pods: &[Pod]) -> Vec<PodRank> {
    let mut out = Vec::new();
    for pod in pods {
        let Some(index) = pod_index(pod) else {
            continue;
        };
        let ports = worker_ports(pod);
        let per_pod = ports.len();
        for (local, port) in ports {
            out.push(PodRank {
                rank: index * per_pod + local,
                pod: pod.name_any(),
                port,
            });
        }
    }
    out.sort_by_key(|r| r.rank);
    out
}

fn pod_index(pod: &Pod) -> Option<usize> {
    let label = pod.labels().get(pods::POD_INDEX_LABEL);
    pods::ordinal(label.map(String::as_str), &pod.name_any())
}

/// `(local rank, port)` of the worker container's API ports.
fn worker_ports(pod: &Pod) -> Vec<(usize, u16)> {
    let Some(container) = pod.spec.as_ref().and_then(|s| {
        s.containers
            .iter()
            .find(|c| c.name == pods::WORKER_CONTAINER)
    }) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, u16)> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let local = pods::local_rank_of_port(p.name.as_deref()?)?;
            Some((local, u16::try_from(p.container_port).ok()?))
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, index: Option<&str>, ports: &[(&str, i32)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": index.map(|i| serde_json::json!({ pods::POD_INDEX_LABEL: i })),
            },
            "spec": {"containers": [
                {"name": "sidecar", "ports": [{"name": "http", "containerPort": 9999}]},
                {"name": pods::WORKER_CONTAINER, "ports": ports.iter()
                    .map(|(n, p)| serde_json::json!({"name": n, "containerPort": p}))
                    .collect::<Vec<_>>()},
            ]},
        }))
        .unwrap()
    }

    #[test]
    fn ranks_follow_the_ordinal_and_the_http_ports() {
        // Two ranks per pod (http, http-1), the comm ports and the sidecar's ignored; the
        // ordinal from the label, or from the name where the label is missing.
        let ports = [
            ("http", 8080),
            ("comm", 29500),
            ("http-1", 8081),
            ("comm-1", 29501),
        ];
        let pods = [
            pod("demo-1", Some("1"), &ports),
            pod("demo-0", None, &ports),
            pod("stray", None, &ports),
        ];
        let rank = |rank, pod: &str, port| PodRank {
            rank,
            pod: pod.into(),
            port,
        };
        assert_eq!(
            pod_ranks(&pods),
            vec![
                rank(0, "demo-0", 8080),
                rank(1, "demo-0", 8081),
                rank(2, "demo-1", 8080),
                rank(3, "demo-1", 8081),
            ]
        );
        // One rank per pod, a custom port.
        assert_eq!(
            pod_ranks(&[pod("x-3", None, &[("http", 9000)])]),
            vec![rank(3, "x-3", 9000)]
        );
        // A pod without the worker's ports serves no rank.
        assert_eq!(pod_ranks(&[pod("x-0", None, &[("comm", 1)])]), vec![]);
    }
}
