//! Scenario 6 (benchmark, `#[ignore]`d; not a timed test): one operator (installed by Helm,
//! running as a pod) with 200 MoEDeployments whose worker pods use the agent's fake-image mode
//! (Ready at once, no process). Prints reconcile latencies and the operator's memory as a
//! Markdown table (docs/benchmarks/e2e-scale.md):
//!
//! ```text
//! cargo test -p moe-e2e --test product -- --ignored --nocapture scale_
//! MOE_E2E_SCALE_N=50 ...        # other sizes; MOE_E2E_SCALE_OUT=file also writes the table
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use moe_e2e::{AgentConfig, ImageMap};
use serde_json::json;

use crate::common::*;

fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of the process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit(')').next()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Sum and count of a Prometheus histogram / counter family in `text`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: 200 MoEDeployments (minutes); run with --ignored --nocapture"]
async fn scale_200_deployments() -> Result<()> {
    moe_e2e::init_tracing();
    let n: usize = std::env::var("MOE_E2E_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if let Err(why) = moe_e2e::Bins::locate() {
        moe_e2e::cluster::print_skip("scale_200_deployments", &why);
        return Ok(());
    }
    // Node health is not what this measures: on a loaded 2-core machine the agent's node
    // heartbeats can be late, and the node lifecycle controller would then mark the pods of
    // that node NotReady (the agent does not re-assert readiness afterwards).
    let mut cluster = moe_e2e::Cluster::start_with(moe_e2e::ClusterOptions {
        controller_manager_args: vec!["--node-monitor-grace-period=10m".into()],
        ..Default::default()
    })
    .await?;
    // 8 nodes x 64 GPUs x 110 pods: room for 400 worker pods. Worker images are fake.
    let images = ImageMap::new()
        .fake("moe-worker")
        .merge(ImageMap::workspace_default());
    let agent = cluster
        .start_agent(AgentConfig::gpu_nodes(8, 64).images(images))
        .await?;
    helm_install(&cluster, &["--set", "operator.logLevel=warn"]).await?;
    let client = cluster.client();
    let ns = "scale";
    create_namespace(&cluster, ns).await?;
    let op = operator_pod(&client).await?;
    let op_ip = pod_ip(&op).context("operator IP")?;
    let op_pid = agent
        .container_pid(OPERATOR_NS, &op.name_any(), "operator")
        .context("operator pid")?;
    let rss_idle = proc_status(op_pid, "VmRSS:").unwrap_or(0);
    let cpu0 = cpu_seconds(op_pid).unwrap_or(0.0);

    // Create N deployments as fast as the API server takes them (in a task), while this loop
    // polls: latency of each object counts from its own create.
    let api = moed_api(&client, ns);
    let created: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let t0 = Instant::now();
    let creator = {
        let (api, created) = (api.clone(), created.clone());
        tokio::spawn(async move {
            for i in 0..n {
                let name = format!("s{i:03}");
                let mut o = small_moed(
                    &name,
                    "RoundRobin",
                    json!({"pollIntervalSeconds": 15}),
                    json!({}),
                );
                o["spec"]["worker"]["resources"] = json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"nvidia.com/gpu": "1"}});
                let at = Instant::now();
                api.create(&PostParams::default(), &serde_json::from_value(o)?)
                    .await?;
                created.lock().unwrap().insert(name, at);
            }
            anyhow::Ok(Instant::now())
        })
    };

    // Latencies: create -> status.observedGeneration (first reconcile published), create ->
    // StatefulSet exists, create -> readyRanks 2 (fake pods Ready, seen by the operator).
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let mut first_status: BTreeMap<String, f64> = BTreeMap::new();
    let mut first_sts: BTreeMap<String, f64> = BTreeMap::new();
    let mut first_ready: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut rss_peak = 0;
    while first_ready.len() < n && Instant::now() < deadline {
        let (objs, stss) = (
            api.list(&ListParams::default()).await?.items,
            sts_api.list(&ListParams::default()).await?.items,
        );
        let now = Instant::now();
        let created_now = created.lock().unwrap().clone();
        let since = |name: &str| created_now.get(name).map(|c| (now - *c).as_secs_f64());
        for o in objs {
            let name = o.name_any();
            let Some(since) = since(&name) else { continue };
            let st = status(&o);
            if st["observedGeneration"].as_i64() == o.metadata.generation {
                first_status.entry(name.clone()).or_insert(since);
            }
            if st["readyRanks"].as_u64() == Some(2) {
                first_ready.entry(name.clone()).or_insert(since);
            }
        }
        for s in stss {
            let name = s.name_any();
            if let Some(since) = since(&name) {
                first_sts.entry(name).or_insert(since);
            }
        }
        rss_peak = rss_peak.max(proc_status(op_pid, "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let create_s = (creator.await?? - t0).as_secs_f64();
    let created = created.lock().unwrap().clone();
    ensure!(
        first_ready.len() == n,
        "only {} of {n} deployments reached 2 ready ranks; operator log:\n{}",
        first_ready.len(),
        operator_log(&moe_e2e::Nodes::StandIn(agent.clone())).await
    );
    let all_ready_s = t0.elapsed().as_secs_f64();

    // Steady state: 60 s with nothing changing.
    let metrics = || async {
        let (_, body) =
            moe_e2e::http::get(&op_ip, 8080, "/metrics", Duration::from_secs(5)).await?;
        anyhow::Ok(body)
    };
    let m0 = metrics().await?;
    let cpu1 = cpu_seconds(op_pid).unwrap_or(0.0);
    let steady = Duration::from_secs(60);
    let ts = Instant::now();
    while ts.elapsed() < steady {
        rss_peak = rss_peak.max(proc_status(op_pid, "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let m1 = metrics().await?;
    let cpu2 = cpu_seconds(op_pid).unwrap_or(0.0);
    let rss_steady = proc_status(op_pid, "VmRSS:").unwrap_or(0);
    let rec = |m: &str| metric_sum(m, "controller_runtime_reconcile_total");
    let reconciles = rec(&m1) - rec(&m0);
    let time_sum = metric_sum(&m1, "controller_runtime_reconcile_time_seconds_sum")
        - metric_sum(&m0, "controller_runtime_reconcile_time_seconds_sum");
    let time_cnt = metric_sum(&m1, "controller_runtime_reconcile_time_seconds_count")
        - metric_sum(&m0, "controller_runtime_reconcile_time_seconds_count");

    // A spec change on every deployment: create -> observedGeneration caught up.
    let t1 = Instant::now();
    let mut patched: BTreeMap<String, (Instant, i64)> = BTreeMap::new();
    for name in created.keys() {
        let o = api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"eplb": {"imbalanceThreshold": 1.3}}})),
            )
            .await?;
        patched.insert(
            name.clone(),
            (Instant::now(), o.metadata.generation.unwrap_or(0)),
        );
    }
    let mut update_lat: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while update_lat.len() < n && Instant::now() < deadline {
        let now = Instant::now();
        for o in api.list(&ListParams::default()).await?.items {
            let name = o.name_any();
            if let Some((at, g)) = patched.get(&name)
                && status(&o)["observedGeneration"].as_i64() >= Some(*g)
            {
                update_lat.entry(name).or_insert((now - *at).as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        update_lat.len() == n,
        "only {} of {n} updates observed",
        update_lat.len()
    );
    let update_all_s = t1.elapsed().as_secs_f64();
    let pods_running: BTreeSet<String> = agent.pods().into_iter().collect();

    let row = |what: &str, m: &BTreeMap<String, f64>| {
        let mut v: Vec<f64> = m.values().copied().collect();
        format!(
            "| {what} | {:.2} | {:.2} | {:.2} | {:.2} |",
            pct(&mut v, 0.5),
            pct(&mut v, 0.9),
            pct(&mut v, 0.99),
            pct(&mut v, 1.0)
        )
    };
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let table = format!(
        "{n} MoEDeployments (2 fake-image ranks each, {} pods on the agent), one operator pod (`{}`), \
         {} CPUs ({host}), load average at the end {}\n\n\
         | latency from create (s) | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n{}\n{}\n{}\n{}\n\n\
         | | value |\n|---|---|\n\
         | create {n} objects (one client, sequential, while the operator works) | {create_s:.1} s |\n\
         | all {n} with 2 ready ranks in status | {all_ready_s:.1} s after the first create |\n\
         | spec change on all {n}: all observed | {update_all_s:.1} s after the first patch |\n\
         | operator RSS before / peak / steady | {:.1} / {:.1} / {:.1} MiB |\n\
         | operator CPU: creating + settling / 60 s steady | {:.1} s / {:.1} s |\n\
         | reconciles in 60 s steady (all deployments) | {reconciles:.0} ({:.2}/s) |\n\
         | mean reconcile time in steady state | {:.1} ms |\n",
        pods_running.len(),
        std::fs::read_link(format!("/proc/{op_pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        row("status.observedGeneration published", &first_status),
        row("StatefulSet created", &first_sts),
        row("status readyRanks = 2", &first_ready),
        row("spec change observed (from its patch)", &update_lat),
        rss_idle as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_steady as f64 / 1024.0,
        cpu1 - cpu0,
        cpu2 - cpu1,
        reconciles / steady.as_secs_f64(),
        if time_cnt > 0.0 {
            1000.0 * time_sum / time_cnt
        } else {
            f64::NAN
        },
    );
    println!("\n{table}");
    if let Ok(path) = std::env::var("MOE_E2E_SCALE_OUT") {
        std::fs::write(&path, &table)?;
    }
    Ok(())
}
