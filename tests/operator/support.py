"""Helpers for the operator's cluster tests and its benchmark: the CRD, the
operator as a real subprocess, CompressedModel bodies and a node-agent hook
that completes compressor pods at once with a valid result."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edgeslim import storage
from edgeslim.api.result import EvaluationFigures, GateVerdict, LatencyFigures, ModelFigures
from edgeslim.api.spec import CompressedModel
from edgeslim.api.termination import TerminationMessage
from edgeslim.operator.names import API_GROUP, API_VERSION, MODEL_LABEL, PLURAL, SPEC_ENV
from tests.cluster.node_agent import PodOutcome
from tests.cluster.processes import free_port, spawn, stop_group, tail, urlopen_direct, wait_until
from tests.cluster.tools import binaries

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "compressedmodel.yaml"
POLICY_CRD_PATH = ROOT / "crds" / "compressionpolicy.yaml"
Obj = dict[str, Any]


def apply_crd(k8s: Any) -> None:
    """Applies the generated CRDs (create or replace) and waits until they are served."""
    _apply_crd(k8s, POLICY_CRD_PATH)  # the operator watches CompressionPolicies too
    _apply_crd(k8s, CRD_PATH)


def _apply_crd(k8s: Any, path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    name = crd["metadata"]["name"]
    try:
        k8s.apiextensions.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = k8s.apiextensions.read_custom_resource_definition(name)
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        k8s.apiextensions.replace_custom_resource_definition(name, crd)

    def established() -> bool:
        conds = k8s.apiextensions.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_until(established, 30, 0.1, "the CRD to be established")
    # Established can precede the first successful list by a moment.
    plural = crd["spec"]["names"]["plural"]
    wait_until(lambda: _listable(k8s, plural), 30, 0.2, f"{plural} to be listable")


def _listable(k8s: Any, plural: str = PLURAL) -> bool:
    try:
        k8s.custom.list_cluster_custom_object(API_GROUP, API_VERSION, plural, limit=1)
        return True
    except ApiException:
        return False


class Operator:
    """`edgeslim operator` as a subprocess, watching one namespace."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str | None,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra_env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            "KUBECONFIG": str(self.kubeconfig),
            "EDGESLIM_METRICS_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        argv = [sys.executable, "-m", "edgeslim.cli", "operator"]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        self.proc = spawn(argv, self.log_path, env=env)
        wait_until(self.ready, 60, 0.2, f"the operator to be ready (log: {self.log_path})")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urlopen_direct(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urlopen_direct(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no chance to finish what it was doing."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=10)

    def log_tail(self, n: int = 6000) -> str:
        return tail(self.log_path, n)


def model_body(
    name: str,
    bucket: str,
    *,
    pipeline: list[Obj] | None = None,
    dataset: str = "val.npz",
    max_drop: float = 0.05,
    annotations: dict[str, str] | None = None,
    secret: str = "s3-creds",
) -> Obj:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CompressedModel",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "source": {"uri": f"s3://{bucket}/digits/cnn.onnx", "credentialsSecret": secret},
            "evaluation": {
                "dataset": f"s3://{bucket}/digits/{dataset}",
                "metric": "accuracy",
                "maxMetricDrop": max_drop,
                "latencyRuns": 5,
            },
            "pipeline": pipeline or [{"quantize": {"mode": "dynamic"}}],
            "output": {"uri": f"s3://{bucket}/edge/"},
        },
    }


def digits_in_s3(k8s: Any, namespace: str, s3_server: Any, bucket: str, digits: Any) -> None:
    """The digits model, train and val sets under `s3://<bucket>/digits/`, and the
    `s3-creds` Secret (the test S3 server's endpoint and keys) in `namespace`."""
    s3 = s3_server.client()
    for path, key in (
        (digits.model_path, "cnn.onnx"),
        (digits.train, "train.npz"),
        (digits.val, "val.npz"),
    ):
        s3.upload_file(str(path), bucket, f"digits/{key}")
    data = {k: base64.b64encode(v.encode()).decode() for k, v in s3_server.env().items()}
    k8s.core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="s3-creds"), data=data)
    )


def create_model(k8s: Any, namespace: str, body: Obj) -> Obj:
    return k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, body
    )


def get_model(k8s: Any, namespace: str, name: str) -> Obj:
    return k8s.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)


def list_models(k8s: Any, namespace: str) -> list[Obj]:
    return k8s.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)[
        "items"
    ]


def wait_phase(
    k8s: Any,
    namespace: str,
    name: str,
    phases: set[str],
    timeout: float,
    operator: Operator | None = None,
    generation: int | None = None,
) -> Obj:
    """The object once its phase is in `phases` (for `generation`, if given)."""

    def done() -> Obj | None:
        obj = get_model(k8s, namespace, name)
        st = obj.get("status") or {}
        gen_ok = generation is None or st.get("observedGeneration") == generation
        return obj if st.get("phase") in phases and gen_ok else None

    try:
        return wait_until(done, timeout, 0.3, f"{name} to reach {phases}")
    except TimeoutError as exc:
        obj = get_model(k8s, namespace, name)
        log = operator.log_tail() if operator else ""
        raise AssertionError(f"{exc}; status={json.dumps(obj.get('status'))}\n{log}") from exc


def model_jobs(k8s: Any, namespace: str, name: str | None = None) -> list[Any]:
    selector = f"{MODEL_LABEL}={name}" if name else MODEL_LABEL
    return k8s.batch.list_namespaced_job(namespace, label_selector=selector).items


def condition(obj: Obj, kind: str) -> Obj:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def patch_spec(k8s: Any, namespace: str, spec: Obj, name: str = "digits") -> int:
    """Merge-patches the model's spec; the generation the change got."""
    changed = k8s.custom.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, name, {"spec": spec}
    )
    return changed["metadata"]["generation"]


def kubectl(k8s: Any, namespace: str, *args: str) -> str:
    """kubectl's output, or its error when it failed (for printing, never raises)."""
    out = subprocess.run(
        [str(binaries().kubectl), "--kubeconfig", str(k8s.kubeconfig), "-n", namespace, *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout or out.stderr


def show_serving(k8s: Any, namespace: str) -> None:
    """`kubectl get` of the models and their serving objects (visible with -s)."""
    for what in ("compressedmodel", "deploy,svc,pods"):
        print(kubectl(k8s, namespace, "get", what, "-o", "wide"))


def infer_digit(ip: str, x: np.ndarray) -> int:
    """The digit the `digits` model's serving pod at `ip` names for one sample."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    req = urllib.request.Request(
        f"http://{ip}:8080/v2/models/digits/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urlopen_direct(req, timeout=10) as resp:
        return int(np.argmax(json.loads(resp.read())["outputs"][0]["data"]))


# ---------------------------------------------------------------- pod hook


def result_message(spec_json: str, *, passed: bool = True, artifact: bytes | None = None) -> str:
    """A termination message as the compressor writes it, for the spec a pod carries
    (describing `artifact`'s bytes when given)."""
    model = CompressedModel.model_validate_json(spec_json)
    h = model.spec.spec_hash()
    out = model.spec.output.uri if model.spec.output else "s3://bench/"
    prefix = storage.result_prefix(out, model.metadata.namespace, model.metadata.name, h)
    return TerminationMessage(
        name=model.metadata.name,
        namespace=model.metadata.namespace,
        spec_hash=h,
        artifact=ModelFigures(
            uri=storage.join(prefix, "model.onnx"),
            sha256=hashlib.sha256(artifact).hexdigest() if artifact is not None else "0" * 64,
            size_bytes=len(artifact) if artifact is not None else 25_000,
            gzip_size_bytes=20_000,
            parameters=1000,
        ),
        compression_ratio=3.9,
        download_ratio=4.1,
        evaluation=EvaluationFigures(
            metric="accuracy", samples=360, baseline=0.98, compressed=0.975, drop=0.005
        ),
        latency=LatencyFigures(
            source_p50_ms=0.2,
            source_p95_ms=0.3,
            compressed_p50_ms=0.1,
            compressed_p95_ms=0.2,
            speedup=2.0,
            slower=False,
        ),
        gate=GateVerdict(passed=passed, max_metric_drop=0.01, reason="bench"),
        manifest_uri=storage.join(prefix, "manifest.json"),
    ).text()


def instant_result_hook(
    namespaces: set[str] | None = None,
    delay: float = 0.0,
    on_start: Callable[[Obj], None] | None = None,
) -> Callable[[Obj], PodOutcome | None]:
    """Completes compressor pods (of `namespaces`) with a valid passing result,
    after `delay` seconds, instead of running the compressor."""

    def hook(pod: Obj) -> PodOutcome | None:
        if namespaces is not None and pod["metadata"]["namespace"] not in namespaces:
            return None
        if MODEL_LABEL not in (pod["metadata"].get("labels") or {}):
            return None
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        if on_start:
            on_start(pod)
        if delay:
            time.sleep(delay)
        return PodOutcome(0, result_message(env[SPEC_ENV]))

    return hook


def artifact_result_hook(s3_server: Any, artifact: bytes) -> Callable[[Obj], PodOutcome | None]:
    """Ends compressor pods with a passing result for `artifact`, uploaded where the
    compressor of the pod's spec would have put it; serving pods run for real."""

    def hook(pod: Obj) -> PodOutcome | None:
        labels = pod["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/component") != "compressor":
            return None
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        message = result_message(env[SPEC_ENV], artifact=artifact)
        uri = TerminationMessage.parse(message).artifact.uri
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=artifact)
        return PodOutcome(0, message)

    return hook
