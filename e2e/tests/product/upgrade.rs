//! Scenario 8: a Helm upgrade of the operator that changes its worker defaults (here the
//! default worker image) leaves a running group alone on the real API server: the same worker
//! pods keep serving, and the MoEDeployment reports that they run an older template.

use std::collections::BTreeSet;

use anyhow::{Result, ensure};
use kube::ResourceExt;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_leaves_running_groups_alone() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, agent)) =
        cluster_with_operator("helm_upgrade_leaves_running_groups_alone", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("upgrade", "steady");
    create_namespace(&cluster, ns).await?;
    apply_moed(
        &client,
        ns,
        &small_moed(name, "RoundRobin", json!({}), json!({"skew": 1.0})),
    )
    .await?;
    wait_status(&client, ns, name, T, "Available, 2/2", |st| {
        available_with_par(st, 2)
    })
    .await?;
    let uids = |pods: &[k8s_openapi::api::core::v1::Pod]| -> BTreeSet<String> {
        pods.iter().filter_map(|p| p.uid()).collect()
    };
    let before = uids(&worker_pods(&client, ns, name).await?);
    ensure!(before.len() == 2, "pods before: {before:?}");

    // A new operator configuration: another default worker image. The operator pod itself is
    // replaced by the Deployment rollout.
    let chart = repo_path("helm/moe-operator");
    cluster.run_helm(&[
        "upgrade",
        "moe",
        chart.to_str().unwrap_or_default(),
        "-n",
        OPERATOR_NS,
        "--reuse-values",
        "--set",
        "workerDefaults.image=registry.example/moe-worker:next",
    ])?;
    let o = wait_status(&client, ns, name, T, "outdatedTemplate reported", |st| {
        st["outdatedTemplate"].is_string()
    })
    .await?;
    let st = status(&o);
    println!("after the upgrade: {}", st["outdatedTemplate"]);
    ensure!(
        st["ready"] == "2/2" && cond_is(st, "Available", "True"),
        "group not available after the upgrade: {st}"
    );
    let after = uids(&worker_pods(&client, ns, name).await?);
    ensure!(
        before == after,
        "the upgrade replaced worker pods: {before:?} -> {after:?}"
    );
    ensure!(
        st["groupRestarts"].as_u64().unwrap_or(0) == 0,
        "group restarts: {}",
        st["groupRestarts"]
    );
    let _ = agent;
    Ok(())
}
