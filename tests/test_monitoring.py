"""The chart's fleet monitoring without a cluster: promtool's unit tests of every
alert, `promtool check rules` on the rendered PrometheusRule, the dashboard
ConfigMap, and every dashboard and alert query reading only metrics edgeslim
exports. tests/operator/test_monitoring_cluster.py runs the same queries against
a real Prometheus scraping a real operator and serving pod."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from edgeslim.metrics import REGISTRY
from edgeslim.operator import serving
from edgeslim.operator.names import MODEL_LABEL, SERVING_CONTAINER
from edgeslim.operator.settings import Settings
from edgeslim.serving.metrics import ServingMetrics
from tests.cluster.tools import binaries
from tests.monitoring import prom
from tests.operator.test_serving import NEW, model
from tests.test_chart import CHART, one, render

ALL_ON = ("dashboards.enabled=true", "prometheusRule.enabled=true", "podMonitor.enabled=true")


def test_every_alert_passes_its_promtool_unit_test() -> None:
    done = prom.promtool("test", "rules", str(prom.RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_has_a_firing_case_severity_and_runbook() -> None:
    tested = yaml.safe_load(prom.RULES_TEST.read_text())
    fired = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    names = [a["alert"] for a in prom.alerts()]
    assert sorted(fired) == sorted(names)
    for alert in prom.alerts():
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys()


def test_rendered_prometheus_rule_is_the_rule_file_and_passes_promtool(tmp_path: Path) -> None:
    rule = one(render(*ALL_ON), "PrometheusRule")
    assert rule["spec"]["groups"] == prom.rule_groups()
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = prom.promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(prom.alerts())} rules found" in done.stdout


def test_chart_lints_with_monitoring_on() -> None:
    argv = [str(binaries().helm), "lint", "--strict", str(CHART), "--set", ",".join(ALL_ON)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {m["kind"] for m in render()}
    assert not kinds & {"ConfigMap", "PrometheusRule", "PodMonitor"}


def test_dashboard_configmap_carries_the_dashboard_file() -> None:
    cm = one(render(*ALL_ON, "dashboards.labels.team=ml"), "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "ml"
    assert json.loads(cm["data"]["edgeslim-fleet.json"]) == prom.dashboard()


def test_dashboard_panels_have_unique_ids_and_titles() -> None:
    dash = prom.dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in prom.panels()]
    assert len(titles) == len(set(titles)) and len(titles) >= 15


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def _exported_names() -> set[str]:
    """Sample names (with _total, _bucket, ...) the operator and a server export,
    label children or not (a per-model gauge has none until a model is seen)."""
    names: set[str] = set()
    for registry in (REGISTRY, ServingMetrics().registry):
        for family in registry.collect():
            names |= {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
    return names


def test_every_query_reads_only_metrics_edgeslim_exports() -> None:
    exported = _exported_names() | {"up"}
    queries = [q for _, q in prom.panel_queries()] + [a["expr"] for a in prom.alerts()]
    used = {n for q in queries for n in re.findall(r"\b(edgeslim_[a-z0-9_]+|up)\b", q)}
    assert used <= exported, sorted(used - exported)
    # Prometheus naming: counters end in _total, durations are in seconds.
    for name in exported - {"up"}:
        if name.startswith("edgeslim_") and "duration" in name:
            assert re.search(r"duration_seconds(_bucket|_sum|_count|_created)?$", name), name


def test_pod_monitor_selects_the_serving_pods_and_names_their_model() -> None:
    pm = one(render(*ALL_ON), "PodMonitor")
    deployment = serving.build_deployment(model(), NEW, Settings())
    template = deployment["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == SERVING_CONTAINER]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", MODEL_LABEL)
    source = f"__meta_kubernetes_pod_label_{sanitized}"
    to_model = {"sourceLabels": [source], "targetLabel": "model"}
    assert to_model in endpoint["relabelings"]
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(render(*ALL_ON, "watchNamespace=vision"), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["vision"]}
