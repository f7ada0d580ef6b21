//! Scenarios 1 and 2: install with Helm, apply a MoEDeployment, see the group form and the
//! status become Available with a measured PAR; skewed traffic drives a rolling remap that
//! brings the measured PAR below the threshold.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::ResourceExt;
use moe_e2e::wait;
use serde_json::{Value, json};
use std::time::Duration;

use crate::common::*;

/// 1. `helm install` (CRDs, RBAC, operator as a pod with its service account), then a small
///    CPU-backend MoEDeployment: owned objects appear, pods land on the GPU nodes, the
///    worker processes form the group, status is Available with ready ranks and a PAR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_and_apply() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator("install_and_apply", 2).await? else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "tiny");
    create_namespace(&cluster, ns).await?;
    // RoundRobin with no real skew: stays balanced, no remap expected here (the threshold is
    // above the sampling noise of 64 tokens per step, which reaches PAR 1.11 at times).
    let obj = small_moed(
        name,
        "RoundRobin",
        json!({"imbalanceThreshold": 1.5}),
        json!({"skew": 1.0}),
    );
    apply_moed(&client, ns, &obj).await?;

    // The operator's objects, with controller owner references to the MoEDeployment.
    let uid = get_moed(&client, ns, name).await?.uid().context("uid")?;
    let owned = |refs: Option<&Vec<_>>| {
        refs.is_some_and(
            |r: &Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>| {
                r.iter().any(|o| o.uid == uid && o.controller == Some(true))
            },
        )
    };
    let sts = wait::object::<StatefulSet>(&client, ns, name, T, |_| true).await?;
    ensure!(
        owned(sts.metadata.owner_references.as_ref()),
        "StatefulSet not owned"
    );
    ensure!(
        sts.spec.as_ref().and_then(|s| s.replicas) == Some(2),
        "StatefulSet replicas: {:?}",
        sts.spec.as_ref().and_then(|s| s.replicas)
    );
    let svc = wait::object::<Service>(&client, ns, &format!("{name}-workers"), T, |_| true).await?;
    ensure!(
        owned(svc.metadata.owner_references.as_ref()),
        "Service not owned"
    );
    ensure!(
        svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"),
        "worker Service is not headless"
    );
    let cm =
        wait::object::<ConfigMap>(&client, ns, &format!("{name}-placement"), T, |_| true).await?;
    ensure!(
        owned(cm.metadata.owner_references.as_ref()),
        "ConfigMap not owned"
    );
    wait::object::<Secret>(&client, ns, &format!("{name}-control"), T, |_| true).await?;

    // Pods scheduled onto the fake GPU nodes (each takes one nvidia.com/gpu), Ready.
    let pods = wait::pods_ready(&client, ns, &worker_selector(name), 2, T)
        .await
        .context("worker pods never became Ready")?;
    for p in &pods {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        ensure!(
            node.starts_with("gpu-node-"),
            "{} bound to {node:?}",
            p.name_any()
        );
        // The real moe-worker process runs and reports the CPU backend in a formed group.
        let ip = pod_ip(p).context("pod IP")?;
        let ws = worker_get(&ip, "/v1/status").await?;
        ensure!(
            ws["ready"] == true && ws["worldSize"] == 2 && ws["backend"] == "cpu",
            "{}: {ws}",
            p.name_any()
        );
    }

    let o = wait_status(&client, ns, name, T, "Available, 2/2, measured PAR", |st| {
        available_with_par(st, 2) && st["ready"] == "2/2"
    })
    .await?;
    let st = status(&o);
    println!(
        "tiny: phase {} ready {} worst PAR {} (window {} steps)",
        st["phase"], st["ready"], st["imbalance"]["worstPar"], st["imbalance"]["windowSteps"]
    );
    ensure!(st["phase"] == "Running", "phase {}", st["phase"]);
    ensure!(cond_is(st, "Degraded", "False"), "Degraded: {st}");
    // ConfigMap, workers (GET /v1/placement) and status agree.
    converged(&client, ns, name, 2, 4, 8, T).await?;

    // What a user sees.
    let table = cluster.run_kubectl(&["get", "moed", "-n", ns])?;
    println!("{table}");
    ensure!(table.contains("2/2"), "kubectl get moed:\n{table}");
    check_kubectl_logs_and_exec(&cluster, &nodes, ns, name).await
}

/// On the real node: `kubectl logs` of a worker shows the group it formed (through the API
/// server and the kubelet), `kubectl exec` runs a command in its container (as the image's
/// non-root user), and the pods run as the security context says.
async fn check_kubectl_logs_and_exec(
    cluster: &moe_e2e::Cluster,
    nodes: &moe_e2e::Nodes,
    ns: &str,
    name: &str,
) -> Result<()> {
    let pod = format!("{name}-0");
    // The harness hook the scenarios use for failure messages (kubectl logs on the real node).
    let hook = nodes.logs(ns, &pod, "worker").await?;
    ensure!(
        hook.contains("group formed"),
        "Nodes::logs of {pod}:\n{hook}"
    );
    if !nodes.is_real() {
        println!("kubelet stand-in: kubectl logs/exec and security contexts not checked");
        return Ok(());
    }
    let log = cluster.run_kubectl(&["logs", "-n", ns, &pod, "-c", "worker"])?;
    ensure!(
        log.contains("group formed") && log.contains("HTTP API") && log.contains("listening"),
        "kubectl logs {pod} should show the worker's start-up:\n{log}"
    );
    let version = cluster.run_kubectl(&[
        "exec",
        "-n",
        ns,
        &pod,
        "-c",
        "worker",
        "--",
        "/usr/local/bin/moe-worker",
        "--version",
    ])?;
    ensure!(
        version.starts_with("moe-worker "),
        "kubectl exec: {version:?}"
    );
    // The worker resolved rank 0 through cluster DNS (its MOE_LEADER_ADDR is a DNS name) and
    // runs as the non-root user of the restricted Pod Security level.
    let st = cluster.run_kubectl(&[
        "get",
        "pod",
        "-n",
        ns,
        &pod,
        "-o",
        "jsonpath={.spec.securityContext.runAsUser} {.status.podIP}",
    ])?;
    ensure!(
        st.starts_with("65532 10.232."),
        "pod {pod}: uid and IP {st:?}"
    );
    println!("kubectl logs/exec on {pod}: ok ({st})");
    Ok(())
}

/// 2. Skewed traffic on a Linear placement pushes PAR above the threshold; the operator plans
///    and drives a rolling (async) remap; status shows Rebalancing, then `lastRemap` with PAR
///    before/predicted/after; the measured PAR falls below the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skew_triggers_remap() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator("skew_triggers_remap", 2).await? else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "skewed");
    let threshold = 1.1;
    create_namespace(&cluster, ns).await?;
    let obj = small_moed(
        name,
        "Linear",
        json!({"imbalanceThreshold": threshold, "replanIntervalSeconds": 3600}),
        json!({"skew": 1.5}),
    );
    apply_moed(&client, ns, &obj).await?;

    // Rebalancing is observed while the remap runs.
    let o = wait_status(
        &client,
        ns,
        name,
        T,
        "Rebalancing (a remap in progress)",
        |st| !st["remap"].is_null(),
    )
    .await
    .context("no remap started");
    let o = with_log(o, &nodes).await?;
    let st = status(&o);
    println!(
        "during the remap: phase {} remap {}",
        st["phase"], st["remap"]
    );
    ensure!(
        cond_is(st, "Rebalancing", "True") && st["phase"] == "Rebalancing",
        "a running remap should show phase/condition Rebalancing: {st}"
    );
    let before = st["remap"]["parBefore"].as_f64().context("parBefore")?;
    ensure!(
        before > threshold,
        "remap started at PAR {before} <= {threshold}"
    );
    ensure!(
        st["remap"]["trigger"] == "Threshold",
        "trigger {}",
        st["remap"]["trigger"]
    );

    // The record, then the measured PAR of the new placement.
    let o = wait_status(&client, ns, name, T, "lastRemap with parAfter", |st| {
        st["lastRemap"]["parAfter"].is_number()
    })
    .await;
    let o = with_log(o, &nodes).await?;
    let lr = status(&o)["lastRemap"].clone();
    println!("lastRemap: {lr}");
    ensure!(lr["result"] == "Succeeded", "result {}", lr["result"]);
    ensure!(lr["generation"] == 1, "generation {}", lr["generation"]);
    let predicted = lr["parPredicted"].as_f64().context("parPredicted")?;
    let after = lr["parAfter"].as_f64().context("parAfter")?;
    ensure!(
        lr["parBefore"].as_f64() == Some(before),
        "parBefore changed: {lr}"
    );
    ensure!(
        predicted < threshold,
        "predicted PAR {predicted} >= {threshold}"
    );
    ensure!(
        after < threshold,
        "measured PAR after the remap {after} >= {threshold}"
    );
    ensure!(
        lr["expertsMoved"].as_u64().unwrap_or(0) > 0,
        "no expert moved: {lr}"
    );

    // The live measurement agrees, the status is settled, and the remap happened once.
    wait_status(
        &client,
        ns,
        name,
        T,
        "worst PAR below the threshold, Balanced",
        |st| {
            st["imbalance"]["worstPar"]
                .as_f64()
                .is_some_and(|p| p < threshold)
                && cond_is(st, "Rebalancing", "False")
                && st["phase"] == "Running"
        },
    )
    .await?;
    let generation = converged(&client, ns, name, 2, 4, 8, T).await?;
    ensure!(generation == 1, "generation {generation}");
    check_remap_record(&client, ns, name, 1, 1).await?;
    println!(
        "{}",
        cluster.run_kubectl(&["get", "moed", "-n", ns, "-o", "wide"])?
    );
    Ok(())
}

/// `ranksPerPod: 2`: 4 ranks in 2 pods (one worker process with two ranks each), skewed
/// traffic, a threshold remap through all 4 ranks' endpoints, every rank serving the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_per_pod_remap() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) = cluster_with_operator("two_ranks_per_pod_remap", 1).await? else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "paired");
    let threshold = 1.1;
    create_namespace(&cluster, ns).await?;
    let mut obj = small_moed(
        name,
        "Linear",
        json!({"imbalanceThreshold": threshold, "replanIntervalSeconds": 3600}),
        json!({"skew": 1.5}),
    );
    merge(
        &mut obj,
        json!({"spec": {"expertParallel": {"ranks": 4, "ranksPerNode": 4, "ranksPerPod": 2}}}),
    );
    apply_moed(&client, ns, &obj).await?;
    let o = wait_status(&client, ns, name, T, "a succeeded remap", |st| {
        st["lastRemap"]["result"] == "Succeeded" && st["readyRanks"] == 4
    })
    .await;
    let o = with_log(o, &nodes).await?;
    let lr = status(&o)["lastRemap"].clone();
    println!("lastRemap: {lr}");
    ensure!(
        lr["expertsMoved"].as_u64().unwrap_or(0) > 0,
        "no expert moved: {lr}"
    );
    // Two pods, each serving two ranks on 8080 and 8081, all on the committed placement.
    let (generation, doc) = committed_placement(&client, ns, name).await?;
    ensure!(generation >= 1, "generation {generation}");
    check_every_expert_served(&doc, 4, 8)?;
    let pods = worker_pods(&client, ns, name).await?;
    ensure!(pods.len() == 2, "{} worker pods for 4 ranks", pods.len());
    let mut ranks = Vec::new();
    for p in &pods {
        let ip = pod_ip(p).context("pod without IP")?;
        for port in [WORKER_HTTP_PORT, WORKER_HTTP_PORT + 1] {
            let (code, body) =
                moe_e2e::http::get(&ip, port, "/v1/status", Duration::from_secs(3)).await?;
            ensure!(code == 200, "GET {ip}:{port}/v1/status: {code} {body}");
            let st: Value = serde_json::from_str(&body)?;
            ensure!(
                st["placementGeneration"] == doc["generation"],
                "{ip}:{port} serves generation {} of {}",
                st["placementGeneration"],
                doc["generation"]
            );
            ranks.push(st["rank"].as_u64().context("rank")?);
        }
    }
    ranks.sort_unstable();
    ensure!(ranks == vec![0, 1, 2, 3], "ranks served: {ranks:?}");
    check_record_through_port_forward(&cluster, &nodes, ns, name, &pods, &doc).await
}

/// On the real node: `moectl record --deployment` finds the 4 ranks from the 2 pods (ports
/// `http` and `http-1`) and reaches them through the API server's port-forward (the kubelet
/// connects to the worker on the pod's loopback); each window it records equals the four ranks'
/// own windows of that end step, summed, as read from the pod IPs directly, none from before
/// the recording began. The recording carries the committed placement (`placement`), and
/// `moectl backtest` replays it with no layout flags.
async fn check_record_through_port_forward(
    cluster: &moe_e2e::Cluster,
    nodes: &moe_e2e::Nodes,
    ns: &str,
    name: &str,
    pods: &[k8s_openapi::api::core::v1::Pod],
    committed: &Value,
) -> Result<()> {
    if !nodes.is_real() {
        println!("kubelet stand-in: no port-forward, moectl record --deployment not checked");
        return Ok(());
    }
    let moectl = moe_e2e::agent::images::find_workspace_binary("moectl")
        .context("moectl is not built: cargo build -p moectl")?;
    // Every rank's windows (16 kept, one per 5 s), read before and after the recording: a
    // window recorded was kept by every rank at one of the two reads.
    let read_windows = || async {
        let mut windows: std::collections::BTreeMap<u64, Vec<Vec<f64>>> = Default::default();
        let mut per_end: std::collections::BTreeMap<u64, usize> = Default::default();
        for p in pods {
            let ip = pod_ip(p).context("pod without IP")?;
            for port in [WORKER_HTTP_PORT, WORKER_HTTP_PORT + 1] {
                let (code, body) =
                    moe_e2e::http::get(&ip, port, "/v1/load?history=16", Duration::from_secs(3))
                        .await?;
                ensure!(code == 200, "GET {ip}:{port}/v1/load: {code} {body}");
                let report: Value = serde_json::from_str(&body)?;
                for w in report["history"].as_array().context("history")? {
                    let end = w["endStep"].as_u64().context("endStep")?;
                    let counts: Vec<Vec<f64>> = serde_json::from_value(w["logicalCounts"].clone())?;
                    *per_end.entry(end).or_default() += 1;
                    let sum = windows
                        .entry(end)
                        .or_insert_with(|| counts.iter().map(|l| vec![0.0; l.len()]).collect());
                    for (s, l) in sum.iter_mut().zip(&counts) {
                        for (a, b) in s.iter_mut().zip(l) {
                            *a += b;
                        }
                    }
                }
            }
        }
        // Only the windows all four ranks reported.
        windows.retain(|end, _| per_end[end] == 4);
        anyhow::Ok(windows)
    };
    // A deployment that does not exist is named as such, before any pod is looked for.
    let missing = tokio::process::Command::new(&moectl)
        .args(["record", "--deployment", "nope", "-n", ns, "--output"])
        .arg(std::env::temp_dir().join("moe-e2e-nope.json"))
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .output()
        .await?;
    let said_missing = String::from_utf8_lossy(&missing.stderr);
    ensure!(
        !missing.status.success()
            && said_missing.contains(&format!("there is no MoEDeployment nope in namespace {ns}")),
        "moectl record --deployment nope: {said_missing}"
    );
    let before = read_windows().await?;
    // A new recording leaves out the windows the ranks kept from before it began.
    let newest_before = before.keys().max().copied().unwrap_or(0);
    let out = tempfile::tempdir()?;
    let file = out.path().join("traffic.json");
    let run = tokio::process::Command::new(&moectl)
        .args(["record", "--deployment", name, "-n", ns, "--windows", "3"])
        .args(["--poll-seconds", "1", "--idle-seconds", "60", "--output"])
        .arg(&file)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .output()
        .await?;
    let said = String::from_utf8_lossy(&run.stderr);
    ensure!(run.status.success(), "moectl record --deployment: {said}");
    ensure!(
        said.contains("4 ranks through the API server"),
        "moectl record should name the 4 ranks it found:\n{said}"
    );
    let mut direct = before;
    direct.extend(read_windows().await?);
    let rec: Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let ends = rec["endSteps"].as_array().context("endSteps")?;
    ensure!(ends.len() == 3, "{} windows recorded:\n{said}", ends.len());
    let first_start =
        ends[0].as_u64().context("endStep")? - rec["steps"][0].as_u64().context("steps")?;
    ensure!(
        first_start >= newest_before,
        "the first recorded window begins at step {first_start}, before the recording began \
         (the ranks had closed a window at {newest_before})"
    );
    for (w, end) in ends.iter().enumerate() {
        let end = end.as_u64().context("endStep")?;
        let recorded: Vec<Vec<f64>> = serde_json::from_value(rec["windows"][w].clone())?;
        let expected = direct
            .get(&end)
            .with_context(|| format!("window ending at step {end}: not read from the ranks"))?;
        ensure!(
            &recorded == expected,
            "window ending at {end}: recorded {recorded:?}, the ranks' sum {expected:?}"
        );
        ensure!(
            recorded.iter().flatten().sum::<f64>() > 0.0,
            "window ending at {end} is empty"
        );
    }
    ensure!(
        rec["placement"]["phy2log"] == committed["phy2log"],
        "recorded placement {} is not the committed {}",
        rec["placement"],
        committed
    );
    let replay = tokio::process::Command::new(&moectl)
        .args(["backtest", "--history", "1", "--load"])
        .arg(&file)
        .output()
        .await?;
    let replayed = String::from_utf8_lossy(&replay.stderr);
    ensure!(
        replay.status.success() && replayed.contains("starts from the placement the group served"),
        "moectl backtest on the recording: {replayed}"
    );
    // The deployment's spec.eplb (the CRD's defaults filled in by the API server) came along,
    // and the findings speak of it.
    ensure!(
        rec["deployment"] == format!("{ns}/{name}").as_str()
            && rec["eplb"]["imbalanceThreshold"] == 1.1
            && rec["eplb"]["historyWindows"] == 4,
        "recorded settings: {} {}",
        rec["deployment"],
        rec["eplb"]
    );
    // The bytes of one expert as the operator's byte budget counts them (spec.model: hidden
    // 64, intermediate 32, bf16 gate, up and down), and a clock dating the windows, so that
    // maxBytesPerRemap and replanIntervalSeconds are replayed.
    ensure!(
        rec["expertBytes"] == 3 * 64 * 32 * 2,
        "recorded expertBytes {}",
        rec["expertBytes"]
    );
    let clock: Vec<[f64; 2]> = serde_json::from_value(rec["clock"].clone())?;
    ensure!(
        !clock.is_empty()
            && clock
                .windows(2)
                .all(|p| p[1][0] > p[0][0] && p[1][1] > p[0][1]),
        "recorded clock {clock:?}"
    );
    let findings = String::from_utf8_lossy(&replay.stdout);
    ensure!(
        findings.contains(&format!("- {ns}/{name} as recorded (historyWindows 4")),
        "moectl backtest's findings: {findings}"
    );
    println!("moectl record --deployment through the port-forward: {said}");
    Ok(())
}

/// Each remap is reported by its own `RemapStarted` and `RemapFinished` events naming its
/// generation (`kubectl get events` is the history users read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remap_events_name_each_generation() -> Result<()> {
    moe_e2e::init_tracing();
    let Some((cluster, nodes)) =
        cluster_with_operator("remap_events_name_each_generation", 2).await?
    else {
        return Ok(());
    };
    let client = cluster.client();
    let (ns, name) = ("ml", "history");
    create_namespace(&cluster, ns).await?;
    let obj = small_moed(
        name,
        "Linear",
        json!({"enabled": false}),
        json!({"skew": 1.5, "drift": 0.02}),
    );
    apply_moed(&client, ns, &obj).await?;
    for (g, request) in [(1u64, "first"), (2, "second")] {
        crate::failures::start_manual_remap(&client, &nodes, ns, name, request, g).await?;
        let o = wait_status(&client, ns, name, T, "remap recorded", |st| {
            st["lastRemap"]["generation"].as_u64() == Some(g) && st["remap"].is_null()
        })
        .await;
        with_log(o, &nodes).await?;
    }
    for g in [1, 2] {
        let (started, finished) = remap_events(&client, ns, name, g).await?;
        ensure!(
            (started, finished) == (1, 1),
            "generation {g}: {started} RemapStarted and {finished} RemapFinished events name it (want 1 and 1)\n{}",
            cluster.run_kubectl(&["get", "events", "-n", ns])?
        );
    }
    Ok(())
}
