//! Test doubles: an in-memory Kubernetes API server behind tower-test's mock service, and a
//! scripted worker group. Fakes for the tests only, not a model of everything the API server
//! does.

#![allow(dead_code)]

pub mod ssa;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use moe_api::{LoadReport, RemapMode, RemapProgress, RemapRequest, RemapState, WorkerStatus};
use moe_operator::workers::{Endpoint, WorkerApi, WorkerError};
use serde_json::{Value, json};

/// (HTTP code, API reason, message) of a refused request.
pub type Refusal = (u16, String, String);

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// A tiny API server (a test fake): objects by path, lists by collection with label selectors,
/// server-side apply with field managers and conflicts (see [`ssa`]), merge patch, create (409
/// when it exists), replace, delete, the status subresource (a patch replaces `status`), and
/// `resourceVersion` preconditions (a write carrying a stale one is a 409).
#[derive(Clone, Default)]
pub struct FakeApi {
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    pub log: Arc<Mutex<Vec<Seen>>>,
    rv: Arc<Mutex<u64>>,
    /// While set, requests are never answered (a hung API server).
    pub hang: Arc<std::sync::atomic::AtomicBool>,
    /// Writes by someone else, each made right after the `n`th GET of its path from now
    /// (1: the next one): a concurrent writer between a read and the write that follows it.
    after_get: Arc<Mutex<Vec<AfterGet>>>,
    /// Paths whose PATCH is refused with (code, reason, message), as an API server's RBAC or
    /// validation would.
    pub refuse: Arc<Mutex<BTreeMap<String, Refusal>>>,
    /// The chart's RBAC for Secrets: reading (get, list, watch) any Secret but these paths is
    /// refused with 403, as for the operator's ServiceAccount (helm/.../rbac.yaml).
    pub readable_secrets: Arc<Mutex<Vec<String>>>,
}

struct AfterGet {
    path: String,
    gets_left: usize,
    manager: String,
    object: Value,
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .replace('+', " ")
        })
    })
}

/// Collections whose paths end in a plural resource name (no object name after them).
fn is_collection(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}/{plural} or /apis/{g}/{v}/namespaces/{ns}/{plural}
    let n = parts.len();
    n >= 2
        && parts[n - 2] != "namespaces"
        && parts.get(n.wrapping_sub(3)) == Some(&"namespaces")
        && !last.is_empty()
}

impl FakeApi {
    pub fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let resp = me.handle(req).await;
                send.send_response(resp);
            }
        });
        Client::new(svc, "default")
    }

    /// Stores `obj` as it is (fields it has no `managedFields` for belong to no manager).
    pub fn put(&self, path: &str, obj: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), obj);
    }

    /// An update of `path` by `manager` (as `kubectl edit` or another controller would make
    /// it): `obj` replaces the object, `manager` owns what it changed.
    pub fn update_as(&self, path: &str, manager: &str, obj: Value) {
        let mut objects = self.objects.lock().unwrap();
        let mut new = ssa::update(objects.get(path), obj, manager);
        new["metadata"]["resourceVersion"] = Value::String(self.next_rv());
        objects.insert(path.to_string(), new);
    }

    /// After the `nth` GET of `path` from now (1: the next one) is answered, `manager`
    /// replaces the object with `obj` (a new resourceVersion): someone else's write between
    /// a read and the write that follows it.
    pub fn update_after_get(&self, path: &str, nth: usize, manager: &str, obj: Value) {
        self.after_get.lock().unwrap().push(AfterGet {
            path: path.to_string(),
            gets_left: nth,
            manager: manager.to_string(),
            object: obj,
        });
    }

    /// The fields `manager` owns in the object at `path`, as `.metadata.labels.app` paths.
    pub fn owned_by(&self, path: &str, manager: &str) -> Vec<String> {
        let Some(obj) = self.get(path) else {
            return Vec::new();
        };
        ssa::managers(&obj)
            .into_iter()
            .filter(|m| m.manager == manager)
            .flat_map(|m| m.fields)
            .map(|f| ssa::dotted(&f))
            .collect()
    }

    /// Runs the writes registered with [`Self::update_after_get`] that are due after this GET.
    fn after_get(&self, path: &str) {
        let due: Vec<AfterGet> = {
            let mut pending = self.after_get.lock().unwrap();
            for a in pending.iter_mut().filter(|a| a.path == path) {
                a.gets_left -= 1;
            }
            let (due, rest) = pending.drain(..).partition(|a| a.gets_left == 0);
            *pending = rest;
            due
        };
        for a in due {
            self.update_as(&a.path, &a.manager, a.object);
        }
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    pub fn remove(&self, path: &str) {
        self.objects.lock().unwrap().remove(path);
    }

    pub fn count(&self, method: Method, path_contains: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains(path_contains))
            .count()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    fn next_rv(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    fn normalize_secret(path: &str, obj: &mut Value) {
        if !path.contains("/secrets") {
            return;
        }
        if let Some(sd) = obj
            .get("stringData")
            .cloned()
            .and_then(|v| v.as_object().cloned())
        {
            let data = obj
                .as_object_mut()
                .unwrap()
                .entry("data")
                .or_insert_with(|| json!({}));
            for (k, v) in sd {
                let enc =
                    base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
                data[k] = Value::String(enc);
            }
            obj.as_object_mut().unwrap().remove("stringData");
        }
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let manager = query_param(req.uri().query().unwrap_or(""), "fieldManager")
            .unwrap_or_else(|| "unknown".into());
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        self.log.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        let (path, subresource) = match path.strip_suffix("/status") {
            Some(p) if p.contains("/moedeployments/") => (p.to_string(), true),
            _ => (path, false),
        };
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            return std::future::pending().await;
        }
        if method == Method::GET
            && path.contains("/secrets")
            && !self.readable_secrets.lock().unwrap().contains(&path)
        {
            return status(
                403,
                "Forbidden",
                &format!("secrets are forbidden: the operator may not read {path}"),
            );
        }
        if method == Method::PATCH
            && let Some((code, reason, message)) = self.refuse.lock().unwrap().get(&path).cloned()
        {
            return status(code, &reason, &message);
        }
        if method == Method::GET && !is_collection(&path) {
            let answer = match self.get(&path) {
                Some(v) => ok(StatusCode::OK, &v),
                None => status(404, "NotFound", &format!("{path} not found")),
            };
            self.after_get(&path);
            return answer;
        }
        let mut objects = self.objects.lock().unwrap();
        // Optimistic concurrency as the API server does it: a write (other than to status)
        // that carries a resourceVersion other than the stored one is a 409.
        if matches!(method, Method::PATCH | Method::PUT)
            && !subresource
            && let Some(sent) = body["metadata"]["resourceVersion"].as_str()
            && objects
                .get(&path)
                .and_then(|o| o["metadata"]["resourceVersion"].as_str())
                .is_some_and(|stored| stored != sent)
        {
            return status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {path}: the object has been modified; please apply your changes to the latest version and try again"
                ),
            );
        }
        match method {
            Method::GET if is_collection(&path) => {
                let selector = query_param(&query, "labelSelector").unwrap_or_default();
                let prefix = format!("{path}/");
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .filter(|v| labels_match(v, &selector))
                    .collect();
                ok(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            Method::PATCH => {
                let rv = self.next_rv();
                if subresource {
                    let Some(obj) = objects.get_mut(&path) else {
                        return status(404, "NotFound", "no such object");
                    };
                    obj["status"] = body["status"].clone();
                    obj["metadata"]["resourceVersion"] = Value::String(rv);
                    return ok(StatusCode::OK, obj);
                }
                let live = objects.get(&path);
                let written = if content_type.starts_with("application/apply-patch") {
                    let mut applied = body.clone();
                    Self::normalize_secret(&path, &mut applied);
                    let force = query_param(&query, "force").as_deref() == Some("true");
                    match ssa::apply(live, &applied, &manager, force) {
                        Ok(new) => new,
                        Err(conflicts) => {
                            return status(409, "Conflict", &ssa::conflict_message(&conflicts));
                        }
                    }
                } else {
                    // A merge patch (the only other kind the operator sends: events).
                    let Some(live) = live else {
                        return status(404, "NotFound", &format!("{path} not found"));
                    };
                    let mut new = live.clone();
                    ssa::merge_patch(&mut new, &body);
                    ssa::update(Some(live), new, &manager)
                };
                let mut new = written;
                if new["metadata"]["uid"].as_str().is_none() {
                    new["metadata"]["uid"] = Value::String(format!("uid-{rv}"));
                }
                new["metadata"]["resourceVersion"] = Value::String(rv);
                objects.insert(path, new.clone());
                ok(StatusCode::OK, &new)
            }
            Method::POST => {
                let Some(name) = body["metadata"]["name"].as_str() else {
                    return status(422, "Invalid", "no name");
                };
                let key = format!("{path}/{name}");
                if objects.contains_key(&key) {
                    return status(409, "AlreadyExists", "exists");
                }
                let mut new = body.clone();
                Self::normalize_secret(&key, &mut new);
                let mut new = ssa::update(None, new, &manager);
                let rv = self.next_rv();
                new["metadata"]["resourceVersion"] = Value::String(rv.clone());
                new["metadata"]["uid"] = Value::String(format!("uid-{rv}"));
                objects.insert(key, new.clone());
                ok(StatusCode::CREATED, &new)
            }
            Method::PUT => {
                let mut new = ssa::update(objects.get(&path), body.clone(), &manager);
                new["metadata"]["resourceVersion"] = Value::String(self.next_rv());
                objects.insert(path, new.clone());
                ok(StatusCode::OK, &new)
            }
            Method::DELETE => match objects.remove(&path) {
                Some(v) => ok(StatusCode::OK, &v),
                None => status(404, "NotFound", "gone"),
            },
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}

/// A scripted worker group: per rank status and load; remap requests are recorded and (when
/// `auto_complete`) switch the rank to the requested generation at once.
#[derive(Clone, Default)]
pub struct FakeWorkers {
    pub state: Arc<Mutex<WorkersState>>,
}

#[derive(Default)]
pub struct WorkersState {
    pub statuses: BTreeMap<usize, WorkerStatus>,
    pub loads: BTreeMap<usize, LoadReport>,
    pub remaps: Vec<(usize, String, RemapRequest)>,
    pub auto_complete: bool,
    pub fail_remap: bool,
    /// Answer remaps with 409 `Diverged` (the rank holds another placement under that
    /// generation, as when a second operator drove it).
    pub diverged: bool,
    pub unreachable: bool,
    /// Answer remaps with 401 (the rank holds another control token).
    pub unauthorized: bool,
    /// `GET /v1/load?history=N` asks answered (the operator asks only when it plans).
    pub history_asks: usize,
}

impl FakeWorkers {
    pub fn new(ranks: usize, layers: usize, generation: u64) -> Self {
        let mut st = WorkersState {
            auto_complete: true,
            ..Default::default()
        };
        for rank in 0..ranks {
            st.statuses.insert(
                rank,
                WorkerStatus {
                    rank,
                    world_size: ranks,
                    ready: true,
                    backend: "cpu".into(),
                    placement_generation: generation,
                    layer_generations: vec![generation; layers],
                    step: 100,
                    tokens_per_second: 1000.0,
                    remap: None,
                    traffic: "generator".into(),
                    served_rows_total: 0,
                    served_rows_per_second: 0.0,
                    control_token_id: None,
                    client_token_id: None,
                },
            );
        }
        Self {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// Every rank reports the same slot counts (the group total is `ranks` times them).
    pub fn set_load(&self, slot_counts: Vec<Vec<f64>>, generation: u64, window: u64) {
        let mut st = self.state.lock().unwrap();
        let ranks: Vec<usize> = st.statuses.keys().copied().collect();
        for rank in ranks {
            st.loads.insert(
                rank,
                LoadReport {
                    rank,
                    layer_generations: vec![generation; slot_counts.len()],
                    window_steps: window,
                    window_start_step: None,
                    step: 1000,
                    slot_counts: slot_counts.clone(),
                    par: vec![1.0; slot_counts.len()],
                    history: Vec::new(),
                },
            );
        }
    }
}

impl FakeWorkers {
    /// Every rank's report moves to group step `step`.
    pub fn set_step(&self, step: u64) {
        let mut st = self.state.lock().unwrap();
        for report in st.loads.values_mut() {
            report.step = step;
        }
    }

    /// Every rank keeps closed windows of `steps` steps ending at `ends`, each with its
    /// current slot counts as the logical counts (the initial placement of the tests is a
    /// permutation, which the planner does not mind for this purpose).
    pub fn set_history(&self, ends: &[u64], steps: u64) {
        let mut st = self.state.lock().unwrap();
        for report in st.loads.values_mut() {
            report.history = ends
                .iter()
                .map(|&end_step| moe_api::LoadEpisode {
                    end_step,
                    steps,
                    logical_counts: report.slot_counts.clone(),
                })
                .collect();
        }
    }
}

fn unreachable(ep: &Endpoint) -> WorkerError {
    WorkerError::Transport {
        url: ep.base_url.clone(),
        message: "connection refused".into(),
    }
}

impl WorkerApi for FakeWorkers {
    fn status<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<WorkerStatus, WorkerError>> {
        Box::pin(async move {
            let st = self.state.lock().unwrap();
            if st.unreachable {
                return Err(unreachable(ep));
            }
            st.statuses
                .get(&ep.rank)
                .cloned()
                .ok_or_else(|| unreachable(ep))
        })
    }

    fn load<'a>(&'a self, ep: &'a Endpoint) -> BoxFuture<'a, Result<LoadReport, WorkerError>> {
        Box::pin(async move {
            let st = self.state.lock().unwrap();
            if st.unreachable {
                return Err(unreachable(ep));
            }
            st.loads
                .get(&ep.rank)
                .cloned()
                .ok_or_else(|| unreachable(ep))
        })
    }

    fn load_with_history<'a>(
        &'a self,
        ep: &'a Endpoint,
        windows: usize,
    ) -> BoxFuture<'a, Result<LoadReport, WorkerError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap();
            st.history_asks += 1;
            if st.unreachable {
                return Err(unreachable(ep));
            }
            let mut report = st
                .loads
                .get(&ep.rank)
                .cloned()
                .ok_or_else(|| unreachable(ep))?;
            let keep = report.history.len().saturating_sub(windows);
            report.history.drain(..keep);
            Ok(report)
        })
    }

    fn remap<'a>(
        &'a self,
        ep: &'a Endpoint,
        token: &'a str,
        request: &'a RemapRequest,
    ) -> BoxFuture<'a, Result<(), WorkerError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap();
            st.remaps
                .push((ep.rank, token.to_string(), request.clone()));
            if st.unauthorized {
                return Err(WorkerError::Status {
                    url: format!("{}/v1/remap", ep.base_url),
                    status: 401,
                    message: "invalid bearer token".into(),
                    reason: None,
                });
            }
            if st.diverged {
                return Err(WorkerError::Status {
                    url: format!("{}/v1/remap", ep.base_url),
                    status: 409,
                    message: "generation 1 was already accepted with a different placement or mode"
                        .into(),
                    reason: Some(moe_api::CONFLICT_DIVERGED.into()),
                });
            }
            let (auto, fail) = (st.auto_complete, st.fail_remap);
            let Some(s) = st.statuses.get_mut(&ep.rank) else {
                return Err(unreachable(ep));
            };
            let target = request.placement.generation;
            let layers = request.layers.len().max(1);
            let state = if fail {
                RemapState::Failed
            } else if auto {
                RemapState::Succeeded
            } else {
                RemapState::Running
            };
            if state == RemapState::Succeeded {
                s.placement_generation = target;
                s.layer_generations = vec![target; s.layer_generations.len()];
            }
            s.remap = Some(RemapProgress {
                generation: target,
                state,
                mode: RemapMode::Async,
                layers_total: layers,
                layers_done: if state == RemapState::Succeeded {
                    layers
                } else {
                    0
                },
                experts_moved: 2,
                bytes_moved: 2048,
                stall_seconds: 0.0,
                started_at_ms: 1_700_000_000_000,
                finished_at_ms: (state != RemapState::Running).then_some(1_700_000_001_000),
                error: fail.then(|| "peer rank 1 timed out".to_string()),
            });
            Ok(())
        })
    }
}

/// The `MoEDeployment` "demo" the harnesses reconcile, as the API server would store it.
pub fn moed_json(namespace: &str, spec: Value, generation: i64) -> Value {
    json!({
        "apiVersion": "moe-operator.github.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "demo", "namespace": namespace, "uid": "moed-uid", "generation": generation},
        "spec": spec
    })
}

/// A Ready worker pod of rank `rank` of "demo", carrying `annotations` (group and spec hashes).
pub fn ready_pod(namespace: &str, rank: usize, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("demo-{rank}"), "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "moe-worker",
                "app.kubernetes.io/instance": "demo",
                "apps.kubernetes.io/pod-index": rank.to_string()
            },
            "annotations": annotations
        },
        "spec": {"containers": [{"name": "worker"}]},
        "status": {
            "podIP": format!("127.0.0.{}", rank + 10),
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

/// The condition of type `type_` in a status (panics when missing).
pub fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap()
}
