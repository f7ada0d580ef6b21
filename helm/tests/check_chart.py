#!/usr/bin/env python3
"""Assertions on the rendered moe-operator chart, its dashboard, its alert rules and the examples.

Called by helm/test.sh with the directory of `helm template` outputs:
  check_chart.py RENDER_DIR
RENDER_DIR holds default.yaml, all.yaml (ci/all-options-values.yaml), nsscope.yaml
(rbac.scope=namespace) and nonetpol.yaml (networkPolicy.enabled=false, a second release name).
Needs PyYAML. Prints one line per check; exits 1 on the first failed group with the reasons.
"""
import json
import os
import re
import subprocess
import sys

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(REPO, "helm", "moe-operator")
RELEASE_NS = "moe-system"  # helm/test.sh renders with -n moe-system

failures = []




def check(cond, msg):
    if not cond:
        failures.append(msg)
    return cond


def section(name):
    print(f"--- {name}")


def done(name):
    if failures:
        print(f"FAIL: {name}", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {name}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    out = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    return out


def one(docs, kind, name=None):
    objs = find(docs, kind, name)
    check(len(objs) == 1, f"expected exactly one {kind} {name or ''}, found {len(objs)}")
    return objs[0] if objs else {}


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def rust_sources(crate):
    d = os.path.join(REPO, crate, "src")
    text = ""
    for root, _, files in os.walk(d):
        for fn in sorted(files):
            if fn.endswith(".rs"):
                with open(os.path.join(root, fn)) as f:
                    text += f.read() + "\n"
    return text


# ---------------------------------------------------------------------------------------------
# Metric names registered by the binaries (string literals passed to the prometheus crate).

METRIC_CTOR = re.compile(
    r"\b(Opts|HistogramOpts|IntCounter|IntGauge|Gauge|Counter|Histogram)::(?:new|with_opts)\(\s*"
    r"(?:HistogramOpts::new\(\s*)?\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"",
    re.S,
)


def registered_metrics():
    names = {}
    for crate in ("operator", "worker"):
        src = rust_sources(crate)
        for kind, name in METRIC_CTOR.findall(src):
            names[name] = crate
            if kind in ("HistogramOpts", "Histogram"):
                for suffix in ("_bucket", "_sum", "_count"):
                    names[name + suffix] = crate
    return names


# Series that Prometheus itself creates for every target (not exported by our binaries).
PROMETHEUS_BUILTIN = {"up"}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2", "inf", "nan", "start", "end",
    # aggregation operators (may be followed by `by (...)` before their parenthesis)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
}


def promql_metric_names(expr):
    """Metric names of a PromQL expression (also Grafana-templated: $vars are ignored)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^{}]*\}", "{}", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "[]", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r"\1", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def promql_syntax_errors(expr):
    """A light parser check: balanced brackets and quotes, valid durations and operators."""
    errs = []
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            if j >= len(expr):
                errs.append("unterminated string")
                break
            i = j
        elif c in "([{":
            stack.append(c)
        elif c in ")]}":
            if not stack or stack[-1] != pairs[c]:
                errs.append(f"unbalanced {c!r} at {i}")
                break
            stack.pop()
        i += 1
    if stack and not errs:
        errs.append(f"unclosed {stack[-1]!r}")
    for rng in re.findall(r"\[([^\[\]]*)\]", expr):
        rng = rng.strip()
        if rng.startswith("$"):
            continue
        parts = [p.strip() for p in rng.split(":")]
        for p in parts:
            if p and not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", p):
                errs.append(f"bad duration [{rng}]")
    for sel in re.findall(r"\{([^{}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        for matcher in [m.strip() for m in sel.split(",") if m.strip()]:
            if not re.fullmatch(r'[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*""', matcher):
                errs.append(f"bad label matcher {matcher!r}")
    if re.search(r"(?<![=!<>])=(?![=~])", re.sub(r"\{[^{}]*\}", "{}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr))):
        errs.append("single '=' outside a label matcher")
    return errs


# ---------------------------------------------------------------------------------------------


def pod_spec(dep):
    return dep["spec"]["template"]["spec"]


def container(dep):
    return pod_spec(dep)["containers"][0]


def env_of(dep):
    return {e["name"]: e for e in container(dep).get("env", [])}


def check_security(dep, where):
    ps = pod_spec(dep)
    c = container(dep)
    sc = c.get("securityContext", {})
    psc = ps.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities drop ALL")
    check(sc.get("privileged") in (None, False), f"{where}: not privileged")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault")
    req = (c.get("resources") or {}).get("requests") or {}
    check("cpu" in req and "memory" in req, f"{where}: cpu and memory requests")
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    check("/tmp" in mounts, f"{where}: writable /tmp with a read-only root")


def operator_rules_cover(rules, where):
    """The verbs operator/src needs (controller.rs, leader.rs), without wildcards."""
    need = [
        ("moe-operator.github.io", "moedeployments", ["get", "list", "watch"]),
        ("moe-operator.github.io", "moedeployments/status", ["patch"]),
        ("apps", "statefulsets", ["get", "list", "watch", "patch"]),
        ("", "pods", ["list", "delete"]),
        ("", "services", ["get", "patch", "delete"]),
        ("networking.k8s.io", "networkpolicies", ["get", "create", "patch"]),
        ("", "configmaps", ["get", "patch", "watch"]),
        ("", "serviceaccounts", ["patch"]),
        ("", "secrets", ["create"]),
        ("", "events", ["create", "list"]),
        ("events.k8s.io", "events", ["create"]),
        ("policy", "poddisruptionbudgets", ["get", "patch", "delete"]),
    ]
    for r in rules:
        check("*" not in r.get("verbs", []) and "*" not in r.get("resources", []) and "*" not in r.get("apiGroups", []),
              f"{where}: wildcard in rule {r}")
        if "secrets" in r.get("resources", []):
            # Least privilege: the tokens are derived (operator/src/tokens.rs), never read back.
            check(set(r["verbs"]) == {"create"},
                  f"{where}: secrets may only be created in managed namespaces, not {r['verbs']}")
        check(not ({"escalate", "bind", "impersonate"} & set(r.get("verbs", []))), f"{where}: escalation verb in {r}")
    for group, res, verbs in need:
        have = set()
        for r in rules:
            if group in r.get("apiGroups", []) and res in r.get("resources", []) and not r.get("resourceNames"):
                have |= set(r["verbs"])
        missing = set(verbs) - have
        check(not missing, f"{where}: {group or 'core'}/{res} lacks {sorted(missing)}")
    # Workers get no API access (resources.rs: no Role, no token): the operator needs no RBAC
    # verbs at all, so none may be granted to it.
    for r in rules:
        check("rbac.authorization.k8s.io" not in r.get("apiGroups", []) or
              not ({"roles", "rolebindings"} & set(r.get("resources", []))),
              f"{where}: the operator needs no Role/RoleBinding verbs: {r}")
    src = read("operator/src/resources.rs")
    check("automount_service_account_token: Some(false)" in src,
          "operator/src/resources.rs: worker pods must not mount an API token")


def check_token_key_role(docs, name, env, sa_name):
    """The master key's Role: get of that one Secret by name, create (operator/src/tokens.rs)."""
    secret = env.get("MOE_OPERATOR_TOKEN_KEY_SECRET", {}).get("value")
    check(bool(secret), "MOE_OPERATOR_TOKEN_KEY_SECRET is set")
    role = one(docs, "Role", name)
    check(role.get("metadata", {}).get("namespace") == RELEASE_NS, f"{name}: in the release namespace")
    for r in role.get("rules", []):
        check(r.get("resources") == ["secrets"] and r.get("apiGroups") == [""], f"{name}: only core secrets: {r}")
        if r.get("resourceNames"):
            check(r["resourceNames"] == [secret] and r["verbs"] == ["get"],
                  f"{name}: get of the master key Secret {secret} by name only: {r}")
        else:
            check(r["verbs"] == ["create"], f"{name}: without a name only create: {r}")
    check(any(r.get("resourceNames") for r in role.get("rules", [])), f"{name}: a rule naming the master key")
    rb = one(docs, "RoleBinding", name)
    check(rb.get("roleRef", {}).get("name") == name
          and rb.get("subjects") == [{"kind": "ServiceAccount", "name": sa_name, "namespace": RELEASE_NS}],
          f"{name}: RoleBinding to the operator's ServiceAccount")


def worker_pod_labels_from_code():
    src = read("operator/src/resources.rs")
    labels = dict(re.findall(r'\(\s*"(app\.kubernetes\.io/(?:name|managed-by))"\.to_string\(\),\s*"([^"]+)"', src))
    labels.update(dict(re.findall(r'"(app\.kubernetes\.io/managed-by)"\.into\(\),\s*"([^"]+)"\.into\(\)', src, re.S)))
    # The selector's name label is moe_api::pods' (shared with moectl), named there.
    pods = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', read("api/src/pods.rs")))
    if re.search(r'\(\s*pods::NAME_LABEL\.to_string\(\),\s*pods::WORKER_NAME\.to_string\(\)', src):
        labels[pods["NAME_LABEL"]] = pods["WORKER_NAME"]
    return labels


def check_default(docs):
    section("default values: objects and their settings")
    kinds = sorted(d["kind"] for d in docs)
    expected = sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                       "Role", "RoleBinding", "Service", "Deployment"])
    check(kinds == expected, f"default render kinds {kinds} != {expected}")
    for d in docs:
        md = d["metadata"]
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            check(md.get("namespace") == RELEASE_NS, f"{d['kind']}/{md['name']} not in the release namespace")
        check(md.get("labels", {}).get("app.kubernetes.io/managed-by") == "Helm", f"{d['kind']}/{md['name']} lacks labels")
    dep = one(docs, "Deployment")
    check(dep["spec"]["replicas"] == 1, "default replicas 1")
    check_security(dep, "Deployment")
    env = env_of(dep)
    check(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
          "POD_NAMESPACE from the downward API (the Lease namespace)")
    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "POD_NAME from the downward API (the Lease identity)")
    check(env.get("MOE_OPERATOR_LEADER_ELECT", {}).get("value") == "true", "leader election on")
    check("WATCH_NAMESPACE" not in env, "cluster scope must not set WATCH_NAMESPACE")
    check(env.get("MOE_OPERATOR_HTTP_ADDR", {}).get("value") == "0.0.0.0:8080", "http addr")
    check(env.get("MOE_OPERATOR_WORKER_IMAGE", {}).get("value") == "ghcr.io/moe-operator/moe-worker:0.1.0",
          "worker image default follows appVersion")
    wres = json.loads(env.get("MOE_OPERATOR_WORKER_RESOURCES", {}).get("value", "{}"))
    check(wres.get("limits", {}).get("nvidia.com/gpu") == "1" and wres["requests"]["memory"] == "32Gi",
          "worker default resources: one GPU, quantities as strings")
    # Flags and env names the operator really has (operator/src/main.rs).
    main_rs = read("operator/src/main.rs")
    for name in ("WATCH_NAMESPACE", "MOE_OPERATOR_HTTP_ADDR", "MOE_OPERATOR_LEADER_ELECT", "MOE_OPERATOR_LEASE_NAME",
                 "POD_NAMESPACE", "POD_NAME", "MOE_OPERATOR_LOG_FORMAT", "MOE_OPERATOR_NETWORK_POLICY",
                 "MOE_OPERATOR_POD_LABELS", "MOE_OPERATOR_CONTROL_PEERS"):
        check(f'env = "{name}"' in main_rs, f"operator/src/main.rs has no env {name}")
    for arg in container(dep).get("args", []):
        flag = arg.split("=")[0]
        field = flag.lstrip("-").replace("-", "_")
        check(re.search(rf"\b{field}\s*:", main_rs) is not None, f"operator/src/main.rs has no flag {flag}")
    c = container(dep)
    check(c["ports"][0]["name"] == "http" and c["ports"][0]["containerPort"] == 8080, "container port http 8080")
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, "liveness probe /healthz")
    check(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, "readiness probe /readyz")
    server_rs = read("operator/src/server.rs")
    for path in ("/healthz", "/readyz", "/metrics"):
        check(f'"{path}"' in server_rs, f"operator/src/server.rs serves no {path}")
    # The per-MoEDeployment NetworkPolicies admit the operator's pods by these labels.
    check(env.get("MOE_OPERATOR_NETWORK_POLICY", {}).get("value") == "true", "per-deployment NetworkPolicies on")
    pod_labels = dict(p.split("=", 1) for p in env.get("MOE_OPERATOR_POD_LABELS", {}).get("value", "").split(","))
    check(pod_labels == dep["spec"]["selector"]["matchLabels"]
          and set(pod_labels.items()) <= set(dep["spec"]["template"]["metadata"]["labels"].items()),
          f"MOE_OPERATOR_POD_LABELS {pod_labels} selects the operator pods")
    check(json.loads(env.get("MOE_OPERATOR_CONTROL_PEERS", {}).get("value", "null")) == [],
          "no extra control-port peers by default")
    sa = one(docs, "ServiceAccount")
    check(pod_spec(dep)["serviceAccountName"] == sa["metadata"]["name"], "pod uses the ServiceAccount")
    # RBAC
    cr = one(docs, "ClusterRole")
    operator_rules_cover(cr["rules"], "ClusterRole")
    crb = one(docs, "ClusterRoleBinding")
    check(crb["roleRef"]["name"] == cr["metadata"]["name"], "ClusterRoleBinding refers to the ClusterRole")
    check(crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": RELEASE_NS}],
          "ClusterRoleBinding subject")
    lease_role = one(docs, "Role", "moe-operator-leader-election")
    lease = env["MOE_OPERATOR_LEASE_NAME"]["value"]
    named = [r for r in lease_role["rules"] if "leases" in r["resources"] and r.get("resourceNames")]
    check(named and named[0]["resourceNames"] == [lease] and {"get", "update"} <= set(named[0]["verbs"]),
          "leader-election Role: get/update on the operator's Lease by name")
    check(any("leases" in r["resources"] and "create" in r["verbs"] for r in lease_role["rules"]), "Lease create")
    rb = one(docs, "RoleBinding", "moe-operator-leader-election")
    check(rb["roleRef"]["name"] == lease_role["metadata"]["name"], "leader-election RoleBinding")
    check_token_key_role(docs, "moe-operator-token-key", env, sa["metadata"]["name"])
    # Service
    svc = one(docs, "Service")
    check(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "metrics Service selects the operator pods")
    check(svc["spec"]["ports"][0]["targetPort"] == "http", "metrics Service targets the http port")
    # NetworkPolicies are the operator's, one per MoEDeployment (operator/src/resources/network.rs).
    check(not find(docs, "NetworkPolicy"), "the chart renders no NetworkPolicy (each MoEDeployment owns one)")
    code_labels = worker_pod_labels_from_code()
    check(code_labels.get("app.kubernetes.io/name") == "moe-worker"
          and code_labels.get("app.kubernetes.io/managed-by") == "moe-operator",
          f"worker pod labels in operator/src/resources.rs changed: {code_labels}")
    done("default values")


def check_all(docs, dashboard_src, registered):
    section("all-options values")
    kinds = sorted(d["kind"] for d in docs)
    for k in ("CustomResourceDefinition", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap",
              "PodDisruptionBudget", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"):
        check(k in kinds, f"all-options render lacks {k}")
    check("ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds, "scope namespace: no cluster RBAC")
    dep = one(docs, "Deployment")
    check(dep["metadata"]["name"] == "moe-op", "fullnameOverride")
    check(dep["spec"]["replicas"] == 2, "replicas 2")
    check_security(dep, "Deployment (all options)")
    c = container(dep)
    check(c["image"].startswith("registry.example.com/moe/moe-operator@sha256:"), "image digest wins over tag")
    env = env_of(dep)
    check(env.get("WATCH_NAMESPACE", {}).get("value") == "ml", "WATCH_NAMESPACE from rbac.watchNamespace")
    check(env["MOE_OPERATOR_LEASE_NAME"]["value"] == "moe-op-lease", "lease name")
    check(env["MOE_OPERATOR_HTTP_ADDR"]["value"] == "0.0.0.0:9090", "http port")
    check(env["MOE_OPERATOR_WORKER_IMAGE"]["value"] == "registry.example.com/moe/moe-worker:0.1.0-rc1", "worker image")
    check("EXTRA" in env, "extraEnv")
    check("--lease-duration-seconds=20" in c["args"] and "--worker-timeout-seconds=5" in c["args"], "args")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in find(docs, "Role")}
    check(("ml", "moe-op") in roles, "controller Role in the watched namespace")
    if ("ml", "moe-op") in roles:
        operator_rules_cover(roles[("ml", "moe-op")]["rules"], "Role (scope namespace)")
    check((RELEASE_NS, "moe-op-leader-election") in roles, "leader-election Role in the release namespace")
    check_token_key_role(docs, "moe-op-token-key", env, "moe-op-sa")
    peers = json.loads(env["MOE_OPERATOR_CONTROL_PEERS"]["value"])
    check(peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}},
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
          f"metricsFrom + prometheusPodSelector become the operator's control-port peers: {peers}")
    pod_labels = dict(p.split("=", 1) for p in env["MOE_OPERATOR_POD_LABELS"]["value"].split(","))
    check(pod_labels == dep["spec"]["selector"]["matchLabels"], "MOE_OPERATOR_POD_LABELS follows fullnameOverride")
    pdb = one(docs, "PodDisruptionBudget")
    check(pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"], "PDB selects the operator")
    sm = one(docs, "ServiceMonitor")
    check(sm["metadata"]["namespace"] == "monitoring" and sm["metadata"]["labels"].get("release") == "kube-prometheus-stack",
          "ServiceMonitor namespace and labels")
    check(sm["spec"]["endpoints"][0]["port"] == one(docs, "Service")["spec"]["ports"][0]["name"], "ServiceMonitor port name")
    check(sm["spec"]["endpoints"][0]["honorLabels"] is True, "ServiceMonitor honours the operator's namespace label")
    check(sm["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}, "ServiceMonitor namespace selector")
    pm = one(docs, "PodMonitor")
    check(pm["spec"]["selector"]["matchLabels"] == worker_pod_labels_from_code(), "PodMonitor selects the workers")
    check(pm["spec"]["namespaceSelector"] == {"matchNames": ["ml", "ml-staging"]}, "PodMonitor namespaces")
    ep = pm["spec"]["podMetricsEndpoints"][0]
    check(ep["port"] == "http" and ep["path"] == "/metrics", "PodMonitor scrapes http /metrics")
    check('"/metrics"' in read("worker/src/http.rs"), "worker serves /metrics")
    check(any(r.get("targetLabel") == "moe_deployment" and r["sourceLabels"] ==
              ["__meta_kubernetes_pod_label_moe_operator_github_io_deployment"] for r in ep["relabelings"]),
          "PodMonitor adds moe_deployment")
    check('DEPLOYMENT_LABEL: &str = "moe-operator.github.io/deployment"' in read("operator/src/resources.rs"),
          "operator labels worker pods moe-operator.github.io/deployment")
    # Dashboard ConfigMap
    cms = [d for d in find(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if check(len(cms) == 1, "one ConfigMap labelled grafana_dashboard"):
        cm = cms[0]
        check(cm["metadata"]["namespace"] == "monitoring", "dashboard namespace")
        check(cm["metadata"].get("annotations", {}).get("grafana_folder") == "MoE", "dashboard annotations")
        check(json.loads(cm["data"]["moe-operator.json"]) == json.loads(dashboard_src), "ConfigMap holds the dashboard JSON")
    # Templated CRD
    crd = one(docs, "CustomResourceDefinition")
    with open(os.path.join(CHART, "crds", "moedeployment.yaml")) as f:
        src = yaml.safe_load(f)
    check(crd["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep", "templated CRD kept on uninstall")
    a, b = dict(crd), dict(src)
    a["metadata"] = {"name": crd["metadata"]["name"]}
    b["metadata"] = {"name": src["metadata"]["name"]}
    check(json.dumps(norm_numbers(a), sort_keys=True) == json.dumps(norm_numbers(b), sort_keys=True),
          "templated CRD differs from crds/moedeployment.yaml (a number lost in fromYaml/toYaml?)")
    done("all-options values")
    check_rules(one(docs, "PrometheusRule"), registered, all_options=True)


def norm_numbers(v):
    """1000.0 and 1000 mean the same in a schema; a large integer that lost precision does not."""
    if isinstance(v, dict):
        return {k: norm_numbers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [norm_numbers(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def check_rules(rule, registered, all_options):
    section("PrometheusRule: parse, names, metrics")
    spec = rule["spec"]
    names = set()
    alerts = []
    for g in spec["groups"]:
        check(g.get("name") and g.get("rules"), f"group {g.get('name')} empty")
        for r in g["rules"]:
            check("alert" in r and "expr" in r, f"rule without alert/expr: {r}")
            a = r.get("alert", "")
            check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a) is not None, f"bad alert name {a}")
            check(a not in names, f"duplicate alert {a}")
            names.add(a)
            alerts.append(a)
            if "for" in r:
                check(re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", str(r["for"])) is not None, f"{a}: bad for {r['for']}")
            check(r.get("labels", {}).get("severity") in ("critical", "warning", "info", "none"), f"{a}: severity")
            ann = r.get("annotations", {})
            for k in ("summary", "description", "runbook_url"):
                check(ann.get(k), f"{a}: annotation {k}")
            for err in promql_syntax_errors(r["expr"]):
                check(False, f"{a}: {err} in {r['expr']!r}")
            metrics = promql_metric_names(r["expr"])
            check(metrics, f"{a}: no metric in expr")
            for m in metrics:
                check(m in registered or m in PROMETHEUS_BUILTIN,
                      f"{a}: metric {m} is not registered in operator/src or worker/src")
            by = set()
            for grp in re.findall(r"\bby\s*\(([^()]*)\)", r["expr"]):
                by |= {x.strip() for x in grp.split(",")}
            by |= set(re.findall(r'"(\w+)",\s*"[^"]*",\s*"\w+",\s*"[^"]*"\s*\)', r["expr"]))  # label_replace dst
            for lbl in set(re.findall(r"\$labels\.(\w+)", " ".join(map(str, ann.values())))):
                check(lbl in by, f"{a}: annotation uses $labels.{lbl} which the expression does not keep")
            # Go templates in annotations must be balanced.
            for k, v in ann.items():
                check(str(v).count("{{") == str(v).count("}}"), f"{a}: unbalanced template in {k}")
    if all_options:
        expected = {"MoEDeploymentImbalanceHigh", "MoEDeploymentRemapStuck", "MoEDeploymentRemapFailing",
                    "MoEDeploymentRanksNotReady", "MoEDeploymentGroupRestarting", "MoEOperatorReconcileErrors",
                    "MoEOperatorDown"}
        check(names == expected, f"alerts {sorted(names)} != {sorted(expected)}")
        by_name = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
        imb = by_name.get("MoEDeploymentImbalanceHigh", {})
        check("> 1.3" in imb.get("expr", "") and imb.get("for") == "20m", "imbalance threshold and duration are values")
        check(by_name.get("MoEDeploymentRemapStuck", {}).get("for") == "45m", "remapStuck.for")
        check("[2h]" in by_name.get("MoEDeploymentRemapFailing", {}).get("expr", ""), "remapFailing.window")
        check("> 0.2" in by_name.get("MoEOperatorReconcileErrors", {}).get("expr", ""), "reconcileErrors.ratio")
        check(all(by_name[a]["labels"].get("team") == "ml-platform" for a in by_name), "additionalAlertLabels")
        check(by_name["MoEDeploymentImbalanceHigh"]["annotations"]["runbook_url"] ==
              "https://runbooks.example.com/moe#moedeploymentimbalancehigh", "runbook url")
        # Jobs in the rules match what the monitors produce.
        check('job="monitoring/moe-op-workers"' in by_name["MoEDeploymentRanksNotReady"]["expr"],
              "ranksNotReady uses the PodMonitor's job (<namespace>/<name>)")
        check('job="moe-op-metrics"' in by_name["MoEOperatorDown"]["expr"], "operatorDown uses the Service's job")
    promtool = os.environ.get("PROMTOOL") or shutil_which("promtool")
    if promtool:
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"groups": spec["groups"]}, f)
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
        check(r.returncode == 0, f"promtool check rules: {r.stdout}{r.stderr}")
        print(f"     (promtool check rules: {'ok' if r.returncode == 0 else 'FAILED'})")
    else:
        print("     (promtool not found: rules checked with the built-in parser only)")
    done(f"PrometheusRule ({len(alerts)} alerts)")


def shutil_which(name):
    import shutil
    return shutil.which(name)


def check_dashboard(src, registered):
    section("Grafana dashboard: JSON, panels, metric names")
    d = json.loads(src)
    check(d.get("uid") and d.get("title"), "dashboard uid/title")
    seen_ids = set()
    used = set()
    titles = []
    for p in d["panels"]:
        check(p["id"] not in seen_ids, f"duplicate panel id {p['id']}")
        seen_ids.add(p["id"])
        if p["type"] == "row":
            continue
        titles.append(p["title"])
        check(p.get("targets"), f"panel {p['title']!r} has no queries")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for err in promql_syntax_errors(expr):
                check(False, f"panel {p['title']!r}: {err} in {expr!r}")
            ms = promql_metric_names(expr)
            check(ms, f"panel {p['title']!r}: no metric in {expr!r}")
            for m in ms:
                check(m in registered, f"panel {p['title']!r}: metric {m} is not registered in operator/src or worker/src")
            used |= ms
        gp = p["gridPos"]
        check(gp["x"] + gp["w"] <= 24, f"panel {p['title']!r} wider than the grid")
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            lv = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", v["query"]["query"])
            check(lv is not None, f"variable {v['name']}: expected label_values(<selector>, <label>)")
            for m in promql_metric_names(lv.group(1) if lv else ""):
                check(m in registered, f"variable {v['name']}: metric {m} not registered")
    # What the issue asks the dashboard to show.
    for m in ("moe_deployment_worst_imbalance_ratio", "moe_deployment_imbalance_ratio", "moe_worker_tokens_total",
              "moe_worker_step_duration_seconds_bucket", "moe_deployment_remaps_total",
              "moe_worker_remap_bytes_total", "moe_deployment_ready_ranks"):
        check(m in used, f"dashboard does not chart {m}")
    check(any(p["type"] == "heatmap" for p in d["panels"]), "a per-layer heatmap")
    done(f"dashboard ({len(titles)} panels, {len(used)} metrics)")


def check_nsscope(docs):
    section("rbac.scope=namespace (watch namespace = release namespace)")
    kinds = [d["kind"] for d in docs]
    check("ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds, "no cluster-wide RBAC")
    dep = one(docs, "Deployment")
    check(env_of(dep).get("WATCH_NAMESPACE", {}).get("value") == RELEASE_NS, "WATCH_NAMESPACE defaults to the release ns")
    roles = find(docs, "Role")
    check(len(roles) == 3 and all(r["metadata"]["namespace"] == RELEASE_NS for r in roles),
          "three Roles in the release ns (controller, leader election, token key)")
    done("namespace scope")


def check_nonetpol(docs):
    section("networkPolicy.enabled=false, leaderElection.enabled=false")
    kinds = [d["kind"] for d in docs]
    check("NetworkPolicy" not in kinds, "no NetworkPolicy")
    check(not [r for r in find(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")],
          "no leader-election Role without leader election")
    env = env_of(one(docs, "Deployment"))
    roles = find(docs, "Role")
    check(len(roles) == 1 and roles[0]["metadata"]["name"].endswith("-token-key"), "only the token-key Role")
    check(env["MOE_OPERATOR_LEADER_ELECT"]["value"] == "false", "leader election off")
    check(env["MOE_OPERATOR_NETWORK_POLICY"]["value"] == "false", "per-deployment NetworkPolicies off")
    done("options off")


# ---------------------------------------------------------------------------------------------
# Examples: MoEDeployments validated against the CRD's OpenAPI schema (structure, types, enums,
# bounds, unknown fields) and the simple CEL rules re-checked; the static expert map's shape.


def validate_schema(value, schema, path, errs):
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)):
            errs.append(f"{path}: int or string expected")
        return
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    t = schema.get("type")
    if value is None:
        if not schema.get("nullable"):
            errs.append(f"{path}: null")
        return
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            errs.append(f"{path}: integer expected, got {value!r}")
            return
    elif t == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errs.append(f"{path}: number expected, got {value!r}")
            return
    elif t in types and not isinstance(value, types[t]):
        errs.append(f"{path}: {t} expected, got {type(value).__name__}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path}: shorter than {schema['minLength']}")
    if isinstance(value, dict):
        props = schema.get("properties")
        for req in schema.get("required", []):
            if req not in value:
                errs.append(f"{path}: missing required {req}")
        for k, v in value.items():
            if props is not None and k in props:
                validate_schema(v, props[k], f"{path}.{k}", errs)
            elif isinstance(schema.get("additionalProperties"), dict):
                validate_schema(v, schema["additionalProperties"], f"{path}.{k}", errs)
            elif props is not None:
                errs.append(f"{path}: unknown field {k!r}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate_schema(v, schema["items"], f"{path}[{i}]", errs)


def check_examples():
    section("examples: MoEDeployments against the CRD schema; static expert map")
    ex_dir = os.path.join(REPO, "examples")
    mine = ["deepseek-v3.yaml", "medium.yaml", os.path.join("static-map", "moedeployment.yaml"),
            os.path.join("static-map", "expert-map-configmap.yaml")]
    with open(os.path.join(CHART, "crds", "moedeployment.yaml")) as f:
        crd = yaml.safe_load(f)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    files = sorted({*mine, *[f for f in os.listdir(ex_dir) if f.endswith(".yaml")]}) if os.path.isdir(ex_dir) else mine
    configmaps = {}
    moeds = []
    for rel in files:
        path = os.path.join(ex_dir, rel)
        if not check(os.path.exists(path), f"examples/{rel} missing"):
            continue
        for doc in load_docs(path):
            if doc.get("kind") == "ConfigMap":
                configmaps[doc["metadata"]["name"]] = doc
            elif doc.get("kind") == "MoEDeployment":
                moeds.append((rel, doc))
    for rel, doc in moeds:
        check(doc["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}", f"{rel}: apiVersion")
        errs = []
        validate_schema({k: v for k, v in doc.items() if k in ("spec",)}, {"type": "object", "properties": {"spec": schema["properties"]["spec"]}}, "", errs)
        for e in errs:
            check(False, f"examples/{rel}: {e}")
        spec = doc["spec"]
        m, ep = spec["model"], spec["expertParallel"]
        r = ep.get("redundantExperts")
        if r is not None:
            check((m["numExperts"] + r) % ep["ranks"] == 0, f"{rel}: numExperts + redundantExperts divisible by ranks")
        if "ranksPerNode" in ep:
            check(ep["ranks"] % ep["ranksPerNode"] == 0, f"{rel}: ranksPerNode divides ranks")
        check(m["topK"] <= m["numExperts"], f"{rel}: topK <= numExperts")
        g = m.get("expertGroups", 1)
        check(m["numExperts"] % g == 0 and m.get("topkGroups", 1) <= g, f"{rel}: expert groups")
        th = spec.get("eplb", {}).get("imbalanceThreshold", 1.2)
        hy = spec.get("eplb", {}).get("hysteresis", 0.05)
        check(th > 1.0 and th - hy >= 1.0, f"{rel}: threshold/hysteresis")
        w = spec.get("weights", {"synthetic": {}})
        check(("synthetic" in w) != ("persistentVolumeClaim" in w), f"{rel}: exactly one weights source")
        algo = spec.get("eplb", {}).get("algorithm")
        if algo is not None:
            known = re.findall(r'"([\w-]+)" => Algo::', read("eplb/src/planner/mod.rs"))
            check(algo in known, f"{rel}: eplb.algorithm {algo!r} is not a planner of eplb ({known})")
        pl = spec.get("placement", {})
        if pl.get("strategy") == "Static":
            ref = pl["staticMap"]
            cm = configmaps.get(ref["name"])
            if check(cm is not None, f"{rel}: static map ConfigMap {ref['name']} not among the examples"):
                key = ref.get("key", "expert_map.json")
                text = cm.get("data", {}).get(key)
                if check(text is not None, f"{rel}: ConfigMap {ref['name']} has no key {key}"):
                    check_expert_map(json.loads(text), m, ep, r, rel)
    check(len(moeds) >= 3, f"expected at least 3 example MoEDeployments, found {len(moeds)}")
    done(f"examples ({len(moeds)} MoEDeployments)")


def check_expert_map(em, model, ep, redundant, rel):
    """The shape rules of eplb::Placement::from_ascend_expert_map + validate."""
    L, E, G = model["numLayers"], model["numExperts"], ep["ranks"]
    R = redundant if redundant is not None else (-E) % G
    S = (E + R) // G
    check(em.get("moe_layer_count") == L == len(em.get("layer_list", [])), f"{rel}: expert map has {L} layers")
    seen_layers = set()
    for layer in em.get("layer_list", []):
        lid = layer["layer_id"]
        seen_layers.add(lid)
        devs = layer["device_list"]
        check(layer.get("device_count", len(devs)) == len(devs) == G, f"{rel}: layer {lid} lists {G} devices")
        check(sorted(d["device_id"] for d in devs) == list(range(G)), f"{rel}: layer {lid} device ids 0..{G - 1}")
        allx = []
        for d in devs:
            ex = d["device_expert"]
            check(len(ex) == S, f"{rel}: layer {lid} device {d['device_id']} holds {len(ex)} experts, want {S}")
            check(all(isinstance(x, int) and 0 <= x < E for x in ex), f"{rel}: layer {lid} expert ids in 0..{E - 1}")
            if S <= E:
                check(len(set(ex)) == len(ex), f"{rel}: layer {lid} device {d['device_id']} holds an expert twice")
            allx += ex
        check(set(allx) == set(range(E)), f"{rel}: layer {lid} does not place every expert")
    check(seen_layers == set(range(L)), f"{rel}: layer ids 0..{L - 1}")


def self_test():
    """The checks above must catch what they are meant to catch."""
    got = promql_metric_names('sum by (a, b) (rate(foo_total{x="y", z=~"$v"}[5m])) / on (a) group_left '
                              'max without (c) (bar) > bool 1 or label_replace(baz, "d", "$1", "e", "(.*)")')
    check(got == {"foo_total", "bar", "baz"}, f"self-test: metric names {got}")
    check(promql_syntax_errors('sum(rate(x[5m])') != [], "self-test: unbalanced parenthesis not caught")
    check(promql_syntax_errors('rate(x[5 minutes])') != [], "self-test: bad duration not caught")
    check(promql_syntax_errors('x{a="b", c=d}') != [], "self-test: bad matcher not caught")
    check(promql_syntax_errors('histogram_quantile(0.9, sum by (le) (rate(x_bucket{a=~"$b"}[$__rate_interval])))') == [],
          "self-test: valid query rejected")
    done("self-test of the PromQL checks")


def main():
    render_dir = sys.argv[1]
    self_test()
    registered = registered_metrics()
    check(len(registered) > 10, f"found only {len(registered)} registered metric names in operator/src and worker/src")
    done(f"metric names registered in code ({len(registered)} incl. histogram series)")
    with open(os.path.join(CHART, "dashboards", "moe-operator.json")) as f:
        dashboard_src = f.read()
    check_default(load_docs(os.path.join(render_dir, "default.yaml")))
    check_all(load_docs(os.path.join(render_dir, "all.yaml")), dashboard_src, registered)
    check_nsscope(load_docs(os.path.join(render_dir, "nsscope.yaml")))
    check_nonetpol(load_docs(os.path.join(render_dir, "nonetpol.yaml")))
    check_dashboard(dashboard_src, registered)
    check_examples()


if __name__ == "__main__":
    main()
