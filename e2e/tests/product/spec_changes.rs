//! Scenario 5: spec changes. A threshold change applies without restarting any pod; an EP size
//! change replaces the group as a whole; deleting the MoEDeployment garbage-collects
//! everything it owned.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use moe_e2e::wait;
use serde_json::json;

use crate::common::*;

fn uids_and_restarts(pods: &[Pod]) -> BTreeMap<String, (String, i32)> {
    pods.iter()
        .map(|p| {
            (
                p.name_any(),
                (p.uid().unwrap_or_default(), restart_count(p)),
            )
        })
        .collect()
}

async fn observed(client: &kube::Client, ns: &str, name: &str) -> Result<kube::api::DynamicObject> {
    let generation = get_moed(client, ns, name).await?.metadata.generation;
    wait_status(
        client,
        ns,
        name,
        T,
        "observedGeneration caught up",
        move |st| st["observedGeneration"].as_i64() == generation,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_changes_and_deletion() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator("spec_changes_and_deletion", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "elastic");
    create_namespace(&cluster, ns).await?;
    // Balanced traffic and a high threshold: no remap interferes.
    let obj = small_moed(
        name,
        "RoundRobin",
        json!({"imbalanceThreshold": 1.5}),
        json!({"skew": 1.0}),
    );
    apply_moed(&client, ns, &obj).await?;
    with_log(converged(&client, ns, name, 2, 4, 8, T).await, &nodes).await?;
    let before = uids_and_restarts(&worker_pods(&client, ns, name).await?);
    let hash_before = status(&get_moed(&client, ns, name).await?)["groupHash"].clone();

    // --- threshold change: read by the operator only -------------------------------------
    patch_spec(
        &client,
        ns,
        name,
        json!({"eplb": {"imbalanceThreshold": 1.3}}),
    )
    .await?;
    let o = observed(&client, ns, name).await?;
    let st = status(&o);
    ensure!(
        st["groupHash"] == hash_before,
        "group hash changed: {} -> {}",
        hash_before,
        st["groupHash"]
    );
    ensure!(
        st["groupRestarts"].as_u64().unwrap_or(0) == 0,
        "groupRestarts {}",
        st["groupRestarts"]
    );
    with_log(converged(&client, ns, name, 2, 4, 8, T).await, &nodes).await?;
    let after = uids_and_restarts(&worker_pods(&client, ns, name).await?);
    ensure!(
        after == before,
        "threshold change touched the pods: {before:?} -> {after:?}"
    );
    println!("threshold 1.5 -> 1.3: same pods, no restarts {after:?}");

    // --- EP size change: the group is replaced as a whole --------------------------------
    patch_spec(&client, ns, name, json!({"expertParallel": {"ranks": 4}})).await?;
    observed(&client, ns, name).await?;
    let g = with_log(converged(&client, ns, name, 4, 4, 8, T).await, &nodes).await?;
    let pods = worker_pods(&client, ns, name).await?;
    let now = uids_and_restarts(&pods);
    ensure!(now.len() == 4, "{} pods", now.len());
    for (pod, (uid, _)) in &now {
        ensure!(
            !before.values().any(|(u, _)| u == uid),
            "{pod} survived the EP size change (uid {uid})"
        );
    }
    let o = get_moed(&client, ns, name).await?;
    let st = status(&o);
    ensure!(
        st["groupRestarts"].as_u64() == Some(1),
        "groupRestarts {}",
        st["groupRestarts"]
    );
    ensure!(st["groupHash"] != hash_before, "group hash unchanged");
    let (_, doc) = committed_placement(&client, ns, name).await?;
    ensure!(
        doc["numRanks"] == 4,
        "placement for {} ranks",
        doc["numRanks"]
    );
    ensure!(g >= 1, "a new shape must commit a new generation, got {g}");
    let restarted = events(&client, ns, name, "GroupRestarted").await?;
    ensure!(!restarted.is_empty(), "no GroupRestarted event");
    for p in &pods {
        let ws = worker_get(&pod_ip(p).unwrap_or_default(), "/v1/status").await?;
        ensure!(ws["worldSize"] == 4, "{}: {ws}", p.name_any());
    }
    println!("ranks 2 -> 4: group replaced, placement generation {g}");

    // --- delete: everything owned is garbage-collected -----------------------------------
    moed_api(&client, ns)
        .delete(name, &DeleteParams::background())
        .await?;
    wait::deleted::<StatefulSet>(&client, ns, name, T).await?;
    wait::deleted::<Service>(&client, ns, &format!("{name}-workers"), T).await?;
    wait::deleted::<ConfigMap>(&client, ns, &format!("{name}-placement"), T).await?;
    wait::deleted::<Secret>(&client, ns, &format!("{name}-control"), T).await?;
    wait::deleted::<ServiceAccount>(&client, ns, &format!("{name}-worker"), T).await?;
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sel = worker_selector(name);
    wait::until(T, "worker pods gone", || {
        let pods_api = pods_api.clone();
        let sel = sel.clone();
        async move {
            let left = pods_api.list(&ListParams::default().labels(&sel)).await?;
            Ok(left.items.is_empty().then_some(()))
        }
    })
    .await?;
    wait::until(T, "worker containers stopped", || {
        let running = nodes.runs_pods_of(ns);
        async move { Ok((!running?).then_some(())) }
    })
    .await?;
    println!("deleted: StatefulSet, Service, ConfigMap, Secret, SA, pods gone");
    Ok(())
}
