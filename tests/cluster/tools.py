"""Where the Go-built binaries live.

``tools/versions.env`` is the single source of the versions; this module and
``scripts/build-controlplane.sh`` both derive the cache layout from it:
``${EDGESLIM_TOOLS_CACHE:-$HOME/.cache/edgeslim/tools}/<name>-<version>/<binary>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"


class MissingBinariesError(RuntimeError):
    """The control-plane binaries have not been built on this machine yet."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parses the ``KEY=VALUE`` lines of versions.env (comments and blanks skipped)."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip("\"'")
    return versions


def cache_dir() -> Path:
    """The root of the binary cache; mirrors the shell default in the build script."""
    override = os.environ.get("EDGESLIM_TOOLS_CACHE")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "edgeslim" / "tools"


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path
    prometheus: Path
    promtool: Path
    kueue: Path
    versions: dict[str, str]

    def control_plane(self) -> list[Path]:
        return [self.etcd, self.kube_apiserver, self.kube_controller_manager]

    def missing(self, paths: list[Path] | None = None) -> list[Path]:
        """The given binaries (default: the control plane's) that are not built yet."""
        return [p for p in (paths or self.control_plane()) if not os.access(p, os.X_OK)]


def binaries() -> Binaries:
    """Paths of every cached binary for the pinned versions (they may not exist)."""
    versions = read_versions()
    root = cache_dir()
    k8s = root / f"kubernetes-{versions['KUBERNETES_VERSION']}"
    return Binaries(
        etcd=root / f"etcd-{versions['ETCD_VERSION']}" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kubectl=k8s / "kubectl",
        helm=root / f"helm-{versions['HELM_VERSION']}" / "helm",
        prometheus=root / f"prometheus-{versions['PROMETHEUS_VERSION']}" / "prometheus",
        promtool=root / f"prometheus-{versions['PROMETHEUS_VERSION']}" / "promtool",
        # Kueue's CRDs of the same version are in crds/ beside it (tests/cluster/kueue.py).
        kueue=root / f"kueue-{versions['KUEUE_VERSION']}" / "kueue",
        versions=versions,
    )


def require_binaries(*names: str) -> Binaries:
    """Like :func:`binaries` but raises with the fix when a needed one is missing.

    ``names`` are Binaries attribute names (e.g. ``"helm"``); the default is the
    control plane (etcd, kube-apiserver, kube-controller-manager).
    """
    found = binaries()
    missing = found.missing([getattr(found, n) for n in names] or None)
    if missing:
        listed = "\n  ".join(str(p) for p in missing)
        raise MissingBinariesError(
            "control-plane binaries are missing:\n  "
            f"{listed}\n"
            "Run `make controlplane` (scripts/build-controlplane.sh) to build them; "
            "the first build on a machine compiles Kubernetes and takes a while."
        )
    return found
