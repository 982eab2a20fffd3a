"""CompressionPolicy on a real API server, Job controller and node agent: a policy
supplies the gate and pipeline of the models it selects, an edit re-compresses
them in waves of at most maxConcurrent, and an object's own fields win.

Compressor pods are completed by the node agent's hook with a valid result
(what the compressor does with a spec is the CLI tests' business); what is
checked here is the spec each Job carries, the waves of Jobs and the statuses.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as client_lib

from edgeslim.api.policy import POLICY_PLURAL
from edgeslim.operator.names import API_GROUP, API_VERSION, PLURAL, SPEC_ENV
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.cluster.processes import wait_until
from tests.cluster.tools import binaries
from tests.operator.support import (
    create_model,
    get_model,
    instant_result_hook,
    list_models,
    model_jobs,
)

pytestmark = pytest.mark.cluster

MODELS = 20
MAX_CONCURRENT = 4
TIMEOUT = 120
Obj = dict[str, Any]


def _policy(max_drop: float) -> Obj:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressionPolicy",
        "metadata": {"name": "team-a"},
        "spec": {
            "selector": {"matchLabels": {"team": "a"}},
            "defaults": {
                "evaluation": {"metric": "accuracy", "maxMetricDrop": max_drop, "latencyRuns": 5},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
            },
            "maxConcurrent": MAX_CONCURRENT,
        },
    }


def _model(name: str, **own: Any) -> Obj:
    """A model that brings only what is its own: source, dataset, output."""
    spec: Obj = {
        "source": {"uri": "s3://models/digits/cnn.onnx", "credentialsSecret": "s3-creds"},
        "evaluation": {"dataset": "s3://models/digits/val.npz"},
        "output": {"uri": "s3://models/edge/"},
    }
    for key, value in own.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressedModel",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": spec,
    }


def _get_policy(k8s: K8s, namespace: str) -> Obj:
    return k8s.custom.get_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, "team-a"
    )


class JobWatch:
    """Samples the Jobs holding a slot (created, not yet finished) and records the
    spec each compressor pod was given."""

    def __init__(self, k8s: K8s, namespace: str) -> None:
        self.k8s, self.namespace = k8s, namespace
        self.peak = 0
        self.specs: dict[str, list[Obj]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def on_start(self, pod: Obj) -> None:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        spec = json.loads(env[SPEC_ENV])
        self.specs.setdefault(spec["metadata"]["name"], []).append(spec["spec"])

    def _run(self) -> None:
        while not self._stop.is_set():
            unfinished = 0
            for job in model_jobs(self.k8s, self.namespace):
                conds = job.status.conditions or []
                if not any(c.type in ("Complete", "Failed") and c.status == "True" for c in conds):
                    unfinished += 1
            self.peak = max(self.peak, unfinished)
            time.sleep(0.05)

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _all_ready(k8s: K8s, namespace: str, generation: int) -> list[Obj]:
    def done() -> list[Obj] | None:
        objs = list_models(k8s, namespace)
        ok = all(
            (o.get("status") or {}).get("phase") == "Ready"
            and (o["status"].get("policy") or {}).get("generation") == generation
            for o in objs
        )
        return objs if ok and len(objs) == MODELS else None

    return wait_until(done, TIMEOUT, 0.3, f"all models Ready for policy generation {generation}")


def _kubectl(k8s: K8s, tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [
            str(binaries().kubectl),
            f"--kubeconfig={k8s.kubeconfig}",
            f"--cache-dir={tmp_path}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_policy_applies_rolls_in_waves_and_yields_to_the_object(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator, tmp_path: Path
) -> None:
    # No overall Job limit: the policy's maxConcurrent alone makes the waves.
    op = run_operator(EDGESLIM_MAX_CONCURRENT_JOBS="0")
    k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, _policy(0.05)
    )
    watch = JobWatch(k8s, namespace)
    names = [f"m{i:02d}" for i in range(MODELS - 1)]
    with (
        node_agent.hooked(instant_result_hook({namespace}, delay=0.5, on_start=watch.on_start)),
        watch,
    ):
        for name in names:
            create_model(k8s, namespace, _model(name))
        # Its own gate and pipeline: the policy's are ignored for both.
        own_pipeline = [{"simplify": {}}, {"quantize": {"mode": "static"}}]
        create_model(
            k8s,
            namespace,
            _model("own", evaluation={"maxMetricDrop": 0.0}, pipeline=own_pipeline),
        )
        try:
            first = _all_ready(k8s, namespace, 1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{op.log_tail()}") from exc
        peak_first = watch.peak
        watch.peak = 0

        # The policy gets stricter: every model that inherits the gate re-compresses.
        k8s.custom.patch_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            namespace,
            POLICY_PLURAL,
            "team-a",
            {"spec": {"defaults": {"evaluation": {"maxMetricDrop": 0.04}}}},
        )
        second = _all_ready(k8s, namespace, 2)
        peak_second = watch.peak

    # Each inheriting model's Jobs carried the policy's gate and pipeline, in order.
    for name in names:
        gates = [s["evaluation"]["maxMetricDrop"] for s in watch.specs[name]]
        assert gates == [0.05, 0.04], (name, gates)
        spec = watch.specs[name][-1]
        assert [step["quantize"]["mode"] for step in spec["pipeline"]] == ["dynamic"]
        assert spec["evaluation"]["dataset"] == "s3://models/digits/val.npz"
        assert spec["evaluation"]["latencyRuns"] == 5
    # The object's own fields won; the policy edit did not touch what it overrides.
    [own_spec] = watch.specs["own"]
    assert own_spec["evaluation"]["maxMetricDrop"] == 0.0
    assert own_spec["evaluation"]["latencyRuns"] == 5  # the key it left to the policy
    assert [next(iter(step)) for step in own_spec["pipeline"]] == ["simplify", "quantize"]
    assert own_spec["pipeline"][1]["quantize"]["mode"] == "static"
    assert len(model_jobs(k8s, namespace, "own")) == 1

    # Rolling waves, never all at once.
    assert 1 <= peak_first <= MAX_CONCURRENT, peak_first
    assert 1 <= peak_second <= MAX_CONCURRENT, peak_second

    by_name = {o["metadata"]["name"]: o for o in second}
    hashes_before = {o["metadata"]["name"]: o["status"]["specHash"] for o in first}
    for name in names:
        st = by_name[name]["status"]
        assert st["policy"] == {"name": "team-a", "generation": 2}
        assert st["specHash"] != hashes_before[name]
    assert by_name["own"]["status"]["specHash"] == hashes_before["own"]
    assert by_name["own"]["status"]["policy"] == {"name": "team-a", "generation": 2}

    def counted() -> Obj | None:
        st = _get_policy(k8s, namespace).get("status") or {}
        return st if st.get("observedGeneration") == 2 and st.get("ready") == MODELS else None

    st = wait_until(counted, 30, 0.3, "the policy to count every model Ready")
    assert (st["models"], st["rejected"], st["failed"], st["pending"]) == (MODELS, 0, 0, 0)
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}

    events = k8s.core.list_namespaced_event(
        namespace, field_selector="involvedObject.kind=CompressionPolicy"
    ).items
    # (Generation 1 may come with the operator's first listing, which posts nothing:
    # each model's own handler takes it from there.)
    assert (
        f"generation 2: reconciling {MODELS} models, at most {MAX_CONCURRENT} compressing at once"
        in [e.message for e in events if e.reason == "PolicyChanged"]
    )

    # kubectl shows the counts (the printer columns of the generated CRD).
    out = _kubectl(k8s, tmp_path, "get", "compressionpolicies", "-n", namespace)
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "MODELS", "READY", "REJECTED", "FAILED", "PENDING", "AGE"]
    assert row.split()[:6] == ["team-a", str(MODELS), str(MODELS), "0", "0", "0"]
    print(f"peak running Jobs: {peak_first} (create), {peak_second} (policy edit)")
    print(out)
    print(_kubectl(k8s, tmp_path, "get", "cmodels", "-n", namespace, "--no-headers").count("\n"))


def test_selection_two_policies_none_a_label_change_and_targets(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator
) -> None:
    run_operator()
    with node_agent.hooked(instant_result_hook({namespace})):
        _conflict_then_orphan(k8s, namespace)


def _conflict_then_orphan(k8s: K8s, namespace: str) -> None:
    k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, _policy(0.05)
    )
    second = _policy(0.01)
    second["metadata"]["name"] = "everything"
    second["spec"]["selector"] = {}
    k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, second
    )
    create_model(k8s, namespace, _model("both"))
    orphan = _model("orphan")
    orphan["metadata"]["labels"] = {}
    # Seen by `everything` only: the policy's recipe comes through.
    create_model(k8s, namespace, orphan)

    def failed(name: str) -> Obj | None:
        obj = get_model(k8s, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") == "Failed" else None

    both = wait_until(lambda: failed("both"), 30, 0.3, "both to fail")
    assert "everything and team-a both select" in both["status"]["message"]
    ready = next(c for c in both["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"

    # Removing `everything` leaves `orphan` with neither a policy nor a recipe.
    k8s.custom.delete_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, "everything"
    )
    orphaned = wait_until(lambda: failed("orphan"), 30, 0.3, "orphan to fail")
    assert "no CompressionPolicy selects this object" in orphaned["status"]["message"]
    assert "policy" not in orphaned["status"]
    # ... and `both` is now team-a's alone: it compresses.
    wait_until(
        lambda: (get_model(k8s, namespace, "both").get("status") or {}).get("phase") == "Ready",
        60,
        0.3,
        "both to be Ready under team-a",
    )
    assert get_model(k8s, namespace, "both")["status"]["policy"]["name"] == "team-a"

    # A label change re-selects: orphan joins team-a and compresses with its recipe.
    k8s.custom.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, "orphan", {"metadata": {"labels": {"team": "a"}}}
    )
    joined = wait_until(
        lambda: (
            (o := get_model(k8s, namespace, "orphan")).get("status", {}).get("phase") == "Ready"
            and o
        ),
        60,
        0.3,
        "orphan to be Ready under team-a",
    )
    assert joined["status"]["policy"] == {"name": "team-a", "generation": 1}

    # spec.targets under a policy: each target's Job inherits the gate (one target
    # keeps its own pipeline); the policy counts the object once.
    multi = _model("multi")
    multi["spec"]["targets"] = [
        {"name": "cpu"},
        {"name": "arm", "pipeline": [{"quantize": {"mode": "static"}}]},
    ]
    create_model(k8s, namespace, multi)

    def settled() -> Obj | None:
        st = _get_policy(k8s, namespace).get("status") or {}
        return st if st.get("ready") == 3 else None

    st = wait_until(settled, 60, 0.3, "team-a to count both, orphan and multi Ready")
    assert (st["models"], st["pending"], st["failed"]) == (3, 0, 0)
    obj = get_model(k8s, namespace, "multi")
    assert obj["status"]["policy"] == {"name": "team-a", "generation": 1}
    assert obj["status"]["targetsReady"] == "2/2"
    jobs = model_jobs(k8s, namespace, "multi")
    specs = {}
    for job in jobs:
        env = {e.name: e.value for e in job.spec.template.spec.containers[0].env or []}
        spec = json.loads(env[SPEC_ENV])["spec"]
        specs[spec["targets"][0]["name"]] = spec
    assert {t: s["evaluation"]["maxMetricDrop"] for t, s in specs.items()} == {
        "cpu": 0.05,
        "arm": 0.05,
    }
    assert specs["cpu"]["pipeline"][0]["quantize"]["mode"] == "dynamic"
    assert specs["arm"]["pipeline"][0]["quantize"]["mode"] == "static"


def test_policy_creates_models_from_a_bucket_prefix(
    k8s: K8s, namespace: str, node_agent: NodeAgent, run_operator, s3_server, s3: str
) -> None:
    """spec.discover: each `<name>.onnx` with its `.val.npz` beside it becomes a model
    the policy selects (the first scan comes with the policy, or the operator's
    first resync); a file added later is picked up by the next scan; the models go
    with the policy (they are owned by it)."""
    client = s3_server.client()

    def upload(*keys: str) -> None:
        for key in keys:  # the node agent's hook never reads them
            client.put_object(Bucket=s3, Key=f"team-a/{key}", Body=b"onnx or npz")

    upload("cnn.onnx", "cnn.val.npz", "sub/Big.onnx", "sub/Big.val.npz", "lonely.onnx")
    data = {k: base64.b64encode(v.encode()).decode() for k, v in s3_server.env().items()}
    k8s.core.create_namespaced_secret(
        namespace,
        client_lib.V1Secret(metadata=client_lib.V1ObjectMeta(name="s3-creds"), data=data),
    )
    op = run_operator()
    body = _policy(0.05)
    body["spec"]["discover"] = {
        "uri": f"s3://{s3}/team-a/",
        "credentialsSecret": "s3-creds",
        "output": {"uri": f"s3://{s3}/edge/"},
        "intervalSeconds": 600,
    }
    with node_agent.hooked(instant_result_hook({namespace})):
        k8s.custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, POLICY_PLURAL, body
        )

        def ready(names: set[str]) -> list[Obj] | None:
            objs = list_models(k8s, namespace)
            done = {
                o["metadata"]["name"]
                for o in objs
                if (o.get("status") or {}).get("phase") == "Ready"
            }
            return objs if done == names else None

        try:
            objs = wait_until(lambda: ready({"cnn", "sub-big"}), 60, 0.5, "discovered models")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{op.log_tail()}") from exc
        cnn = next(o for o in objs if o["metadata"]["name"] == "cnn")
        source = cnn["spec"]["source"]
        assert (source["uri"], source["credentialsSecret"]) == (
            f"s3://{s3}/team-a/cnn.onnx",
            "s3-creds",
        )
        assert cnn["spec"]["evaluation"] == {"dataset": f"s3://{s3}/team-a/cnn.val.npz"}
        assert cnn["metadata"]["labels"]["team"] == "a"
        assert cnn["status"]["policy"]["name"] == "team-a"

        # The next scan finds a file added later: every intervalSeconds, and at
        # once when the policy changes (here: a new maxConcurrent).
        upload("new.onnx", "new.val.npz")
        k8s.custom.patch_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            namespace,
            POLICY_PLURAL,
            "team-a",
            {"spec": {"maxConcurrent": 3}},
        )
        wait_until(lambda: ready({"cnn", "sub-big", "new"}), 60, 0.5, "the added model")

    # Owned by the policy: the garbage collector deletes them with it (not waited
    # for here: the collector notices a new kind on its own schedule, ~20 s).
    uid = _get_policy(k8s, namespace)["metadata"]["uid"]
    for obj in list_models(k8s, namespace):
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("CompressionPolicy", "team-a", uid)
