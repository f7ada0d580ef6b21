//! Scenario 12 (issue 14, "Alerts proven, not assumed"): a real Prometheus scrapes the operator
//! and the worker ranks of the quickstart deployment with the chart's scrape configuration and
//! evaluates the chart's alert rules; the imbalance alert fires on the skewed traffic and
//! resolves after the operator's remap.
//!
//! Prometheus (`scripts/prometheus`: built from its Go module, cached) runs as a host process
//! beside the cluster. Its configuration comes from the chart: `helm template` renders the
//! ServiceMonitor, PodMonitor and PrometheusRule (values: `alerts-values.yaml`, which shortens
//! intervals and `for:`), and `monitors.rs` turns the monitors into the scrape jobs the
//! Prometheus operator would generate (Kubernetes service discovery against the test's API
//! server) and the rule into a rule file. The quickstart MoEDeployment starts with EPLB paused,
//! so the imbalance is certain to outlast the alert's `for:`; un-pausing lets the operator
//! remap, which brings the PAR below the alert's threshold.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::common::*;
use crate::monitors::{self, ServiceInfo, ServiceTargets};
use crate::prometheus::{self, Prometheus};

const ALERT: &str = "MoEDeploymentImbalanceHigh";
/// Scrape and evaluation interval (the monitors' `interval` in alerts-values.yaml, too).
const INTERVAL: &str = "2s";

/// The chart's monitors and rule, rendered for the release the scenarios install (`moe` in
/// moe-system) with alerts-values.yaml.
fn render_monitoring(cluster: &moe_e2e::Cluster) -> Result<Vec<Value>> {
    let chart = repo_path("helm/moe-operator");
    let values = repo_path("e2e/tests/product/alerts-values.yaml");
    let rendered = cluster.run_helm(&[
        "template",
        "moe",
        chart.to_str().context("chart path")?,
        "-n",
        OPERATOR_NS,
        "-f",
        values.to_str().context("values path")?,
        "-s",
        "templates/servicemonitor.yaml",
        "-s",
        "templates/podmonitor.yaml",
        "-s",
        "templates/prometheusrule.yaml",
    ])?;
    monitors::parse_documents(&rendered)
}

/// The alert threshold alerts-values.yaml sets (read back, so the two cannot disagree).
fn imbalance_threshold() -> Result<f64> {
    let text = std::fs::read_to_string(repo_path("e2e/tests/product/alerts-values.yaml"))?;
    let v: Value = serde_yaml::from_str(&text)?;
    v["prometheusRule"]["alerts"]["imbalance"]["threshold"]
        .as_f64()
        .context("alerts-values.yaml: prometheusRule.alerts.imbalance.threshold")
}

/// The stand-in's Services have no endpoints (loopback pod IPs): describe the operator
/// namespace's Services for the pod-role translation.
async fn services_of(client: &Client, ns: &str) -> Result<Vec<ServiceInfo>> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for s in api.list(&ListParams::default()).await?.items {
        let spec = s.spec.clone().unwrap_or_default();
        let to_map = |m: Option<std::collections::BTreeMap<String, String>>| {
            m.unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect()
        };
        out.push(ServiceInfo {
            namespace: ns.to_string(),
            name: s.name_any(),
            labels: to_map(s.metadata.labels.clone()),
            selector: to_map(spec.selector),
            target_ports: spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    let target = match p.target_port? {
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                            n.to_string()
                        }
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
                    };
                    Some((p.name?, target))
                })
                .collect(),
        });
    }
    Ok(out)
}

/// The `job="..."` a rule expression selects `metric` by (e.g. `up{job="moe-system/..."}`).
fn job_in_expr(rules: &Value, alert: &str, metric: &str) -> Result<String> {
    let expr = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["alert"] == alert)
        .and_then(|r| r["expr"].as_str().map(str::to_string))
        .with_context(|| format!("rule {alert} not rendered"))?;
    let needle = format!("{metric}{{job=\"");
    let start = expr
        .find(&needle)
        .with_context(|| format!("{alert}: no {needle} in {expr}"))?
        + needle.len();
    let len = expr[start..].find('"').context("unterminated job")?;
    Ok(expr[start..start + len].to_string())
}

/// The imbalance alert of `ns/name` among the active alerts: (state, value).
fn imbalance_alert(alerts: &[Value], ns: &str, name: &str) -> Option<(String, f64, Value)> {
    alerts
        .iter()
        .find(|a| {
            let l = &a["labels"];
            l["alertname"] == ALERT && l["namespace"] == ns && l["name"] == name
        })
        .map(|a| {
            (
                a["state"].as_str().unwrap_or_default().to_string(),
                a["value"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
                a.clone(),
            )
        })
}

/// Waits until the active targets are exactly `want` — (job, namespace, pod) — all `up`;
/// returns them.
async fn targets_up(
    prom: &Prometheus,
    want: &BTreeSet<(String, String, String)>,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let targets = prom.targets().await?;
        let seen: BTreeSet<(String, String, String)> = targets
            .iter()
            .map(|t| {
                let l = &t["labels"];
                let s = |k: &str| l[k].as_str().unwrap_or_default().to_string();
                (s("job"), s("namespace"), s("pod"))
            })
            .collect();
        let all_up = targets.iter().all(|t| t["health"] == "up");
        if &seen == want && all_up {
            return Ok(targets);
        }
        if Instant::now() > deadline {
            bail!(
                "scrape targets: want {want:?}, all up; have:\n{}",
                targets
                    .iter()
                    .map(|t| format!("  {} {} {}", t["labels"], t["health"], t["lastError"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_imbalance_fires_on_skew_and_resolves_after_the_remap() -> Result<()> {
    moe_e2e::init_tracing();
    let test = "alerts_imbalance_fires_on_skew_and_resolves_after_the_remap";
    let Some(bin) = prometheus::binary() else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: no Prometheus binary in the e2e cache (run scripts/prometheus)"
        );
        return Ok(());
    };
    let t0 = Instant::now();
    let Some((cluster, nodes)) = cluster_with_operator(test, 2).await? else {
        return Ok(());
    };
    let client = cluster.client();
    let threshold = imbalance_threshold()?;

    // Prometheus, configured from the chart.
    let docs = render_monitoring(&cluster)?;
    let services = if nodes.is_real() {
        ServiceTargets::EndpointSlices
    } else {
        ServiceTargets::PodsBehind(services_of(&client, OPERATOR_NS).await?)
    };
    let scrape = monitors::scrape_configs(&docs, cluster.kubeconfig_path(), &services)?;
    ensure!(
        scrape.len() == 2,
        "expected one ServiceMonitor and one PodMonitor job: {scrape:?}"
    );
    let rules = monitors::rule_file(&docs)?;
    let operator_job = job_in_expr(&rules, "MoEOperatorDown", "up")?;
    let worker_job = job_in_expr(&rules, "MoEDeploymentRanksNotReady", "up")?;
    let prom = Prometheus::start(
        &bin,
        &cluster.dir().join("prometheus"),
        INTERVAL,
        scrape,
        &rules,
    )
    .await?;
    println!(
        "prometheus at {} ({:.1?} after the test started: cluster, node, operator)",
        prom.url(),
        t0.elapsed()
    );

    // The quickstart deployment, EPLB paused: the skew stays until un-paused.
    let (ns, name) = ("ml", "quickstart");
    create_namespace(&cluster, ns).await?;
    let text = std::fs::read_to_string(repo_path("examples/quickstart.yaml"))?;
    let mut obj: Value = serde_yaml::from_str(&text)?;
    merge(&mut obj, json!({"spec": {"eplb": {"paused": true}}}));
    apply_moed(&client, ns, &obj).await?;
    let applied = Instant::now();
    let ready = wait_status(&client, ns, name, T, "Available, 2/2, measured PAR", |st| {
        available_with_par(st, 2)
    })
    .await;
    with_log(ready, &nodes).await?;

    // Pending, then firing, while the placement is still the initial one.
    let mut pending_at = None;
    let firing = loop {
        let alerts = prom.alerts().await?;
        match imbalance_alert(&alerts, ns, name) {
            Some((state, _, _)) if state == "pending" => {
                pending_at.get_or_insert(applied.elapsed());
            }
            Some((state, value, a)) if state == "firing" => break (value, a),
            _ => {}
        }
        if applied.elapsed() > T {
            let st = status(&get_moed(&client, ns, name).await?).clone();
            let targets = prom.targets().await.unwrap_or_default();
            bail!(
                "{ALERT} did not fire for {ns}/{name}; alerts {alerts:?}; status imbalance {}; \
                 targets {targets:?}; Prometheus log:\n{}",
                st["imbalance"],
                prom.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let fired_at = applied.elapsed();
    let (value, alert) = firing;
    // Seen pending by the 0.5 s polls unless the test process lagged (the `for:` is 6 s); the
    // alert's activeAt says when it became pending either way.
    let pending = match pending_at {
        Some(t) => format!("seen pending at {t:.1?}"),
        None => format!("not seen pending (activeAt {})", alert["activeAt"]),
    };
    println!(
        "{ALERT}: {pending}, firing at {fired_at:.1?} after apply (value {value:.3}): {}",
        alert["annotations"]["summary"]
    );
    ensure!(
        value > threshold,
        "firing with value {value} <= threshold {threshold}"
    );
    ensure!(
        alert["labels"]["severity"] == "warning",
        "labels {}",
        alert["labels"]
    );
    ensure!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("{ns}/{name}"))),
        "summary {}",
        alert["annotations"]["summary"]
    );
    let st = status(&get_moed(&client, ns, name).await?).clone();
    ensure!(
        st["lastRemap"].is_null() && st["placement"]["appliedGeneration"] == 0,
        "the alert must fire before any remap: {st}"
    );
    ensure!(
        st["imbalance"]["worstPar"]
            .as_f64()
            .is_some_and(|p| p > threshold),
        "status PAR {} while the alert fires",
        st["imbalance"]["worstPar"]
    );

    // Targets: the operator (through its metrics Service) and every rank, each up, with the
    // job labels the rules select on, and nothing else.
    let op_pod = operator_pod(&client).await?.name_any();
    let mut want = BTreeSet::from([(operator_job.clone(), OPERATOR_NS.to_string(), op_pod)]);
    for p in worker_pods(&client, ns, name).await? {
        want.insert((worker_job.clone(), ns.to_string(), p.name_any()));
    }
    ensure!(want.len() == 3, "operator and 2 ranks expected: {want:?}");
    // (Each target's lastError is in the error; Prometheus' own log says nothing per target.)
    let targets = targets_up(&prom, &want, T).await?;
    for t in &targets {
        let l = &t["labels"];
        if l["job"] == worker_job.as_str() {
            ensure!(
                l["moe_deployment"] == name
                    && l["endpoint"] == "http"
                    && l["container"] == "worker",
                "worker target labels (the PodMonitor's relabeling): {l}"
            );
        } else {
            ensure!(
                l["service"] == operator_job.as_str() && l["endpoint"] == "http-metrics",
                "operator target labels: {l}"
            );
        }
    }
    println!("targets up: {want:?}");

    // Un-pause: the operator remaps; the PAR falls; the alert resolves.
    patch_spec(&client, ns, name, json!({"eplb": {"paused": false}})).await?;
    let unpaused = applied.elapsed();
    let o = wait_status(&client, ns, name, T, "a remap started", |st| {
        !st["remap"].is_null() || st["lastRemap"].is_object()
    })
    .await;
    let o = with_log(o, &nodes).await?;
    let remap_started = applied.elapsed();
    ensure!(
        status(&o)["groupRestarts"].as_u64().unwrap_or(0) == 0,
        "un-pausing EPLB restarted the group: {}",
        status(&o)
    );
    let o = wait_status(
        &client,
        ns,
        name,
        T,
        "lastRemap with a measured parAfter",
        |st| st["lastRemap"]["parAfter"].is_number(),
    )
    .await;
    let o = with_log(o, &nodes).await?;
    let lr = status(&o)["lastRemap"].clone();
    let remapped = applied.elapsed();
    println!("lastRemap: {lr}");
    ensure!(lr["result"] == "Succeeded", "lastRemap {lr}");
    let par_after = lr["parAfter"].as_f64().context("parAfter")?;
    ensure!(
        par_after < threshold,
        "the remap left PAR {par_after} >= {threshold}: {lr}"
    );
    let resolved = loop {
        let alerts = prom.alerts().await?;
        let rule_state = prom
            .alerting_rules()
            .await?
            .into_iter()
            .find(|r| r["name"] == ALERT)
            .map(|r| r["state"].as_str().unwrap_or_default().to_string());
        if imbalance_alert(&alerts, ns, name).is_none() && rule_state.as_deref() == Some("inactive")
        {
            break applied.elapsed();
        }
        if applied.elapsed() > unpaused + T {
            bail!(
                "{ALERT} still active after the remap ({lr}): rule {rule_state:?}, alerts {alerts:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let series = prom
        .query(&format!(
            "moe_deployment_worst_imbalance_ratio{{namespace=\"{ns}\",name=\"{name}\"}}"
        ))
        .await?;
    let scraped: f64 = series
        .first()
        .and_then(|s| s["value"][1].as_str()?.parse().ok())
        .context("no moe_deployment_worst_imbalance_ratio series for the deployment")?;
    ensure!(
        scraped < threshold,
        "resolved, but the scraped PAR is {scraped}"
    );
    println!(
        "remap: PAR {} -> {par_after:.3} (un-paused at {unpaused:.1?}, started at \
         {remap_started:.1?}, parAfter at {remapped:.1?}); \
         {ALERT} resolved at {resolved:.1?} (scraped PAR {scraped:.3})",
        lr["parBefore"]
    );

    // Every rule evaluates without error, and none is pending or firing at the end: among them
    // MoEOperatorDown (`up` and the leader metric under the ServiceMonitor's job) and
    // MoEDeploymentRanksNotReady (the ranks under the PodMonitor's job).
    let rules_now = prom.alerting_rules().await?;
    ensure!(
        rules_now.len() >= 6,
        "alerting rules loaded: {}",
        rules_now.len()
    );
    for r in &rules_now {
        ensure!(
            r["health"] == "ok",
            "rule {} health {}: {}",
            r["name"],
            r["health"],
            r["lastError"]
        );
        ensure!(
            r["state"] == "inactive",
            "rule {} is {} at the end: {}",
            r["name"],
            r["state"],
            r["alerts"]
        );
    }
    println!(
        "{} alerting rules healthy and inactive; {:.1?} since the test started",
        rules_now.len(),
        t0.elapsed()
    );
    Ok(())
}
