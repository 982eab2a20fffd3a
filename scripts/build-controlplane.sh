#!/usr/bin/env bash
# Builds the binaries the cluster tests need -- etcd, kube-apiserver,
# kube-controller-manager, kubectl and helm -- kstatus (Flux's status
# logic from sigs.k8s.io/cli-utils, tests/test_kstatus.py), and prometheus and
# promtool (tests/test_monitoring.py), and the Kueue manager with its CRDs
# (tests/operator/test_kueue_cluster.py) from the Go module proxy, using
# the small tools modules under tools/, and caches them outside the checkout:
#
#   ${EDGESLIM_TOOLS_CACHE:-$HOME/.cache/edgeslim/tools}/<name>-<version>/
#
# Versions live in tools/versions.env (tests/cluster/tools.py reads the same
# file). Idempotent: anything already cached is skipped, so a warm run takes
# well under a second. The first run on a machine compiles Kubernetes, which
# takes a while (see the README for a measured time).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../tools/versions.env
source "$root/tools/versions.env"
cache="${EDGESLIM_TOOLS_CACHE:-$HOME/.cache/edgeslim/tools}"

# Never fetch a different Go toolchain; static binaries like upstream's release.
export GOTOOLCHAIN=local CGO_ENABLED=0
if ! command -v go >/dev/null; then
  if [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
fi
# Keep the compiled output small; -trimpath also keeps paths out of binaries.
ldflags_common="-s -w"

log() { printf '[build-controlplane] %s\n' "$*" >&2; }

# True when every named binary is already in <cache>/<key>/.
cached() { # <cache key> <binary[=package]>...
  local dest="$cache/$1" spec
  shift
  for spec in "$@"; do
    [[ -x "$dest/${spec%%=*}" ]] || return 1
  done
}

# Moves a finished temporary directory into <cache>/<key>/ in one rename, so an
# interrupted build never leaves a half-filled cache entry behind.
publish() { # <temporary dir> <cache key> <start, in $SECONDS>
  rm -rf "${cache:?}/$2" && mv "$1" "$cache/$2"
  log "built $2 in $((SECONDS - $3))s"
}

# Every tools/<name>/go.mod must pin the version versions.env names, or the
# cache key would lie about what was built.
check_pin() { # <tools dir> <module path> <version>
  if ! grep -qE "^(require )?[[:space:]]*$2 $3( // indirect)?\$" "$root/tools/$1/go.mod"; then
    log "tools/$1/go.mod does not require $2 $3 (tools/versions.env); fix one of them"
    exit 1
  fi
}

# Builds <packages...> in tools/<dir> into <cache>/<key>/ unless every named
# binary is already there (into a temporary directory, then publish).
build() { # <tools dir> <cache key> <ldflags> <binary=package>...
  local dir="$1" key="$2" ldflags="$3"
  shift 3
  cached "$key" "$@" && return 0
  local tmp="$cache/.$key.tmp.$$" pkgs=() start=$SECONDS spec
  rm -rf "$tmp" && mkdir -p "$tmp"
  for spec in "$@"; do pkgs+=("${spec#*=}"); done
  log "building ${pkgs[*]} (tools/$dir) ..."
  (cd "$root/tools/$dir" && go build -trimpath -buildvcs=false -ldflags="$ldflags_common $ldflags" -o "$tmp/" "${pkgs[@]}")
  for spec in "$@"; do
    # go build names a binary after its package's last path element.
    local built
    built="$(basename "${spec#*=}")"
    if [[ "$built" != "${spec%%=*}" ]]; then mv "$tmp/$built" "$tmp/${spec%%=*}"; fi
  done
  publish "$tmp" "$key" "$start"
}

# `go install <package>@<version>` into <cache>/<key>/: for a module whose own
# go.mod and go.sum pin everything (checked against the checksum database), so no
# tools/<name>/go.mod is needed. Same temporary directory and publish as build().
install_module() { # <cache key> <build tags> <binary=package@version>...
  local key="$1" tags="$2"
  shift 2
  cached "$key" "$@" && return 0
  local tmp="$cache/.$key.tmp.$$" pkgs=() start=$SECONDS spec
  rm -rf "$tmp" && mkdir -p "$tmp"
  for spec in "$@"; do pkgs+=("${spec#*=}"); done
  log "installing ${pkgs[*]} ..."
  GOBIN="$tmp" go install -trimpath -tags="$tags" -ldflags="$ldflags_common" "${pkgs[@]}"
  publish "$tmp" "$key" "$start"
}

# The Kueue manager, and Kueue's CRDs from the same module version, which
# `go install` has just put into the module cache (nothing else is downloaded):
# the tests install them from <cache>/kueue-<version>/crds/.
install_kueue() {
  local key="kueue-$KUEUE_VERSION" start=$SECONDS
  cached "$key" kueue && [[ -d "$cache/$key/crds" ]] && return 0
  local tmp="$cache/.$key.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp/crds"
  log "installing sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION ..."
  GOBIN="$tmp" go install -trimpath \
    -ldflags="$ldflags_common -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    sigs.k8s.io/kueue/cmd/kueue@"$KUEUE_VERSION"
  cp "$(go env GOMODCACHE)/sigs.k8s.io/kueue@$KUEUE_VERSION/config/components/crd/bases/"*.yaml "$tmp/crds/"
  chmod 0644 "$tmp/crds/"*.yaml
  publish "$tmp" "$key" "$start"
}

all_cached() {
  cached "etcd-$ETCD_VERSION" etcd && cached "helm-$HELM_VERSION" helm &&
    cached "kstatus-$CLI_UTILS_VERSION" kstatus &&
    cached "prometheus-$PROMETHEUS_VERSION" prometheus promtool &&
    cached "kueue-$KUEUE_VERSION" kueue && [[ -d "$cache/kueue-$KUEUE_VERSION/crds" ]] &&
    cached "kubernetes-$KUBERNETES_VERSION" kube-apiserver kube-controller-manager kubectl
}

if ! all_cached && ! command -v go >/dev/null; then
  log "Go is needed to build the control plane the first time (go1.26 or newer on PATH)"
  exit 1
fi

mkdir -p "$cache"
# One build at a time per cache (make test and make cluster may race).
exec 9>"$cache/.lock"
flock 9

check_pin k8s k8s.io/kubernetes "$KUBERNETES_VERSION"
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"
check_pin kstatus sigs.k8s.io/cli-utils "$CLI_UTILS_VERSION"

# Stamp the version the way upstream's hack/lib/version.sh does; otherwise the
# API server reports v0.0.0-master and version-gated clients (helm's
# kubeVersion checks) misbehave.
k8s_minor="${KUBERNETES_VERSION#v*.}"
k8s_minor="${k8s_minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
  k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done

build etcd "etcd-$ETCD_VERSION" \
  "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
  etcd=edgeslim/tools/etcd
build k8s "kubernetes-$KUBERNETES_VERSION" "$k8s_ldflags" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kubectl=k8s.io/kubernetes/cmd/kubectl
build helm "helm-$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  helm=helm.sh/helm/v3/cmd/helm
build kstatus "kstatus-$CLI_UTILS_VERSION" "" kstatus=edgeslim/tools/kstatus
# Only the Kubernetes service discovery (upstream's plugins/ build tags): the
# tests scrape through it, and the cloud SDKs (AWS, Azure, GCE, ...) of the
# other discoveries need not be compiled.
install_module "prometheus-$PROMETHEUS_VERSION" remove_all_sd,enable_kubernetes_sd \
  prometheus=github.com/prometheus/prometheus/cmd/prometheus@"$PROMETHEUS_VERSION" \
  promtool=github.com/prometheus/prometheus/cmd/promtool@"$PROMETHEUS_VERSION"

install_kueue

echo "etcd:                    $cache/etcd-$ETCD_VERSION/etcd"
echo "kube-apiserver:          $cache/kubernetes-$KUBERNETES_VERSION/kube-apiserver"
echo "kube-controller-manager: $cache/kubernetes-$KUBERNETES_VERSION/kube-controller-manager"
echo "kubectl:                 $cache/kubernetes-$KUBERNETES_VERSION/kubectl"
echo "helm:                    $cache/helm-$HELM_VERSION/helm"
echo "kstatus:                 $cache/kstatus-$CLI_UTILS_VERSION/kstatus"
echo "prometheus:              $cache/prometheus-$PROMETHEUS_VERSION/prometheus"
echo "promtool:                $cache/prometheus-$PROMETHEUS_VERSION/promtool"
echo "kueue:                   $cache/kueue-$KUEUE_VERSION/kueue"
