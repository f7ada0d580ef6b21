//! Scenario 4: failures. A worker killed mid-remap, the operator restarted mid-remap, a pod
//! deleted, the placement ConfigMap and the static-map ConfigMap removed. Afterwards every
//! expert is served, the ConfigMap's placement and every worker's (`GET /v1/placement` on each
//! pod IP) agree, the status tells the truth, and no remap is lost or applied twice.

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use moe_e2e::wait;
use serde_json::{Value, json};

use crate::common::*;

/// Asks for a manual remap (`spec.remapRequest`) and waits until the operator has committed
/// it (status shows the running remap of `generation`); returns the status.
pub async fn start_manual_remap(
    client: &kube::Client,
    nodes: &moe_e2e::Nodes,
    ns: &str,
    name: &str,
    request: &str,
    generation: u64,
) -> Result<Value> {
    // A full statistics window with some imbalance, so the planner has something to improve
    // (a manual request that finds no improving plan is handled without a remap).
    let o = wait_status(
        client,
        ns,
        name,
        T,
        "a full window with PAR >= 1.05",
        |st| {
            st["imbalance"]["windowSteps"].as_u64().unwrap_or(0) >= 80
                && st["imbalance"]["worstPar"].as_f64().unwrap_or(0.0) >= 1.05
        },
    )
    .await;
    with_log(o, nodes).await?;
    patch_spec(client, ns, name, json!({"remapRequest": request})).await?;
    let o = wait_status(
        client,
        ns,
        name,
        T,
        &format!("remap to generation {generation} running"),
        |st| st["remap"]["generation"].as_u64() == Some(generation),
    )
    .await;
    let o = with_log(o, nodes).await?;
    let st = status(&o).clone();
    ensure!(
        st["phase"] == "Rebalancing" && cond_is(&st, "Rebalancing", "True"),
        "a running remap should show Rebalancing: {st}"
    );
    Ok(st)
}

/// After a disturbance during remap `generation`: converged on it, recorded once.
async fn settled_on(
    client: &kube::Client,
    nodes: &moe_e2e::Nodes,
    ns: &str,
    name: &str,
    generation: u64,
    request: &str,
    executed: u64,
) -> Result<()> {
    let g = with_log(converged(client, ns, name, 2, 4, 8, T).await, nodes).await?;
    if g != generation {
        let o = get_moed(client, ns, name).await?;
        let evs = events(client, ns, name, "RemapStarted").await?;
        let restarts = events(client, ns, name, "GroupRestarted").await?;
        anyhow::bail!(
            "converged on generation {g}, expected {generation} (a remap lost or repeated)\nRemapStarted: {evs:?}\nGroupRestarted: {restarts:?}\nstatus: {}\n{}",
            status(&o),
            operator_log(nodes).await
        );
    }
    let o = wait_status(client, ns, name, T, "lastRemap recorded", |st| {
        st["lastRemap"]["generation"].as_u64() == Some(generation)
            && st["lastRemap"]["finishedAt"].is_string()
    })
    .await?;
    let st = status(&o);
    let result = st["lastRemap"]["result"].as_str().unwrap_or_default();
    ensure!(
        ["Succeeded", "Superseded", "Failed"].contains(&result),
        "lastRemap result {result:?}"
    );
    ensure!(
        st["lastHandledRemapRequest"] == request,
        "lastHandledRemapRequest {} (want {request})",
        st["lastHandledRemapRequest"]
    );
    check_remap_record(client, ns, name, generation, executed).await?;
    println!(
        "generation {generation}: lastRemap {} ({}), phase {}, ready {}",
        result, st["lastRemap"]["trigger"], st["phase"], st["ready"]
    );
    Ok(())
}

/// Polls every rank's `GET /v1/status` (every 20 ms, up to 10 s) until one reports the remap
/// to `generation` as accepted and running; describes what it saw.
async fn worker_remap_running(pods: &[Pod], generation: u64) -> String {
    let ips: Vec<String> = pods.iter().filter_map(pod_ip).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        for ip in &ips {
            if let Ok(ws) = worker_get(ip, "/v1/status").await {
                let r = &ws["remap"];
                if r["generation"].as_u64() == Some(generation) {
                    let state = r["state"].as_str().unwrap_or_default().to_lowercase();
                    return if state == "running" {
                        format!(
                            "rank {} executing it: {}/{} layers done",
                            ws["rank"], r["layersDone"], r["layersTotal"]
                        )
                    } else {
                        format!("rank {} already reports it {state}", ws["rank"])
                    };
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    "no rank accepted it within 10 s of the commit".into()
}

/// A worker SIGKILLed while a remap runs, then the operator SIGKILLed while the next runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_worker_and_operator_mid_remap() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) =
        cluster_with_operator("kill_worker_and_operator_mid_remap", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "crashy");
    create_namespace(&cluster, ns).await?;
    // Automatic remaps off (manual requests only, so the test decides when one runs); the
    // popularity ranking drifts, so every request finds an improving plan.
    let obj = small_moed(
        name,
        "Linear",
        json!({"enabled": false}),
        json!({"skew": 1.5, "drift": 0.02}),
    );
    apply_moed(&client, ns, &obj).await?;
    with_log(
        wait_status(&client, ns, name, T, "Available with PAR", |st| {
            available_with_par(st, 2)
        })
        .await,
        &nodes,
    )
    .await?;

    // --- a worker process dies mid-remap -------------------------------------------------
    start_manual_remap(&client, &nodes, ns, name, "r1", 1).await?;
    let before = worker_pods(&client, ns, name).await?;
    // Kill while the workers execute it (accepted, not finished), when that can be caught.
    let seen = worker_remap_running(&before, 1).await;
    nodes
        .kill_container(ns, &format!("{name}-1"), "worker", libc::SIGKILL)
        .await?;
    println!("killed {name}-1's worker process during the remap to generation 1 ({seen})");
    // The process is replaced: its container restarts, or the operator replaces the whole
    // group (new pods); either way the group re-forms as a whole.
    wait::object::<Pod>(&client, ns, &format!("{name}-1"), T, |p| {
        restart_count(p) > restart_count(&before[1]) || p.metadata.uid != before[1].metadata.uid
    })
    .await?;
    // The group restarted (every rank exits when a peer dies): its processes started on
    // generation 1 and executed no remap.
    settled_on(&client, &nodes, ns, name, 1, "r1", 0).await?;

    // --- the operator dies mid-remap -----------------------------------------------------
    start_manual_remap(&client, &nodes, ns, name, "r2", 2).await?;
    let op = operator_pod(&client).await?;
    let op_name = op.name_any();
    nodes
        .kill_container(OPERATOR_NS, &op_name, "operator", libc::SIGKILL)
        .await?;
    println!("killed the operator ({op_name}) during the remap to generation 2");
    wait::object::<Pod>(&client, OPERATOR_NS, &op_name, T, |p| {
        restart_count(p) > restart_count(&op) && wait::pod_ready(p)
    })
    .await?;
    // The workers were not restarted: each executed the remap to generation 2 once.
    settled_on(&client, &nodes, ns, name, 2, "r2", 1).await?;
    Ok(())
}

/// vllm-ascend expert map: 4 layers, 2 devices, experts e on device e % 2.
fn expert_map() -> String {
    let layers: Vec<Value> = (0..4)
        .map(|l| {
            json!({"layer_id": l, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [0, 2, 4, 6]},
                {"device_id": 1, "device_expert": [1, 3, 5, 7]},
            ]})
        })
        .collect();
    json!({"moe_layer_count": 4, "layer_list": layers}).to_string()
}

/// A worker pod deleted; the static-map ConfigMap removed (and restored); the placement
/// ConfigMap removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_pod_and_configmaps() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator("delete_pod_and_configmaps", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "pinned");
    create_namespace(&cluster, ns).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "pinned-map", "namespace": ns},
        "data": {"expert_map.json": expert_map()},
    }))?;
    cms.create(&PostParams::default(), &map).await?;
    let mut obj = small_moed(
        name,
        "Static",
        json!({"enabled": false}),
        json!({"skew": 1.2}),
    );
    obj["spec"]["placement"]["staticMap"] = json!({"name": "pinned-map", "key": "expert_map.json"});
    apply_moed(&client, ns, &obj).await?;
    let g0 = with_log(converged(&client, ns, name, 2, 4, 8, T).await, &nodes).await?;
    ensure!(g0 == 0, "generation {g0}");
    let (_, doc) = committed_placement(&client, ns, name).await?;
    ensure!(
        doc["phy2log"][0] == json!([0, 2, 4, 6, 1, 3, 5, 7]),
        "generation 0 is not the static map: {doc}"
    );

    // --- a worker pod deleted ------------------------------------------------------------
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old = pods.get(&format!("{name}-0")).await?;
    pods.delete(&format!("{name}-0"), &DeleteParams::default())
        .await?;
    println!("deleted pod {name}-0");
    wait::object::<Pod>(&client, ns, &format!("{name}-0"), T, |p| {
        p.metadata.uid != old.metadata.uid && wait::pod_ready(p)
    })
    .await?;
    let g = with_log(converged(&client, ns, name, 2, 4, 8, T).await, &nodes).await?;
    ensure!(
        g == 0,
        "a deleted pod changed the placement generation to {g}"
    );

    // --- the static map disappears: Degraded, the running group keeps its placement -------
    cms.delete("pinned-map", &DeleteParams::default()).await?;
    let o = with_log(
        wait_status(&client, ns, name, T, "Degraded/StaticMapMissing", |st| {
            condition(st, "Degraded") == Some(("True".into(), "StaticMapMissing".into()))
        })
        .await,
        &nodes,
    )
    .await?;
    println!(
        "static map deleted: phase {}, {:?}",
        status(&o)["phase"],
        condition(status(&o), "Degraded")
    );
    let g = converged(&client, ns, name, 2, 4, 8, T).await?;
    ensure!(
        g == 0,
        "losing the static map changed the placement to generation {g}"
    );
    // Restored: Degraded clears, nothing moves (same map).
    cms.create(&PostParams::default(), &map).await?;
    wait_status(&client, ns, name, T, "Degraded False again", |st| {
        cond_is(st, "Degraded", "False")
    })
    .await?;
    let g = converged(&client, ns, name, 2, 4, 8, T).await?;
    ensure!(
        g == 0,
        "restoring the same static map moved to generation {g}"
    );

    // --- the placement ConfigMap disappears ----------------------------------------------
    cms.delete(&format!("{name}-placement"), &DeleteParams::default())
        .await?;
    println!("deleted ConfigMap {name}-placement");
    // Re-committed with a newer generation (never backwards under running workers), from the
    // static map, and the workers move to it.
    let g = with_log(converged(&client, ns, name, 2, 4, 8, T).await, &nodes).await?;
    ensure!(
        g >= 1,
        "placement ConfigMap re-created with generation {g} (went backwards)"
    );
    let (_, doc) = committed_placement(&client, ns, name).await?;
    ensure!(
        doc["phy2log"][0] == json!([0, 2, 4, 6, 1, 3, 5, 7]),
        "re-created placement is not the static map: {doc}"
    );
    let o = get_moed(&client, ns, name).await?;
    ensure!(cond_is(status(&o), "Degraded", "False"), "{}", status(&o));
    let cm = cms.get(&format!("{name}-placement")).await?;
    ensure!(
        cm.metadata
            .owner_references
            .as_ref()
            .is_some_and(|r| !r.is_empty()),
        "re-created ConfigMap has no owner"
    );
    Ok(())
}
