#!/usr/bin/env python3
"""Generates helm/moe-operator/values.schema.json (JSON Schema draft-07 for values.yaml).

Edit this file, then run `python3 helm/tools/gen-schema.py`; helm/test.sh fails when the
committed schema differs from what this prints, and checks that every key of values.yaml is
described. Standard library only.
"""
import json
import os
import sys


def obj(props, desc=None, required=None, extra=False):
    o = {"type": "object", "additionalProperties": extra, "properties": props}
    if desc:
        o["description"] = desc
    if required:
        o["required"] = required
    return o


def s(desc, **kw):
    return {"type": "string", "description": desc, **kw}


def b(desc):
    return {"type": "boolean", "description": desc}


def i(desc, minimum=None, maximum=None):
    o = {"type": "integer", "description": desc}
    if minimum is not None:
        o["minimum"] = minimum
    if maximum is not None:
        o["maximum"] = maximum
    return o


def n(desc, minimum=None, exclusive_minimum=None):
    o = {"type": "number", "description": desc}
    if minimum is not None:
        o["minimum"] = minimum
    if exclusive_minimum is not None:
        o["exclusiveMinimum"] = exclusive_minimum
    return o


def kobj(desc):
    """A Kubernetes object passed through as is."""
    return {"type": "object", "description": desc}


def smap(desc):
    return {"type": "object", "description": desc, "additionalProperties": {"type": "string"}}


def arr(desc, items=None):
    return {"type": "array", "description": desc, "items": items or {"type": "object"}}


DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
SEVERITY = {"type": "string", "enum": ["critical", "warning", "info", "none"]}
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def dur(desc):
    return {**DURATION, "description": desc}


def sev(desc="Alert severity label."):
    return {**SEVERITY, "description": desc}


def alert(desc, props):
    return obj({"enabled": b("Render this alert."), **props}, desc, required=["enabled"])


RESOURCES = obj({
    "requests": {"type": "object", "description": "Resource requests.", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "description": "Resource limits.", "additionalProperties": QUANTITY},
    "claims": arr("Dynamic resource claims."),
}, "Container resources (core/v1 ResourceRequirements).")

PROBE = obj({
    "initialDelaySeconds": i("Seconds before the first probe.", 0),
    "periodSeconds": i("Seconds between probes.", 1),
    "timeoutSeconds": i("Probe timeout in seconds.", 1),
    "failureThreshold": i("Failures before the probe fails.", 1),
    "successThreshold": i("Successes before the probe passes again (1 for liveness).", 1),
}, "Probe timing (the HTTP path and port are set by the chart).")

SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "moe-operator chart values",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "global": {"type": "object", "description": "Helm global values (parent charts); unused by this chart."},
        "nameOverride": s("Override the chart-name part of object names."),
        "fullnameOverride": s("Override the full object-name prefix."),
        "commonLabels": smap("Labels added to every object."),
        "image": obj({
            "repository": s("Operator image repository.", minLength=1),
            "tag": s("Image tag (default: the chart's appVersion)."),
            "digest": {"type": "string", "description": "Image digest; takes precedence over the tag.",
                       "pattern": r"^(sha256:[a-f0-9]{64})?$"},
            "pullPolicy": s("Image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
        }, "The moe-operator image.", required=["repository"]),
        "imagePullSecrets": arr("Pull secrets of the operator pod ({name: ...}).",
                                obj({"name": s("Secret name.")}, required=["name"])),
        "replicaCount": i("Operator replicas (more than 1 needs leaderElection.enabled).", 0, 10),
        "leaderElection": obj({
            "enabled": b("Elect a leader through a Lease in the release namespace."),
            "leaseName": {"type": "string", "description": "Lease name (default <fullname>-leader).",
                          "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$", "maxLength": 63},
            "leaseDurationSeconds": i("Seconds a Lease stays valid without renewal.", 3, 300),
        }, "Leader election (operator/src/leader.rs)."),
        "operator": obj({
            "logFormat": s("Log format.", enum=["json", "text"]),
            "logLevel": s("RUST_LOG filter (tracing-subscriber EnvFilter).", minLength=1),
            "workerTimeoutSeconds": i("Timeout of each request to a worker rank, seconds.", 1, 600),
            "maxGroupRestarts": i("Fleet-wide limit: whole-group restarts per groupRestartWindowSeconds "
                                  "across every MoEDeployment (0: no limit).", 0, 10000),
            "groupRestartWindowSeconds": i("Window of maxGroupRestarts, seconds.", 1, 86400),
            "tokenKeySecret": {"type": "string",
                               "description": "Secret in the release namespace holding the master key the "
                                              "per-deployment tokens are derived from (default <fullname>-token-key); "
                                              "the operator creates it and may read no other Secret.",
                               "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$", "maxLength": 253},
            "httpPort": i("Port of /healthz, /readyz and /metrics.", 1, 65535),
            "bindAddress": s("Address /healthz, /readyz and /metrics bind to: 0.0.0.0, or "
                             "$(POD_IP) where pods share a network namespace.", minLength=1),
            "extraArgs": arr("Extra moe-operator arguments.", {"type": "string"}),
            "extraEnv": arr("Extra environment variables (core/v1 EnvVar).",
                            {"type": "object", "required": ["name"]}),
        }, "The operator process."),
        "workerDefaults": obj({
            "image": s("Default moe-worker image (default ghcr.io/moe-operator/moe-worker:<appVersion>)."),
            "imagePullPolicy": s("Default worker image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
            "resources": RESOURCES,
        }, "Defaults of the worker pods, overridden by a MoEDeployment's spec.worker."),
        "rbac": obj({
            "create": b("Create the RBAC objects."),
            "scope": s("cluster: every namespace (ClusterRole); namespace: one namespace (Role).",
                       enum=["cluster", "namespace"]),
            "watchNamespace": {"type": "string", "description": "Namespace watched with scope namespace (default: the release namespace).",
                               "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "maxLength": 63},
        }, "Permissions and the namespaces watched."),
        "serviceAccount": obj({
            "create": b("Create the operator's ServiceAccount."),
            "name": s("ServiceAccount name (default <fullname>); required with create false."),
            "annotations": smap("ServiceAccount annotations (e.g. workload identity)."),
            "automountServiceAccountToken": b("Mount the API token (the operator needs it)."),
        }, "The operator's ServiceAccount."),
        "crds": obj({
            "templated": b("Render the CRD as a template too (install with --skip-crds)."),
            "keep": b("With templated: annotate the CRD helm.sh/resource-policy: keep."),
        }, "CRD handling (see docs/helm.md)."),
        "podAnnotations": smap("Operator pod annotations."),
        "podLabels": smap("Extra operator pod labels."),
        "priorityClassName": s("Operator pod priority class."),
        "nodeSelector": smap("Operator pod node selector."),
        "tolerations": arr("Operator pod tolerations (core/v1 Toleration)."),
        "affinity": kobj("Operator pod affinity (default with replicaCount > 1: prefer different nodes)."),
        "topologySpreadConstraints": arr("Operator pod topology spread constraints."),
        "podSecurityContext": kobj("Pod security context (default: non-root 65532, RuntimeDefault seccomp)."),
        "securityContext": kobj("Container security context (default: read-only root, no privilege escalation, drop ALL)."),
        "resources": RESOURCES,
        "livenessProbe": PROBE,
        "readinessProbe": PROBE,
        "terminationGracePeriodSeconds": i("Seconds the operator gets to stop.", 0),
        "podDisruptionBudget": obj({
            "enabled": b("Create a PodDisruptionBudget."),
            "minAvailable": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}],
                             "description": "Minimum available operator pods (number or percentage)."},
        }, "PodDisruptionBudget of the operator."),
        "metrics": obj({
            "service": obj({
                "enabled": b("Create the metrics Service."),
                "type": s("Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                "port": i("Service port.", 1, 65535),
                "annotations": smap("Service annotations."),
                "labels": smap("Extra Service labels."),
            }, "ClusterIP Service in front of the operator's /metrics."),
            "serviceMonitor": obj({
                "enabled": b("Create a ServiceMonitor (monitoring.coreos.com/v1) for the operator."),
                "labels": smap("Extra labels (e.g. the one your Prometheus selects)."),
                "interval": dur("Scrape interval."),
                "scrapeTimeout": dur("Scrape timeout."),
                "honorLabels": b("Keep the operator's namespace label (needed by the dashboard and alerts)."),
                "namespace": s("Namespace of the ServiceMonitor (default: the release namespace)."),
                "relabelings": arr("Target relabelings."),
                "metricRelabelings": arr("Metric relabelings."),
            }, "ServiceMonitor for the operator."),
            "podMonitor": obj({
                "enabled": b("Create a PodMonitor for the worker ranks."),
                "labels": smap("Extra labels."),
                "interval": dur("Scrape interval."),
                "scrapeTimeout": dur("Scrape timeout."),
                "namespace": s("Namespace of the PodMonitor (default: the release namespace)."),
                "namespaces": arr("Namespaces whose workers are scraped (default: any, or the watched one).",
                                  {"type": "string"}),
                "relabelings": arr("Extra target relabelings (after the chart's moe_deployment label)."),
                "metricRelabelings": arr("Metric relabelings."),
            }, "PodMonitor for the worker ranks."),
        }, "Metrics and Prometheus-operator scraping."),
        "prometheusRule": obj({
            "enabled": b("Create a PrometheusRule with the alerts."),
            "labels": smap("Extra labels (e.g. the one your Prometheus selects)."),
            "namespace": s("Namespace of the PrometheusRule (default: the release namespace)."),
            "additionalAlertLabels": smap("Labels added to every alert."),
            "runbookBaseUrl": s("Base URL of runbooks (each alert links <base>#<alertname-lowercase>)."),
            "alerts": obj({
                "imbalance": alert("Worst-layer PAR above threshold.", {
                    "threshold": n("PAR threshold (1.0 is perfect balance).", exclusive_minimum=1),
                    "for": dur("How long before firing."), "severity": sev()}),
                "remapStuck": alert("Desired placement generation ahead of the applied one.", {
                    "for": dur("How long before firing."), "severity": sev()}),
                "remapFailing": alert("Failed remaps.", {
                    "window": dur("Window over which failures are counted."),
                    "threshold": n("Failures in the window above which the alert fires.", minimum=0),
                    "for": dur("How long before firing."), "severity": sev()}),
                "ranksNotReady": alert("Ranks not ready or not scrapable.", {
                    "for": dur("How long before firing."), "severity": sev()}),
                "reconcileErrors": alert("Share of failing reconciliations.", {
                    "ratio": n("Error ratio (0-1) above which the alert fires.", minimum=0),
                    "for": dur("How long before firing."), "severity": sev()}),
                "groupRestarts": alert("Whole-group restarts.", {
                    "threshold": n("Restarts in the window above which the alert fires.", minimum=0),
                    "window": dur("Window over which restarts are counted."), "severity": sev()}),
                "operatorDown": alert("No operator replica up and leading (needs the ServiceMonitor).", {
                    "for": dur("How long before firing."), "severity": sev()}),
            }, "Alert thresholds and durations."),
        }, "Prometheus alerts."),
        "dashboard": obj({
            "enabled": b("Create the Grafana dashboard ConfigMap."),
            "namespace": s("Namespace of the ConfigMap (default: the release namespace)."),
            "labels": smap("Labels the Grafana sidecar selects (default grafana_dashboard: \"1\")."),
            "annotations": smap("Annotations (e.g. grafana_folder)."),
        }, "Grafana dashboard for the Grafana sidecar."),
        "networkPolicy": obj({
            "enabled": b("The operator creates a NetworkPolicy per MoEDeployment for its worker pods."),
            "metricsFrom": arr("Extra NetworkPolicyPeers allowed to the workers' http port."),
            "prometheusPodSelector": smap("Labels of Prometheus pods allowed to scrape workers (with podMonitor)."),
        }, "Worker NetworkPolicy."),
    },
}


def main():
    out = json.dumps(SCHEMA, indent=2) + "\n"
    if len(sys.argv) > 1 and sys.argv[1] == "--stdout":
        sys.stdout.write(out)
        return
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe-operator", "values.schema.json")
    with open(path, "w") as f:
        f.write(out)


if __name__ == "__main__":
    main()
