"""Helpers for the monitoring tests: the built prometheus/promtool, the chart's
dashboard queries and rules, a PodMonitor turned into the scrape config
prometheus-operator would generate, and a real Prometheus as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.processes import free_port, spawn, stop_group, tail, urlopen_direct, wait_until
from tests.cluster.tools import binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "edgeslim"
DASHBOARD = CHART / "dashboards" / "edgeslim-fleet.json"
RULES = CHART / "rules" / "edgeslim.rules.yaml"
RULES_TEST = Path(__file__).resolve().parent / "rules_test.yaml"
Obj = dict[str, Any]

# Grafana's variables, as the test evaluates them: every namespace, and a rate
# window that covers the whole test (Grafana picks 4 x the scrape interval or more).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*"}


def tool(name: str) -> Path:
    """promtool or prometheus from the tools cache. Missing while Go is here: a
    failure (`make controlplane` builds it; CI runs that first). Missing and no Go
    to build it with: a skip that says so."""
    path: Path = getattr(binaries(), name)
    if os.access(path, os.X_OK):
        return path
    if shutil.which("go") or os.access("/usr/local/go/bin/go", os.X_OK):
        pytest.fail(f"{name} is not built ({path}); run `make controlplane`", pytrace=False)
    pytest.skip(f"{name} is not built ({path}) and there is no Go toolchain to build it")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("promtool")), *args], capture_output=True, text=True, timeout=120
    )


def dashboard() -> Obj:
    return json.loads(DASHBOARD.read_text())


def panels(dash: Obj | None = None) -> list[Obj]:
    """Every panel with queries (rows hold none)."""
    out: list[Obj] = []
    for p in (dash or dashboard())["panels"]:
        out += [p] if p["type"] != "row" else p.get("panels", [])
    return [p for p in out if p.get("targets")]


def expand(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables expanded) for every query of every panel."""
    return [(p["title"], expand(t["expr"])) for p in panels() for t in p["targets"]]


def rule_groups() -> list[Obj]:
    return yaml.safe_load(RULES.read_text())["groups"]


def alerts() -> list[Obj]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def podmonitor_scrape_config(podmonitor: Obj, kubeconfig: Path, interval: str = "1s") -> Obj:
    """The scrape config prometheus-operator generates for `podmonitor`'s first
    endpoint (selector and port kept, namespace/pod/container labels, its default
    job name, then the PodMonitor's own relabelings), with Kubernetes discovery
    through `kubeconfig`."""
    meta, spec = podmonitor["metadata"], podmonitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    relabel: list[Obj] = []
    for key, value in spec["selector"]["matchLabels"].items():
        label = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{label}",
                    f"__meta_kubernetes_pod_labelpresent_{label}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    relabel += [
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    relabel += [
        {_CAMEL.sub("_", k).lower(): v for k, v in r.items()}
        for r in endpoint.get("relabelings", [])
    ]
    sd: Obj = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
    if "matchNames" in spec["namespaceSelector"]:
        sd["namespaces"] = {"names": spec["namespaceSelector"]["matchNames"]}
    return {
        "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/0",
        "scrape_interval": interval,
        "metrics_path": endpoint.get("path", "/metrics"),
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel,
    }


class Prometheus:
    """`prometheus` as a subprocess with its own config and data directory."""

    def __init__(self, workdir: Path, config: Obj, rule_groups: list[Obj]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
        config = {**config, "rule_files": [str(workdir / "rules.yaml")]}
        (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        argv = [
            str(tool("prometheus")),
            f"--config.file={self.workdir / 'prometheus.yaml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc = spawn(argv, self.log)
        wait_until(self._ready, 60, 0.2, f"Prometheus to be ready (log: {self.log})")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{tail(self.log)}")
        try:
            with urlopen_direct(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=10)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urlopen_direct(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Obj]:
        """An instant query's vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        return list(data["result"])
