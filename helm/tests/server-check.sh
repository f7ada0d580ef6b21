#!/usr/bin/env bash
# Server-side part of helm/test.sh: installs the chart into a real kube-apiserver (etcd +
# kube-apiserver from the e2e cache, no controllers, no nodes), then checks
#   - `helm install` succeeds (default values) and `helm upgrade` to namespace scope succeeds,
#     with the CRD from crds/ accepted by the API server;
#   - the operator's ServiceAccount may do what the controller does (kubectl auth can-i), and
#     may not do more (no read of any Secret but its own master key, no cluster-wide delete of
#     owned kinds);
#   - the examples pass server-side validation (schema and CEL rules): kubectl apply --dry-run=server.
# Usage: server-check.sh HELM BIN_DIR   (BIN_DIR holds etcd, kube-apiserver, kubectl)
# Exit 0 on success, 1 on failure, 3 when a binary is missing (the caller prints SKIPPED).
set -euo pipefail
HELM=$1
BIN=$2
for b in etcd kube-apiserver kubectl; do [ -x "$BIN/$b" ] || { echo "no $BIN/$b"; exit 3; }; done
command -v openssl >/dev/null 2>&1 || { echo "no openssl"; exit 3; }
cd "$(dirname "$0")/../.."

W=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
log() { printf '[helm-test]   %s\n' "$*"; }
fail() { printf '[helm-test] FAIL (server): %s\n' "$*" >&2; for f in "$W"/*.log; do echo "---- $f" >&2; tail -20 "$f" >&2; done; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
ETCD_PORT=$(free_port); API_PORT=$(free_port)

# --- certificates ---------------------------------------------------------------------------
P="$W/pki"; mkdir -p "$P"
(
  cd "$P"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj "/CN=helm-test-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > san.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 -extfile san.ext 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/CN=admin/O=system:masters" 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 1 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
) || fail "openssl"

cat > "$W/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: t
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$P/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$P/admin.crt", client-key: "$P/admin.key"}
contexts:
- name: t
  context: {cluster: t, user: admin}
current-context: t
EOF
export KUBECONFIG="$W/kubeconfig"
export HELM_CACHE_HOME="$W/helm/cache" HELM_CONFIG_HOME="$W/helm/config" HELM_DATA_HOME="$W/helm/data"
K() { "$BIN/kubectl" "$@"; }

# --- control plane ------------------------------------------------------------------------------
"$BIN/etcd" --name=t --data-dir="$W/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls=http://127.0.0.1:0 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
  --initial-cluster=t=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn >"$W/etcd.log" 2>&1 &
PIDS+=($!)
"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --secure-port="$API_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --cert-dir="$P" \
  --tls-cert-file="$P/server.crt" --tls-private-key-file="$P/server.key" --client-ca-file="$P/ca.crt" \
  --authorization-mode=RBAC --service-account-issuer="https://127.0.0.1:$API_PORT" \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none --profiling=false \
  >"$W/kube-apiserver.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
  if K get --raw=/readyz >/dev/null 2>&1; then break; fi
  sleep 0.5
done
K get --raw=/readyz >/dev/null 2>&1 || fail "kube-apiserver did not become ready in 60s"
log "kube-apiserver $("$BIN/kube-apiserver" --version | cut -d' ' -f2) ready on 127.0.0.1:$API_PORT"
# Namespaces are created by the namespace controller's absence anyway: make the ones we use.
for ns in moe-system ml; do K create namespace "$ns" >/dev/null; done

# --- install --------------------------------------------------------------------------------------
"$HELM" install moe-operator helm/moe-operator -n moe-system >"$W/helm-install.log" 2>&1 ||
  { cat "$W/helm-install.log" >&2; fail "helm install (default values)"; }
K get crd moedeployments.moe-operator.github.io >/dev/null || fail "CRD not installed from crds/"
K wait --for=condition=Established --timeout=30s crd/moedeployments.moe-operator.github.io >/dev/null || fail "CRD not Established"
log "helm install (default values): ok"

SA=system:serviceaccount:moe-system:moe-operator
can() { # can NS VERB RESOURCE[/NAME] [--subresource=...]
  local ns=$1; shift
  [ "$(K auth can-i --as="$SA" -n "$ns" "$@" 2>/dev/null)" = yes ]
}
must() { can "$@" || fail "the operator's ServiceAccount cannot: -n $*"; }
mustnot() { ! can "$@" || fail "the operator's ServiceAccount should not be able to: -n $*"; }
for ns in ml default; do
  for v in get list watch; do must "$ns" "$v" moedeployments.moe-operator.github.io; done
  must "$ns" patch moedeployments.moe-operator.github.io --subresource=status
  for r in statefulsets.apps services configmaps serviceaccounts; do
    for v in get create patch; do must "$ns" "$v" "$r"; done
  done
  for v in get create patch; do must "$ns" "$v" networkpolicies.networking.k8s.io; done
  must "$ns" delete services
  mustnot "$ns" delete networkpolicies.networking.k8s.io
  for v in list watch delete; do must "$ns" "$v" pods; done
  # Token Secrets are created only: their tokens are derived, never read back.
  must "$ns" create secrets
  for v in get list watch patch update delete; do mustnot "$ns" "$v" secrets; done
  mustnot "$ns" get secrets/demo-control
  must "$ns" create events
  must "$ns" list events
  must "$ns" create events.events.k8s.io
  for v in get create patch delete; do must "$ns" "$v" poddisruptionbudgets.policy; done
  mustnot "$ns" delete statefulsets.apps
  mustnot "$ns" delete moedeployments.moe-operator.github.io
  # Workers get no API access, so the operator needs no RBAC verbs at all.
  mustnot "$ns" create roles.rbac.authorization.k8s.io
  mustnot "$ns" create rolebindings.rbac.authorization.k8s.io
done
# The master key: created and read by name in the release namespace, no other Secret there.
must moe-system create secrets
must moe-system get secrets/moe-operator-token-key
for v in list watch; do mustnot moe-system "$v" secrets; done
mustnot moe-system get secrets/someone-elses-secret
for v in update patch delete; do mustnot moe-system "$v" secrets/moe-operator-token-key; done
must moe-system create leases.coordination.k8s.io
must moe-system update leases.coordination.k8s.io/moe-operator-leader
mustnot moe-system update leases.coordination.k8s.io/someone-elses-lease
mustnot moe-system create clusterroles.rbac.authorization.k8s.io
log "operator RBAC (cluster scope): the controller's verbs allowed; Secrets create-only (the master key read by name); deletes denied"

# --- examples: server-side validation (schema + CEL) ----------------------------------------------
for f in examples/*.yaml examples/*/*.yaml; do
  [ -f "$f" ] || continue
  K apply --dry-run=server -n ml -f "$f" >"$W/example.log" 2>&1 || { cat "$W/example.log" >&2; fail "example $f rejected by the API server"; }
done
# A spec that breaks a CEL rule must be refused, naming the field.
cat >"$W/bad.yaml" <<'EOF'
apiVersion: moe-operator.github.io/v1alpha1
kind: MoEDeployment
metadata: {name: bad}
spec:
  model: {numLayers: 2, numExperts: 8, hidden: 16, intermediate: 8, topK: 2}
  expertParallel: {ranks: 3, redundantExperts: 0}
EOF
if K apply --dry-run=server -n ml -f "$W/bad.yaml" >"$W/bad.log" 2>&1; then fail "an invalid MoEDeployment was accepted"; fi
grep -q "redundantExperts" "$W/bad.log" || { cat "$W/bad.log" >&2; fail "CEL message does not name the field"; }
log "examples accepted by the API server (schema + CEL); an invalid spec refused"

# --- upgrade to namespace scope, then a second install with the templated CRD ----------------------
"$HELM" upgrade moe-operator helm/moe-operator -n moe-system --set rbac.scope=namespace --set rbac.watchNamespace=ml \
  --set networkPolicy.enabled=true >"$W/helm-upgrade.log" 2>&1 || { cat "$W/helm-upgrade.log" >&2; fail "helm upgrade to namespace scope"; }
must ml list moedeployments.moe-operator.github.io
mustnot default list moedeployments.moe-operator.github.io
must ml create secrets
for v in get list watch; do mustnot ml "$v" secrets; done
must moe-system get secrets/moe-operator-token-key
log "helm upgrade to rbac.scope=namespace: ok (ml allowed, default denied)"
"$HELM" uninstall moe-operator -n moe-system >/dev/null || fail "helm uninstall"
K get crd moedeployments.moe-operator.github.io >/dev/null || fail "helm uninstall removed the CRD"
K delete crd moedeployments.moe-operator.github.io --wait=true >/dev/null
"$HELM" install moe-gitops helm/moe-operator -n moe-system --skip-crds --set crds.templated=true >"$W/helm-gitops.log" 2>&1 ||
  { cat "$W/helm-gitops.log" >&2; fail "helm install --skip-crds --set crds.templated=true"; }
K wait --for=condition=Established --timeout=30s crd/moedeployments.moe-operator.github.io >/dev/null || fail "templated CRD not Established"
"$HELM" uninstall moe-gitops -n moe-system >/dev/null || fail "helm uninstall (templated CRD)"
K get crd moedeployments.moe-operator.github.io >/dev/null || fail "the templated CRD was not kept on uninstall"
log "templated CRD (GitOps): installed with --skip-crds, kept on uninstall"
