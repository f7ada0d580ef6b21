//! The chart's Prometheus-operator objects (`ServiceMonitor`, `PodMonitor`, `PrometheusRule`),
//! as `helm template` renders them, turned into a plain Prometheus configuration: the scrape
//! jobs the Prometheus operator would generate for them (`kubernetes_sd_configs` against the
//! test's API server) and the rule file. The e2e cluster has no Prometheus operator, so the
//! alert scenario does its translation here; deriving it from the rendered objects (and not
//! writing scrape jobs by hand) is what makes the scenario test the chart's selectors, ports,
//! paths, intervals, `honorLabels` and relabelings. Fields the translation does not know fail
//! it, so a chart change is never silently dropped.
//!
//! The generated relabelings follow the Prometheus operator's (v0.8x) for these objects: keep
//! by the selector's labels and the endpoint's port name, the `namespace`, `service`, `pod`,
//! `container` and `endpoint` target labels, drop finished pods, and the `job` label (the
//! Service's name for a ServiceMonitor, `<namespace>/<name>` for a PodMonitor), then the
//! object's own relabelings.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The rendered documents of a `helm template` output, as JSON values (empty ones skipped).
pub fn parse_documents(rendered: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = Value::deserialize(doc).context("parsing helm template output")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The documents of `kind`.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// How a ServiceMonitor's targets are discovered.
#[derive(Debug, Clone)]
pub enum ServiceTargets {
    /// Through the Services' EndpointSlices (`role: endpointslice`), as the Prometheus operator
    /// does. Needs pods whose IPs the API server accepts in EndpointSlices (the real node).
    EndpointSlices,
    /// Through the pods behind these Services (`role: pod`, kept by each Service's selector
    /// and its target port): the kubelet stand-in's pods have loopback IPs, which the API
    /// server refuses in EndpointSlices, so their Services have no endpoints.
    PodsBehind(Vec<ServiceInfo>),
}

/// What the pod-role translation needs of a Service.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Map<String, Value>,
    /// The Service's pod selector.
    pub selector: Map<String, Value>,
    /// Service port name -> target port (a container port name or number, as text).
    pub target_ports: Vec<(String, String)>,
}

/// The scrape jobs for every ServiceMonitor and PodMonitor in `docs`, discovering targets
/// through the API server of `kubeconfig`.
pub fn scrape_configs(
    docs: &[Value],
    kubeconfig: &Path,
    services: &ServiceTargets,
) -> Result<Vec<Value>> {
    let mut jobs = Vec::new();
    for m in of_kind(docs, "ServiceMonitor") {
        jobs.extend(service_monitor_jobs(m, kubeconfig, services)?);
    }
    for m in of_kind(docs, "PodMonitor") {
        jobs.extend(pod_monitor_jobs(m, kubeconfig)?);
    }
    Ok(jobs)
}

/// The rule file of every PrometheusRule in `docs` (their groups, unchanged).
pub fn rule_file(docs: &[Value]) -> Result<Value> {
    let mut groups = Vec::new();
    for r in of_kind(docs, "PrometheusRule") {
        let g = r["spec"]["groups"].as_array().with_context(|| {
            format!(
                "PrometheusRule {}: spec.groups is not a list",
                r["metadata"]["name"]
            )
        })?;
        groups.extend(g.iter().cloned());
    }
    ensure!(
        !groups.is_empty(),
        "no PrometheusRule groups rendered (prometheusRule.enabled?)"
    );
    Ok(json!({ "groups": groups }))
}

/// Prometheus' label-name sanitising of Kubernetes label names (`app.kubernetes.io/name` ->
/// `app_kubernetes_io_name`), as in the `__meta_kubernetes_*_label_*` names.
pub fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn name_of(m: &Value) -> Result<(String, String)> {
    let kind = m["kind"].as_str().unwrap_or("object");
    let name = m["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{kind} without metadata.name"))?;
    let ns = m["metadata"]["namespace"]
        .as_str()
        .with_context(|| format!("{kind} {name} without metadata.namespace (render with -n)"))?;
    Ok((ns.to_string(), name.to_string()))
}

/// `matchLabels` of a label selector; `matchExpressions` are refused (not translated).
fn match_labels(selector: &Value, what: &str) -> Result<Map<String, Value>> {
    ensure!(
        selector.get("matchExpressions").is_none(),
        "{what}: selector.matchExpressions is not translated (e2e/tests/product/monitors.rs)"
    );
    let labels = selector["matchLabels"]
        .as_object()
        .cloned()
        .with_context(|| format!("{what}: selector.matchLabels missing"))?;
    ensure!(
        !labels.is_empty(),
        "{what}: empty selector.matchLabels would select everything"
    );
    Ok(labels)
}

/// `namespaces:` of a kubernetes_sd_config for a monitor's `namespaceSelector` (`None`: all).
fn namespaces(m: &Value, own_ns: &str, what: &str) -> Result<Option<Vec<Value>>> {
    let sel = &m["spec"]["namespaceSelector"];
    if sel.is_null() {
        return Ok(Some(vec![json!(own_ns)]));
    }
    if sel["any"] == true {
        return Ok(None);
    }
    let names = sel["matchNames"]
        .as_array()
        .with_context(|| format!("{what}: namespaceSelector without any: true or matchNames"))?;
    Ok(Some(names.clone()))
}

/// `keep` relabelings for each selector label, on the labels of `meta` (`service`, `pod`).
fn keep_selected(labels: &Map<String, Value>, meta: &str) -> Result<Vec<Value>> {
    labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .with_context(|| format!("selector label {k}: not a string"))?;
            let k = sanitize(k);
            Ok(json!({
                "action": "keep",
                "source_labels": [format!("__meta_kubernetes_{meta}_label_{k}"),
                                  format!("__meta_kubernetes_{meta}_labelpresent_{k}")],
                "regex": format!("({});true", regex_escape(v)),
            }))
        })
        .collect()
}

/// RE2-escapes a literal label value.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Prometheus-operator `RelabelConfig` (camelCase) as a Prometheus `relabel_config`.
fn relabel_config(r: &Value, what: &str) -> Result<Value> {
    let obj = r
        .as_object()
        .with_context(|| format!("{what}: a relabeling is not an object"))?;
    let mut out = Map::new();
    for (k, v) in obj {
        let key = match k.as_str() {
            "sourceLabels" => "source_labels",
            "targetLabel" => "target_label",
            "separator" | "regex" | "modulus" | "replacement" => k.as_str(),
            "action" => {
                let a = v
                    .as_str()
                    .with_context(|| format!("{what}: action is not a string"))?;
                out.insert("action".into(), json!(a.to_ascii_lowercase()));
                continue;
            }
            other => bail!(
                "{what}: relabeling field {other:?} is not translated (e2e/tests/product/monitors.rs)"
            ),
        };
        out.insert(key.into(), v.clone());
    }
    Ok(Value::Object(out))
}

fn relabel_list(v: &Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(rs) => rs.iter().map(|r| relabel_config(r, what)).collect(),
        _ => bail!("{what}: not a list"),
    }
}

/// The fields of an endpoint the translation knows; anything else fails it.
const ENDPOINT_FIELDS: &[&str] = &[
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
    "scheme",
];

/// What a ServiceMonitor and a PodMonitor have alike: their name, the label selector, the
/// namespaces to discover in, and the list of endpoints (under `endpoints_key`).
struct Monitor<'a> {
    ns: String,
    name: String,
    /// "Kind ns/name", for error messages.
    what: String,
    selector: Map<String, Value>,
    sd_namespaces: Option<Vec<Value>>,
    endpoints: &'a Vec<Value>,
}

impl<'a> Monitor<'a> {
    fn read(m: &'a Value, kind: &str, endpoints_key: &str) -> Result<Self> {
        let (ns, name) = name_of(m)?;
        let what = format!("{kind} {ns}/{name}");
        let selector = match_labels(&m["spec"]["selector"], &what)?;
        let sd_namespaces = namespaces(m, &ns, &what)?;
        ensure!(
            m["spec"].get("jobLabel").is_none(),
            "{what}: jobLabel is not translated"
        );
        let endpoints = m["spec"][endpoints_key]
            .as_array()
            .with_context(|| format!("{what}: spec.{endpoints_key} missing"))?;
        Ok(Monitor {
            ns,
            name,
            what,
            selector,
            sd_namespaces,
            endpoints,
        })
    }
}

/// The parts of a scrape job that do not depend on the discovery role.
fn base_job(job_name: String, ep: &Value, what: &str) -> Result<(Map<String, Value>, String)> {
    let ep_obj = ep
        .as_object()
        .with_context(|| format!("{what}: endpoint is not an object"))?;
    if let Some(k) = ep_obj
        .keys()
        .find(|k| !ENDPOINT_FIELDS.contains(&k.as_str()))
    {
        bail!("{what}: endpoint field {k:?} is not translated (e2e/tests/product/monitors.rs)");
    }
    let port = ep["port"]
        .as_str()
        .with_context(|| format!("{what}: endpoint without a named port"))?
        .to_string();
    let mut job = Map::new();
    job.insert("job_name".into(), json!(job_name));
    job.insert(
        "honor_labels".into(),
        json!(ep["honorLabels"].as_bool().unwrap_or(false)),
    );
    job.insert(
        "metrics_path".into(),
        json!(ep["path"].as_str().unwrap_or("/metrics")),
    );
    job.insert(
        "scheme".into(),
        json!(ep["scheme"].as_str().unwrap_or("http")),
    );
    if let Some(i) = ep["interval"].as_str() {
        job.insert("scrape_interval".into(), json!(i));
    }
    if let Some(t) = ep["scrapeTimeout"].as_str() {
        job.insert("scrape_timeout".into(), json!(t));
    }
    let metric = relabel_list(
        &ep["metricRelabelings"],
        &format!("{what} metricRelabelings"),
    )?;
    if !metric.is_empty() {
        job.insert("metric_relabel_configs".into(), json!(metric));
    }
    Ok((job, port))
}

fn sd_config(role: &str, kubeconfig: &Path, ns: Option<Vec<Value>>) -> Value {
    let mut sd = json!({"role": role, "kubeconfig_file": kubeconfig.to_string_lossy()});
    if let Some(names) = ns {
        sd["namespaces"] = json!({ "names": names });
    }
    json!([sd])
}

/// Target labels every generated job sets from pod metadata, and the drop of finished pods.
fn pod_target_labels() -> Vec<Value> {
    vec![
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
        json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}),
    ]
}

fn service_monitor_jobs(
    m: &Value,
    kubeconfig: &Path,
    services: &ServiceTargets,
) -> Result<Vec<Value>> {
    let Monitor {
        ns,
        name,
        what,
        selector,
        sd_namespaces,
        endpoints,
    } = Monitor::read(m, "ServiceMonitor", "endpoints")?;
    let mut jobs = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let (mut job, port) = base_job(format!("serviceMonitor/{ns}/{name}/{i}"), ep, &what)?;
        let mut relabel =
            vec![json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"})];
        match services {
            ServiceTargets::EndpointSlices => {
                job.insert(
                    "kubernetes_sd_configs".into(),
                    sd_config("endpointslice", kubeconfig, sd_namespaces.clone()),
                );
                relabel.extend(keep_selected(&selector, "service")?);
                relabel.push(json!({"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                                    "regex": regex_escape(&port)}));
                relabel.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}));
                relabel.extend(pod_target_labels());
                relabel.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"}));
            }
            ServiceTargets::PodsBehind(all) => {
                // The Services the selector picks, in the namespaces the monitor covers.
                let picked: Vec<&ServiceInfo> = all
                    .iter()
                    .filter(|s| {
                        sd_namespaces
                            .as_ref()
                            .is_none_or(|n| n.contains(&json!(s.namespace)))
                    })
                    .filter(|s| selector.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
                    .collect();
                let [svc] = picked.as_slice() else {
                    bail!(
                        "{what}: the pod-role translation needs exactly one selected Service, found {}",
                        picked.len()
                    );
                };
                let target = svc
                    .target_ports
                    .iter()
                    .find(|(n, _)| *n == port)
                    .map(|(_, t)| t.clone())
                    .with_context(|| {
                        format!("{what}: Service {} has no port {port:?}", svc.name)
                    })?;
                job.insert(
                    "kubernetes_sd_configs".into(),
                    sd_config("pod", kubeconfig, Some(vec![json!(svc.namespace)])),
                );
                relabel.extend(keep_selected(&svc.selector, "pod")?);
                let port_label = if target.parse::<u16>().is_ok() {
                    "__meta_kubernetes_pod_container_port_number"
                } else {
                    "__meta_kubernetes_pod_container_port_name"
                };
                relabel.push(json!({"action": "keep", "source_labels": [port_label], "regex": regex_escape(&target)}));
                relabel.push(json!({"target_label": "service", "replacement": svc.name}));
                relabel.extend(pod_target_labels());
                relabel.push(json!({"target_label": "job", "replacement": svc.name}));
            }
        }
        relabel.push(json!({"target_label": "endpoint", "replacement": port}));
        relabel.extend(relabel_list(
            &ep["relabelings"],
            &format!("{what} relabelings"),
        )?);
        job.insert("relabel_configs".into(), json!(relabel));
        jobs.push(Value::Object(job));
    }
    Ok(jobs)
}

fn pod_monitor_jobs(m: &Value, kubeconfig: &Path) -> Result<Vec<Value>> {
    let Monitor {
        ns,
        name,
        what,
        selector,
        sd_namespaces,
        endpoints,
    } = Monitor::read(m, "PodMonitor", "podMetricsEndpoints")?;
    let mut jobs = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let (mut job, port) = base_job(format!("podMonitor/{ns}/{name}/{i}"), ep, &what)?;
        job.insert(
            "kubernetes_sd_configs".into(),
            sd_config("pod", kubeconfig, sd_namespaces.clone()),
        );
        let mut relabel =
            vec![json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"})];
        relabel.extend(keep_selected(&selector, "pod")?);
        relabel.push(
            json!({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                            "regex": regex_escape(&port)}),
        );
        relabel.extend(pod_target_labels());
        relabel.push(json!({"target_label": "job", "replacement": format!("{ns}/{name}")}));
        relabel.push(json!({"target_label": "endpoint", "replacement": port}));
        relabel.extend(relabel_list(
            &ep["relabelings"],
            &format!("{what} relabelings"),
        )?);
        job.insert("relabel_configs".into(), json!(relabel));
        jobs.push(Value::Object(job));
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MONITORS: &str = r#"
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: op, namespace: sys}
spec:
  namespaceSelector: {matchNames: [sys]}
  selector: {matchLabels: {app.kubernetes.io/name: op}}
  endpoints:
    - {port: http-metrics, path: /metrics, interval: 2s, scrapeTimeout: 1s, honorLabels: true}
---
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata: {name: op-workers, namespace: sys}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: worker}}
  namespaceSelector: {any: true}
  podMetricsEndpoints:
    - port: http
      relabelings:
        - {sourceLabels: [__meta_kubernetes_pod_label_d], targetLabel: moe_deployment}
"#;

    #[test]
    fn monitors_become_kubernetes_sd_jobs() -> Result<()> {
        let docs = parse_documents(MONITORS)?;
        let kc = Path::new("/k");
        let jobs = scrape_configs(&docs, kc, &ServiceTargets::EndpointSlices)?;
        assert_eq!(jobs.len(), 2);
        let op = &jobs[0];
        assert_eq!(op["job_name"], "serviceMonitor/sys/op/0");
        assert_eq!(op["honor_labels"], true);
        assert_eq!(op["scrape_interval"], "2s");
        assert_eq!(op["kubernetes_sd_configs"][0]["role"], "endpointslice");
        assert_eq!(
            op["kubernetes_sd_configs"][0]["namespaces"]["names"],
            json!(["sys"])
        );
        let rl = op["relabel_configs"].as_array().unwrap();
        assert!(rl.contains(&json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_service_label_app_kubernetes_io_name",
                              "__meta_kubernetes_service_labelpresent_app_kubernetes_io_name"],
            "regex": "(op);true"})));
        assert!(rl.contains(
            &json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"})
        ));
        let w = &jobs[1];
        assert_eq!(w["job_name"], "podMonitor/sys/op-workers/0");
        assert!(
            w["kubernetes_sd_configs"][0].get("namespaces").is_none(),
            "any: true"
        );
        let rl = w["relabel_configs"].as_array().unwrap();
        assert!(rl.contains(&json!({"target_label": "job", "replacement": "sys/op-workers"})));
        assert_eq!(
            rl.last().unwrap(),
            &json!({"source_labels": ["__meta_kubernetes_pod_label_d"], "target_label": "moe_deployment"}),
            "the monitor's own relabelings come last"
        );
        // The stand-in: the Service's pods, by its selector and target port.
        let svc = ServiceInfo {
            namespace: "sys".into(),
            name: "op-metrics".into(),
            labels: json!({"app.kubernetes.io/name": "op"})
                .as_object()
                .unwrap()
                .clone(),
            selector: json!({"app": "op"}).as_object().unwrap().clone(),
            target_ports: vec![("http-metrics".into(), "http".into())],
        };
        let jobs = scrape_configs(&docs, kc, &ServiceTargets::PodsBehind(vec![svc]))?;
        let rl = jobs[0]["relabel_configs"].as_array().unwrap();
        assert!(rl.contains(&json!({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http"})));
        assert!(rl.contains(&json!({"target_label": "job", "replacement": "op-metrics"})));
        Ok(())
    }

    #[test]
    fn unknown_fields_are_refused() {
        let docs = parse_documents(&MONITORS.replace(
            "honorLabels: true",
            "honorLabels: true, bearerTokenFile: /t",
        ))
        .unwrap();
        let e =
            scrape_configs(&docs, Path::new("/k"), &ServiceTargets::EndpointSlices).unwrap_err();
        assert!(e.to_string().contains("bearerTokenFile"), "{e}");
        let docs = parse_documents(&MONITORS.replace(
            "targetLabel: moe_deployment",
            "targetLabel: x, action: Replace, foo: 1",
        ))
        .unwrap();
        let e =
            scrape_configs(&docs, Path::new("/k"), &ServiceTargets::EndpointSlices).unwrap_err();
        assert!(e.to_string().contains("\"foo\""), "{e}");
    }
}
