"""The chart's dashboard and alerts against a real Prometheus (built from the Go
module proxy, like the control plane) scraping a real operator and a real
serving pod on the test bed.

The scrape config is what prometheus-operator makes of the chart's monitors: the
operator's metrics port with honor_labels (the ServiceMonitor), and the rendered
PodMonitor turned into Kubernetes pod discovery against the test API server, so
its selector, port and relabelings are what find the serving pod and name its
model. The rules are the rendered PrometheusRule's groups. After one model is
compressed (a node-agent hook ends the compressor pod with a passing result for
the digits model, as test_rollout does), rolled out and served some requests,
every dashboard panel's queries return data and every alert rule evaluates.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import urlopen_direct, wait_until
from tests.monitoring import prom
from tests.operator.support import (
    artifact_result_hook,
    create_model,
    digits_in_s3,
    model_body,
    wait_phase,
)
from tests.test_chart import one, render

pytestmark = pytest.mark.cluster
SERVING = "edgeslim.io/model=digits,app.kubernetes.io/component=serving"
GOOD_REQUESTS = 12
BAD_REQUESTS = 2
# The target labels prometheus-operator gives the operator's Service endpoint.
OPERATOR = {"namespace": "edgeslim-system"}


def _infer(ip: str, body: bytes) -> int:
    req = urllib.request.Request(
        f"http://{ip}:8080/v2/models/digits/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urlopen_direct(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _reads(expr: str) -> list[str]:
    """The series selectors of `expr`, without matchers on values that only appear
    when something is wrong (a 5xx code, a rollback, a Failed phase)."""
    out = []
    for name, matchers in re.findall(r"\b(edgeslim_\w+|up)(\{[^}]*\})?", expr):
        kept = [
            m
            for m in matchers.strip("{}").split(",")
            if m and not re.match(r"\s*(code|result|phase)\b", m)
        ]
        out.append(f"{name}{{{','.join(kept)}}}" if kept else name)
    return out


def _scalar(server: prom.Prometheus, expr: str) -> float | None:
    result = server.query(expr)
    return float(result[0]["value"][1]) if result else None


def _wait_scraped(server: prom.Prometheus, requests: int) -> None:
    total = 'sum(edgeslim_serving_requests_total{route="infer"})'
    wait_until(lambda: _scalar(server, total) == requests, 30, 0.5, f"{requests} requests scraped")


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


@pytest.mark.slow
def test_every_panel_and_alert_on_a_real_prometheus(
    k8s: K8s,
    namespace: str,
    kubeconfig: Path,
    run_operator,
    s3_server,
    s3: str,
    digits,
    node_agent: NodeAgent,
    tmp_path: Path,
) -> None:
    prom.tool("prometheus")  # before anything starts: fail (or skip) with the reason
    digits_in_s3(k8s, namespace, s3_server, s3, digits)
    op = run_operator()
    manifests = render(
        "prometheusRule.enabled=true", "podMonitor.enabled=true", f"watchNamespace={namespace}"
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "edgeslim",
                "scrape_interval": "1s",
                "honor_labels": True,  # as the chart's ServiceMonitor
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{op.port}"],
                        "labels": {"namespace": "edgeslim-system"},
                    }
                ],
            },
            prom.podmonitor_scrape_config(one(manifests, "PodMonitor"), kubeconfig),
        ],
    }
    groups = one(manifests, "PrometheusRule")["spec"]["groups"]
    server = prom.Prometheus(tmp_path / "prometheus", config, groups).start()
    try:
        # Scraped once before anything happens, so rates see every change.
        wait_until(lambda: server.query("edgeslim_models"), 30, 0.5, "the operator's series")

        body = model_body("digits", s3)
        body["spec"]["deployment"] = {
            "replicas": 1,
            "nodeSelector": {"node-role.kubernetes.io/edge": ""},
            "threads": 1,
        }
        with node_agent.hooked(artifact_result_hook(s3_server, digits.model_path.read_bytes())):
            create_model(k8s, namespace, body)
            wait_phase(k8s, namespace, "digits", {"Ready"}, 120, op)

        # The PodMonitor's discovery finds the serving pod and scrapes it once.
        wait_until(
            lambda: server.query('up{job="edgeslim-serving"} == 1'),
            60,
            0.5,
            f"the serving pod to be scraped (log: {server.log})",
        )
        (pod,) = k8s.core.list_namespaced_pod(namespace, label_selector=SERVING).items
        x = np.load(digits.val)["x"][:1]
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        good = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        # A series' first scraped value is rate()'s starting point: one request of
        # each code first, scraped, then the rest, so the rates see them.
        sent: list[int] = []
        for good_n, bad_n in ((1, 1), (GOOD_REQUESTS - 1, BAD_REQUESTS - 1)):
            sent += [_infer(pod.status.pod_ip, good) for _ in range(good_n)]
            sent += [_infer(pod.status.pod_ip, b"{not json") for _ in range(bad_n)]
            _wait_scraped(server, len(sent))
        assert sorted(sent) == [200] * GOOD_REQUESTS + [400] * BAD_REQUESTS

        # Every query of every panel returns data, and a number.
        empty = [t for t, q in prom.panel_queries() if not _finite(server.query(q))]
        assert not empty, f"panels without data: {empty}"

        # The namespace variable's query (Grafana's label_values) lists this namespace.
        for variable in prom.dashboard()["templating"]["list"]:
            found = re.fullmatch(r"label_values\((.*), (\w+)\)", variable.get("definition", ""))
            if found:
                values = server.api(f"label/{found[2]}/values", **{"match[]": found[1]})
                assert namespace in values, (variable["name"], values)

        # What the panels show is this model, labelled as the dashboard groups it.
        queries = dict(prom.panel_queries())
        rate = server.query(queries["Inference requests by model"])
        assert [r["metric"] for r in rate] == [{"namespace": namespace, "model": "digits"}]
        ratio = server.query(queries["Compression ratio distribution"])
        assert [(r["metric"]["namespace"], r["metric"]["name"]) for r in ratio] == [
            (namespace, "digits")
        ]
        assert float(ratio[0]["value"][1]) == pytest.approx(3.9)  # the hook's result
        assert _by(server.query(queries["Models by phase"]), "phase")["Ready"] == 1
        assert (
            _by(server.query(queries["Rollouts by result (last hour)"]), "result")["complete"] > 0
        )
        refused = server.query(queries["Refused requests by model and code"])
        assert {r["metric"]["code"] for r in refused} == {"400"}
        errors = server.query(queries["Error ratio (5xx) by model"])
        assert [float(r["value"][1]) for r in errors] == [0.0]
        assert _by(server.query(queries["Serving pods: model loaded / scraped"]), "model")

        # Every alert's expression evaluates, each series it reads exists here, and
        # Prometheus' rule manager evaluates every rule without error. None fires on
        # this healthy fleet -- except that a retried write conflict may count as a
        # reconcile error, which that alert only reports after 15 minutes.
        quiet = {a["alert"] for a in prom.alerts()} - {"EdgeslimReconcileErrors"}
        for alert in prom.alerts():
            firing = server.query(alert["expr"])
            assert alert["alert"] not in quiet or firing == [], (alert["alert"], firing)
            for selector in _reads(alert["expr"]):
                assert server.query(f"count({selector})"), f"{alert['alert']}: {selector}"

        def all_rules_evaluated() -> bool:
            rules = [r for g in server.api("rules")["groups"] for r in g["rules"]]
            assert all(r["health"] != "err" for r in rules), rules
            assert all(r["state"] == "inactive" for r in rules if r["name"] in quiet), rules
            return len(rules) == len(prom.alerts()) and all(
                r["health"] == "ok" and r["lastEvaluation"] > "2000" for r in rules
            )

        wait_until(all_rules_evaluated, 30, 0.5, "every rule to be evaluated")
    finally:
        server.stop()
