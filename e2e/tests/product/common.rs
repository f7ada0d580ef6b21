//! Shared steps of the product scenarios: install the chart, apply a MoEDeployment, read its
//! status, and check that the committed placement and the workers agree.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, ResourceExt};
use moe_e2e::{Cluster, Nodes, wait};
use serde_json::{Value, json};

/// Namespace of the operator release.
pub const OPERATOR_NS: &str = "moe-system";
/// Selector of the operator's pods (chart labels).
pub const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=moe-operator";
/// Worker pods of deployment `name`.
pub fn worker_selector(name: &str) -> String {
    format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=moe-worker")
}

pub const WORKER_HTTP_PORT: u16 = 8080;

/// Generous bound for one step of a scenario on a loaded 2-core machine.
pub const T: Duration = Duration::from_secs(120);

pub fn moed_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("moe-operator.github.io", "v1alpha1", "MoEDeployment"),
        "moedeployments",
    )
}

pub fn moed_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &moed_resource())
}

pub fn repo_path(rel: &str) -> std::path::PathBuf {
    moe_e2e::workspace_root().join(rel)
}

/// A small CPU-backend MoEDeployment: 2 ranks, 4 layers, 8 experts, hidden 64, traffic at
/// 20 steps/s and EPLB timings of seconds. `extra_eplb` / `extra_spec` are merged over it.
pub fn small_moed(name: &str, strategy: &str, eplb: Value, traffic: Value) -> Value {
    let mut e = json!({
        "enabled": true, "pollIntervalSeconds": 2, "replanIntervalSeconds": 5,
        "imbalanceThreshold": 1.1, "windowSteps": 100, "minWindowSteps": 40,
    });
    merge(&mut e, eplb);
    let mut t = json!({"tokensPerStep": 64, "skew": 1.5, "seed": 3, "stepsPerSecond": 20});
    merge(&mut t, traffic);
    json!({
        "apiVersion": "moe-operator.github.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"numLayers": 4, "numExperts": 8, "hidden": 64, "intermediate": 32, "topK": 2},
            "weights": {"synthetic": {"seed": 1}},
            "expertParallel": {"ranks": 2, "ranksPerNode": 2},
            "placement": {"strategy": strategy},
            "eplb": e,
            "worker": {"backend": "Cpu", "httpPort": WORKER_HTTP_PORT, "commPort": 29500,
                       "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                     "limits": {"nvidia.com/gpu": "1"}}},
            "traffic": t,
        }
    })
}

/// JSON merge (objects recursively, everything else replaced).
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Starts a cluster with a node for `nodes` x 4 GPUs (the real node, or the stand-in with
/// `nodes` fake nodes: see `Cluster::start_nodes`), and the operator installed by
/// `helm install` of `helm/moe-operator` into `moe-system`; waits for the operator pod to be
/// Ready. Returns `None` (test skipped) without the control-plane binaries.
pub async fn cluster_with_operator(test: &str, nodes: usize) -> Result<Option<(Cluster, Nodes)>> {
    let Some(mut cluster) = Cluster::start_or_skip(test).await? else {
        return Ok(None);
    };
    if cluster.bins().helm.is_none() {
        moe_e2e::cluster::print_skip(test, "helm is not installed (run e2e/bootstrap.sh)");
        return Ok(None);
    }
    let nodes = cluster.start_nodes(nodes, 4).await?;
    helm_install(&cluster, &[]).await?;
    Ok(Some((cluster, nodes)))
}

/// `helm install moe helm/moe-operator -n moe-system` plus `extra` flags into a namespace
/// with the `restricted` Pod Security level; waits for one Ready operator pod.
pub async fn helm_install(cluster: &Cluster, extra: &[&str]) -> Result<()> {
    create_namespace(cluster, OPERATOR_NS).await?;
    let chart = repo_path("helm/moe-operator");
    let chart = chart.to_str().context("chart path")?;
    // Text logs, for reading.
    let mut args = vec![
        "install",
        "moe",
        chart,
        "-n",
        OPERATOR_NS,
        "--set",
        "operator.logFormat=text",
    ];
    if cluster.real_node().is_none() {
        // On the kubelet stand-in pods share one network namespace: bind the operator's HTTP
        // port to its pod IP, not 0.0.0.0 (the workers' ports would clash).
        args.extend(["--set-string", "operator.bindAddress=$(POD_IP)"]);
    }
    args.extend_from_slice(extra);
    cluster.run_helm(&args)?;
    wait::pods_ready(&cluster.client(), OPERATOR_NS, OPERATOR_SELECTOR, 1, T)
        .await
        .context("operator pod from the Helm chart never became Ready")?;
    Ok(())
}

/// The operator pod's name.
pub async fn operator_pod(client: &Client) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    let mut list = pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items;
    list.retain(|p| p.metadata.deletion_timestamp.is_none());
    list.into_iter().next().context("no operator pod")
}

/// Pod Security level every namespace of the scenarios enforces: what the chart and the
/// operator create must be admitted under it.
pub const POD_SECURITY: &str = "restricted";

/// Creates namespace `ns` enforcing the [`POD_SECURITY`] level.
pub async fn create_namespace(cluster: &Cluster, ns: &str) -> Result<()> {
    cluster
        .apply_yaml(
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    \
                 pod-security.kubernetes.io/enforce: {POD_SECURITY}\n"
            ),
            "default",
        )
        .await?;
    Ok(())
}

/// Server-side applies a MoEDeployment given as JSON.
pub async fn apply_moed(client: &Client, ns: &str, obj: &Value) -> Result<DynamicObject> {
    let name = obj["metadata"]["name"].as_str().context("name")?;
    let api = moed_api(client, ns);
    let pp = PatchParams::apply("moe-e2e").force();
    Ok(api.patch(name, &pp, &Patch::Apply(obj)).await?)
}

/// Merge-patches a MoEDeployment's spec.
pub async fn patch_spec(client: &Client, ns: &str, name: &str, spec: Value) -> Result<()> {
    moed_api(client, ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await?;
    Ok(())
}

pub async fn get_moed(client: &Client, ns: &str, name: &str) -> Result<DynamicObject> {
    Ok(moed_api(client, ns).get(name).await?)
}

pub fn status(o: &DynamicObject) -> &Value {
    o.data.get("status").unwrap_or(&Value::Null)
}

/// The condition `type_` of a status, as (status, reason).
pub fn condition(st: &Value, type_: &str) -> Option<(String, String)> {
    st["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == type_).then(|| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
    })
}

pub fn cond_is(st: &Value, type_: &str, status: &str) -> bool {
    condition(st, type_).is_some_and(|(s, _)| s == status)
}

/// Polls the MoEDeployment's status (every 200 ms) until `cond` holds; returns the object.
pub async fn wait_status(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Result<DynamicObject> {
    let api = moed_api(client, ns);
    let deadline = std::time::Instant::now() + timeout;
    let mut last;
    loop {
        match api.get_opt(name).await {
            Ok(Some(o)) => {
                if cond(status(&o)) {
                    return Ok(o);
                }
                last = status(&o).clone();
            }
            Ok(None) => last = Value::String("<not found>".into()),
            Err(e) => last = Value::String(format!("<error: {e}>")),
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {ns}/{name}: {what}; last status:\n{}",
                serde_json::to_string_pretty(&last).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Status says Available with every rank ready and a measured PAR.
pub fn available_with_par(st: &Value, ranks: u64) -> bool {
    cond_is(st, "Available", "True")
        && st["readyRanks"].as_u64() == Some(ranks)
        && st["ranks"].as_u64() == Some(ranks)
        && st["imbalance"]["worstPar"]
            .as_f64()
            .is_some_and(|p| p >= 1.0)
}

/// The committed placement: (generation, document) from `<name>-placement`.
pub async fn committed_placement(client: &Client, ns: &str, name: &str) -> Result<(u64, Value)> {
    let cm: ConfigMap = Api::namespaced(client.clone(), ns)
        .get(&format!("{name}-placement"))
        .await?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("placement.json"))
        .context("placement ConfigMap without placement.json")?;
    let doc: Value = serde_json::from_str(text)?;
    let generation = doc["generation"].as_u64().context("generation")?;
    let annotated = cm
        .annotations()
        .get("moe-operator.github.io/placement-generation")
        .cloned()
        .unwrap_or_default();
    ensure!(
        annotated == generation.to_string(),
        "placement ConfigMap annotation says generation {annotated:?}, document says {generation}"
    );
    Ok((generation, doc))
}

/// Live worker pods of `name`, sorted by name.
pub async fn worker_pods(client: &Client, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pods = api
        .list(&ListParams::default().labels(&worker_selector(name)))
        .await?
        .items;
    pods.retain(|p| p.metadata.deletion_timestamp.is_none());
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(pods)
}

pub fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

pub fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// `GET /v1/<path>` on a worker pod, parsed as JSON.
pub async fn worker_get(ip: &str, path: &str) -> Result<Value> {
    let (code, body) =
        moe_e2e::http::get(ip, WORKER_HTTP_PORT, path, Duration::from_secs(3)).await?;
    ensure!(
        code == 200,
        "GET {ip}:{WORKER_HTTP_PORT}{path}: {code} {body}"
    );
    serde_json::from_str(&body).with_context(|| format!("GET {ip}{path}: body {body:?}"))
}

/// Every logical expert of every layer has at least one slot, and the shape is the model's.
pub fn check_every_expert_served(doc: &Value, layers: usize, experts: u64) -> Result<()> {
    let phy2log = doc["phy2log"].as_array().context("phy2log")?;
    ensure!(phy2log.len() == layers, "{} layers in {doc}", phy2log.len());
    for (l, row) in phy2log.iter().enumerate() {
        let served: BTreeSet<u64> = row
            .as_array()
            .context("row")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let want: BTreeSet<u64> = (0..experts).collect();
        ensure!(
            served == want,
            "layer {l} serves experts {served:?}, want all of 0..{experts}"
        );
    }
    Ok(())
}

/// The end state after any disturbance: every rank is Ready and serves exactly the committed
/// placement (GET /v1/placement on each pod IP equals the ConfigMap's document), every expert
/// is served, and the status reports the same generation as desired and applied. Polls until
/// it holds (the group may still be re-forming); returns the generation.
pub async fn converged(
    client: &Client,
    ns: &str,
    name: &str,
    ranks: usize,
    layers: usize,
    experts: u64,
    timeout: Duration,
) -> Result<u64> {
    wait::until(
        timeout,
        &format!("{ns}/{name}: ConfigMap, workers and status agree"),
        || async move {
            let (generation, doc) = committed_placement(client, ns, name).await?;
            check_every_expert_served(&doc, layers, experts)?;
            let pods = worker_pods(client, ns, name).await?;
            if pods.len() != ranks || !pods.iter().all(wait::pod_ready) {
                bail!(
                    "{} of {ranks} worker pods ready",
                    pods.iter().filter(|p| wait::pod_ready(p)).count()
                );
            }
            for p in &pods {
                let ip = pod_ip(p).context("pod without IP")?;
                let served = worker_get(&ip, "/v1/placement").await?;
                if served != doc {
                    bail!(
                        "{} serves generation {} but the ConfigMap holds generation {generation}",
                        p.name_any(),
                        served["generation"]
                    );
                }
            }
            let o = get_moed(client, ns, name).await?;
            let st = status(&o);
            let p = &st["placement"];
            if p["desiredGeneration"].as_u64() != Some(generation)
                || p["appliedGeneration"].as_u64() != Some(generation)
            {
                bail!("status placement {p} vs committed generation {generation}");
            }
            if !st["remap"].is_null() {
                bail!("status still shows a remap in progress: {}", st["remap"]);
            }
            if !available_with_par(st, ranks as u64) {
                bail!("status not Available with a measured PAR: {st}");
            }
            Ok(Some(generation))
        },
    )
    .await
}

/// Events of the operator about `name` with `reason`, as (message, count).
pub async fn events(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> Result<Vec<(String, i32)>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name},reason={reason}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|e| {
            let n = e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1)
                .max(1);
            (e.message.unwrap_or_default(), n)
        })
        .collect())
}

/// The status records remap `last` as the last one (none lost), and every running worker
/// process executed exactly `executed` remaps since it started (`moe_worker_remaps_total`
/// on its `/metrics`; none applied twice).
pub async fn check_remap_record(
    client: &Client,
    ns: &str,
    name: &str,
    last: u64,
    executed: u64,
) -> Result<()> {
    let o = get_moed(client, ns, name).await?;
    let lr = &status(&o)["lastRemap"];
    ensure!(
        lr["generation"].as_u64() == Some(last),
        "lastRemap {lr} should be generation {last}"
    );
    for p in worker_pods(client, ns, name).await? {
        let ip = pod_ip(&p).context("pod IP")?;
        let (code, text) =
            moe_e2e::http::get(&ip, WORKER_HTTP_PORT, "/metrics", Duration::from_secs(3)).await?;
        ensure!(code == 200, "GET {ip}/metrics: {code}");
        let n: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("moe_worker_remaps_total{") && l.contains("result=\"succeeded\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        ensure!(
            n as u64 == executed,
            "{} executed {n} remaps since it started, expected {executed}",
            p.name_any()
        );
    }
    Ok(())
}

/// RemapStarted / RemapFinished events that name placement generation `g`, with their counts.
pub async fn remap_events(client: &Client, ns: &str, name: &str, g: u64) -> Result<(i32, i32)> {
    let started = events(client, ns, name, "RemapStarted").await?;
    let finished = events(client, ns, name, "RemapFinished").await?;
    let count = |evs: &[(String, i32)], needle: &str| -> i32 {
        evs.iter()
            .filter(|(m, _)| m.contains(needle))
            .map(|(_, n)| *n)
            .sum()
    };
    Ok((
        count(&started, &format!("to placement generation {g}:")),
        count(&finished, &format!("placement generation {g} serves")),
    ))
}

/// Last 40 lines of every operator pod's log, for failure messages.
pub async fn operator_log(nodes: &Nodes) -> String {
    let mut out = Vec::new();
    for p in nodes.pods().await.unwrap_or_default() {
        let Some(pod) = p.strip_prefix(&format!("{OPERATOR_NS}/")) else {
            continue;
        };
        let Ok(log) = nodes.logs(OPERATOR_NS, pod, "operator").await else {
            continue;
        };
        let lines: Vec<&str> = log.lines().collect();
        out.push(format!(
            "--- {pod}\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        ));
    }
    out.join("\n")
}

/// Adds the operator's log to an error.
pub async fn with_log<T>(r: Result<T>, nodes: &Nodes) -> Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(e.context(format!("operator log:\n{}", operator_log(nodes).await))),
    }
}
