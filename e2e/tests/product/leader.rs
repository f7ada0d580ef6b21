//! Scenario 10 (issue 14): two operator replicas at once on the real API server. Exactly one
//! holds the Lease and acts: every event about the MoEDeployment comes from the Lease holder,
//! only it reports itself leader on `/metrics`, and the group converges (every rank serves the
//! committed placement of each generation). Deleting the leader's pod hands the Lease to the
//! other replica, which then acts on the next manual remap requests: it remaps to convergence,
//! or (the committed placement already optimal for the window: the exact search now often
//! proves the first remap's plan optimal on this small shape) says so in its own RemapSkipped
//! events.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use moe_e2e::wait;
use serde_json::json;

use crate::common::*;

/// The holder of the operator's Lease (its pod name).
async fn lease_holder(client: &Client) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    Ok(leases
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|l| l.name_any().ends_with("-leader"))
        .and_then(|l| l.spec?.holder_identity))
}

/// Running operator pods and, per pod, its `leader_election_master_status` (1 leader, 0 not).
async fn leaders_by_metrics(client: &Client) -> Result<Vec<(String, u32)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    let mut out = Vec::new();
    for p in pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items
    {
        if p.metadata.deletion_timestamp.is_some() || !wait::pod_ready(&p) {
            continue;
        }
        let ip = pod_ip(&p).context("operator pod without IP")?;
        let (code, text) =
            moe_e2e::http::get(&ip, 8080, "/metrics", std::time::Duration::from_secs(3)).await?;
        ensure!(code == 200, "GET {ip}:8080/metrics: {code}");
        let leading = text
            .lines()
            .filter(|l| l.starts_with("leader_election_master_status"))
            .any(|l| l.trim_end().ends_with(" 1"));
        out.push((p.name_any(), u32::from(leading)));
    }
    Ok(out)
}

/// The reporting instances (operator pod names) of the events about `name`.
async fn event_reporters(client: &Client, ns: &str, name: &str) -> Result<BTreeSet<String>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some("moe-operator"))
        .filter_map(|e| e.reporting_instance)
        .collect())
}

/// Who reported the RemapSkipped event of the manual request `request`.
async fn skip_reporters(
    client: &Client,
    ns: &str,
    name: &str,
    request: &str,
) -> Result<BTreeSet<String>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let quoted = format!("{request:?}");
    Ok(api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RemapSkipped"))
        .filter(|e| e.message.as_deref().is_some_and(|m| m.contains(&quoted)))
        .filter_map(|e| e.reporting_instance)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_one_leader_and_a_takeover() -> Result<()> {
    moe_e2e::init_tracing();
    let Some(mut cluster) = moe_e2e::Cluster::start_or_skip("two_operators_one_leader").await?
    else {
        return Ok(());
    };
    if cluster.bins().helm.is_none() {
        moe_e2e::cluster::print_skip("two_operators_one_leader", "helm is not installed");
        return Ok(());
    }
    let nodes = cluster.start_nodes(1, 4).await?;
    helm_install(&cluster, &["--set", "replicaCount=2"]).await?;
    let client = cluster.client();
    wait::pods_ready(&client, OPERATOR_NS, OPERATOR_SELECTOR, 2, T)
        .await
        .context("two operator replicas")?;
    let first = wait::until(T, "a Lease holder", || async {
        lease_holder(&client).await
    })
    .await?;
    println!("leader: {first}");

    let (ns, name) = ("ha", "ha");
    create_namespace(&cluster, ns).await?;
    apply_moed(
        &client,
        ns,
        &small_moed(
            name,
            "Linear",
            json!({}),
            json!({"skew": 1.5, "drift": 0.0}),
        ),
    )
    .await?;
    let o = with_log(
        wait_status(&client, ns, name, T, "a threshold remap succeeded", |st| {
            st["lastRemap"]["result"] == "Succeeded"
        })
        .await,
        &nodes,
    )
    .await?;
    let g1 = status(&o)["lastRemap"]["generation"].as_u64().unwrap_or(0);
    let g = converged(&client, ns, name, 2, 4, 8, T).await?;
    println!("generation {g1} remapped by the leader; converged on {g}");

    // One actor: the Lease holder is the only replica that says it leads and the only one
    // that published events.
    let leaders = leaders_by_metrics(&client).await?;
    ensure!(leaders.len() == 2, "operator pods: {leaders:?}");
    let leading: Vec<&String> = leaders
        .iter()
        .filter(|(_, l)| *l == 1)
        .map(|(n, _)| n)
        .collect();
    ensure!(
        leading == vec![&first],
        "leaders by /metrics {leaders:?}, Lease holder {first}"
    );
    let reporters = event_reporters(&client, ns, name).await?;
    ensure!(
        reporters == BTreeSet::from([first.clone()]),
        "events reported by {reporters:?}, Lease holder {first}"
    );

    // The leader goes away (graceful delete: it releases the Lease); the other replica takes
    // over and drives the next remap.
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    pods.delete(&first, &DeleteParams::default()).await?;
    let second = wait::until(T, "a new Lease holder", || {
        let client = client.clone();
        let first = first.clone();
        async move { Ok(lease_holder(&client).await?.filter(|h| *h != first)) }
    })
    .await?;
    println!("took over: {second}");
    // The new leader acts on manual requests. The placement the first leader committed may
    // already be the best for the window the request is planned on (seen in a CI trial: every
    // layer "NoImprovement"): then the new leader says so in a RemapSkipped event, and the next
    // request, planned on a later window, usually moves something. Up to three requests.
    let mut g2 = None;
    for attempt in 1..=3 {
        let request = format!("after-takeover-{attempt}");
        patch_spec(
            &client,
            ns,
            name,
            json!({"remapRequest": request, "eplb": {"enabled": false}}),
        )
        .await?;
        // Either the remap it asked for succeeded, or an event says why nothing moved.
        let remapped = wait::until(T, "the manual request remapped or skipped", || {
            let (client, request) = (client.clone(), request.clone());
            async move {
                let o = moed_api(&client, ns).get(name).await?;
                let st = status(&o);
                if st["lastHandledRemapRequest"] != request.as_str() {
                    return Ok(None);
                }
                if st["lastRemap"]["trigger"] == "Manual"
                    && st["lastRemap"]["result"] == "Succeeded"
                {
                    return Ok(Some(true));
                }
                let skipped = !skip_reporters(&client, ns, name, &request)
                    .await?
                    .is_empty();
                Ok(skipped.then_some(false))
            }
        })
        .await?;
        if remapped {
            g2 = Some(converged(&client, ns, name, 2, 4, 8, T).await?);
            break;
        }
        let skipped_by = skip_reporters(&client, ns, name, &request).await?;
        ensure!(
            skipped_by == BTreeSet::from([second.clone()]),
            "request {request} handled without a remap: RemapSkipped reported by {skipped_by:?}, wanted {second}"
        );
        println!("request {request}: the new leader found nothing to improve (RemapSkipped)");
    }
    match g2 {
        Some(g2) => ensure!(g2 > g, "generation {g2} after the takeover, {g} before"),
        None => println!("three requests skipped by the new leader: placement already optimal"),
    }
    let reporters = event_reporters(&client, ns, name).await?;
    ensure!(
        reporters == BTreeSet::from([first.clone(), second.clone()]),
        "events reported by {reporters:?}: wanted the first leader, then {second}"
    );
    // Only ready pods are scraped, and the replacement replica (or, under load, the new leader
    // itself for a moment) may not be ready yet: wait for the one-leader view instead of taking
    // a single sample (seen failing once in a CI trial with the new leader unready).
    let leaders = wait::until(T, "exactly one leader by /metrics: the new holder", || {
        let client = client.clone();
        let second = second.clone();
        async move {
            let leaders = leaders_by_metrics(&client).await?;
            let one = leaders.iter().filter(|(_, l)| *l == 1).count() == 1
                && leaders.iter().any(|(n, l)| *n == second && *l == 1);
            Ok(one.then_some(leaders))
        }
    })
    .await
    .context("after the takeover")?;
    println!("converged on generation {g2:?} under {second}: {leaders:?}");
    let _ = nodes;
    Ok(())
}
