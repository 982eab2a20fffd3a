"""Fault scenarios on the real control plane: what a fault may never lose.

Shared by `bench/chaos.py` (full size, prints the table) and
`tests/operator/test_chaos.py` (the same scenarios, small). Each scenario
drives CompressedModels through their life on the test bed (real
kube-apiserver, etcd, controller manager, node agent, S3 over HTTP, `edgeslim
operator` as a subprocess), injects its fault and counts:

* duplicate Jobs: more than one Job object ever created for one
  (object uid, spec hash) -- seen by a watch that survives API-server restarts;
* lost results: a Job of the object's current spec succeeded, but the status
  never got its result (spec hash, Job name, artifact sha, figures);
* partial artifacts: storage showed a `manifest.json` whose artifact is missing
  or has other bytes than the manifest's sha256, a `model.onnx` still without
  its manifest once the run is over, or (scenario 4) a corrupt artifact that
  reached a serving Deployment;
* final: objects that reached their expected end state (Ready/Rejected/Failed
  for the current generation, or gone after deletion) within the deadline.

Compressor pods are completed by a node-agent hook that stores a real
artifact and writes the compressor's termination message (the S3 scenario
runs the real compressor instead, since its upload is what is under test).
Serving pods run `stub_serving.py` (ready at once, a few MB) except in the
corrupt-artifact scenario, where the real `edgeslim serve` loads real models.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import sys
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edgeslim import storage
from edgeslim.api.spec import CompressedModel
from edgeslim.operator.names import (
    API_GROUP,
    API_VERSION,
    CLEANUP_ANNOTATION,
    MODEL_LABEL,
    PLURAL,
    SPEC_ENV,
)
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent, PodOutcome
from tests.cluster.processes import urlopen_direct
from tests.operator.support import Operator, create_model, model_body, result_message
from tests.s3server import S3Server

Obj = dict[str, Any]
FINAL = {"Ready", "Rejected", "Failed"}
STUB_SERVING = Path(__file__).with_name("stub_serving.py")
STUB_ENV = {"EDGESLIM_SERVING_COMMAND": f"{sys.executable} {STUB_SERVING}"}
SHA_ANNOTATION = f"{API_GROUP}/artifact-sha256"
FIRST_DROP, SECOND_DROP = 0.05, 0.06  # the spec change every scenario makes


def deployment(progress_deadline: int = 60) -> Obj:
    return {
        "replicas": 1,
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "progressDeadlineSeconds": progress_deadline,
        "threads": 1,
    }


# --------------------------------------------------------------- the test bed


@dataclass
class Bed:
    """Where a scenario runs: one namespace of a running control plane, a bucket
    (with the `s3-creds` Secret pointing at it) and a way to start the operator."""

    k8s: K8s
    namespace: str
    agent: NodeAgent
    s3: S3Server
    bucket: str
    start_operator: Callable[..., Operator]
    control_plane: ControlPlane | None = None

    def prepare(self) -> Bed:
        self.s3.create_bucket(self.bucket)
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.s3.env().items()}
        secret = client.V1Secret(metadata=client.V1ObjectMeta(name="s3-creds"), data=data)
        self.k8s.core.create_namespaced_secret(self.namespace, secret)
        return self

    def upload(self, files: Iterable[tuple[Path, str]]) -> None:
        s3 = self.s3.client()
        for path, key in files:
            s3.upload_file(str(path), self.bucket, key)

    def objects(self) -> dict[str, Obj]:
        items = self.k8s.custom.list_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL
        )["items"]
        return {o["metadata"]["name"]: o for o in items}

    def patch_spec(self, name: str, spec: Obj) -> None:
        self.k8s.custom.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.k8s.custom.delete_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, name
        )


@dataclass
class Row:
    """One scenario's line of the table."""

    scenario: str
    objects: int = 0
    reconciles: int = 0
    faults: int = 0
    duplicates: int = 0
    lost: int = 0
    partial: int = 0
    final: int = 0
    checks: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def final_pct(self) -> float:
        return 100.0 * self.final / self.checks if self.checks else 0.0

    @property
    def ok(self) -> bool:
        return self.duplicates == self.lost == self.partial == 0 and self.final == self.checks


def _retrying(call: Callable[[], Any], seconds: float = 60.0) -> Any:
    """An API call that rides out an API-server restart (the driver's own calls)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except (ApiException, OSError, Exception) as exc:
            if isinstance(exc, ApiException) and exc.status not in (None, 0, 500, 503, 504):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ------------------------------------------------------------------ recording


@dataclass
class JobSeen:
    name: str
    owner_uid: str
    model: str
    spec_hash: str
    succeeded: bool = False


class Recorder:
    """Every Job and serving Deployment of the namespace, as a watch sees them:
    list, then watch from the last resourceVersion, relisting after a break (an
    API-server restart), so Jobs created and removed between two polls still count."""

    def __init__(self, k8s: K8s, namespace: str) -> None:
        self.k8s, self.namespace = k8s, namespace
        self.jobs: dict[str, JobSeen] = {}
        self.templates: dict[str, set[str]] = {}  # Deployment uid -> artifact shas its template ran
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Recorder:
        for kind in ("jobs", "deployments"):
            t = threading.Thread(target=self._loop, args=(kind,), daemon=True, name=kind)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _call(self, kind: str, **kw: Any) -> Any:
        if kind == "jobs":
            return self.k8s.batch.list_namespaced_job(
                self.namespace, label_selector=MODEL_LABEL, _preload_content=False, **kw
            )
        return self.k8s.apps.list_namespaced_deployment(
            self.namespace, label_selector=MODEL_LABEL, _preload_content=False, **kw
        )

    def _loop(self, kind: str) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = json.loads(self._call(kind).data)
                    for item in listing["items"]:
                        self._see(kind, item)
                    version = listing["metadata"]["resourceVersion"]
                stream = self._call(
                    kind,
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,
                    _request_timeout=30,
                )
                try:
                    for line in stream:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            version = None
                            break
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._see(kind, event["object"])
                finally:
                    stream.release_conn()
            except Exception:
                version = None
                self._stop.wait(0.3)

    def _see(self, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        with self._lock:
            if kind == "jobs":
                labels = meta.get("labels") or {}
                owner = next((o["uid"] for o in meta.get("ownerReferences") or []), "")
                seen = self.jobs.setdefault(
                    meta["uid"],
                    JobSeen(
                        meta["name"],
                        owner,
                        labels.get(MODEL_LABEL, ""),
                        labels.get(f"{API_GROUP}/spec-hash", ""),
                    ),
                )
                conds = (obj.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Complete" and c["status"] == "True" for c in conds):
                    seen.succeeded = True
            else:
                ann = obj["spec"]["template"]["metadata"].get("annotations") or {}
                if ann.get(SHA_ANNOTATION):
                    self.templates.setdefault(meta["uid"], set()).add(ann[SHA_ANNOTATION])

    def duplicates(self) -> int:
        with self._lock:
            per = Counter((j.owner_uid, j.spec_hash) for j in self.jobs.values())
        return sum(n - 1 for n in per.values() if n > 1)

    def duplicate_names(self) -> list[str]:
        with self._lock:
            per = Counter((j.owner_uid, j.name) for j in self.jobs.values())
        return [f"{name} x{n}" for (_, name), n in per.items() if n > 1]

    def succeeded(self, owner_uid: str, spec_hash: str) -> list[str]:
        with self._lock:
            return [
                j.name
                for j in self.jobs.values()
                if j.owner_uid == owner_uid and j.spec_hash == spec_hash and j.succeeded
            ]

    def completions(self) -> int:
        with self._lock:
            return sum(j.succeeded for j in self.jobs.values())

    def rollouts(self) -> int:
        with self._lock:
            return sum(len(shas) for shas in self.templates.values())

    def rolled_out(self) -> set[str]:
        with self._lock:
            return set().union(*self.templates.values()) if self.templates else set()


# ------------------------------------------------------- the compressor hook


def artifact_bytes(namespace: str, name: str, spec_hash: str) -> bytes:
    return f"edgeslim chaos artifact {namespace}/{name}/{spec_hash}\n".encode()


class StoredResults:
    """Node-agent hook: compressor pods of `namespace` end, after a random delay,
    with a passing result whose artifact (and manifest) really is in storage;
    `content` picks the bytes, `after_store` may tamper with them afterwards."""

    def __init__(
        self,
        bed: Bed,
        rng: random.Random,
        delay: tuple[float, float] = (0.0, 0.0),
        content: Callable[[CompressedModel, str], bytes] | None = None,
        after_store: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.bed, self.rng, self.delay = bed, rng, delay
        self.content = content
        self.after_store = after_store
        self.expected: dict[tuple[str, str], str] = {}  # (name, spec hash) -> artifact sha
        self._s3 = bed.s3.client()

    def __call__(self, pod: Obj) -> PodOutcome | None:
        labels = pod["metadata"].get("labels") or {}
        if pod["metadata"]["namespace"] != self.bed.namespace or MODEL_LABEL not in labels:
            return None
        if labels.get("app.kubernetes.io/component") != "compressor":
            return None
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        model = CompressedModel.model_validate_json(env[SPEC_ENV])
        message = json.loads(result_message(env[SPEC_ENV]))
        name, spec_hash = message["name"], message["specHash"]
        data = (
            self.content(model, spec_hash)
            if self.content
            else artifact_bytes(self.bed.namespace, name, spec_hash)
        )
        sha = hashlib.sha256(data).hexdigest()
        # Where the compressor of this spec writes (the layout is storage's to decide).
        assert model.spec.output is not None
        prefix = storage.result_prefix(
            model.spec.output.uri, model.metadata.namespace, name, spec_hash
        )
        message["artifact"] |= {
            "uri": storage.join(prefix, "model.onnx"),
            "sha256": sha,
            "sizeBytes": len(data),
        }
        message["manifestUri"] = storage.join(prefix, "manifest.json")
        bucket, _, key = message["artifact"]["uri"].removeprefix("s3://").partition("/")
        self._s3.put_object(Bucket=bucket, Key=key, Body=data)
        mbucket, _, mkey = message["manifestUri"].removeprefix("s3://").partition("/")
        self._s3.put_object(Bucket=mbucket, Key=mkey, Body=json.dumps(message).encode())
        if self.after_store:
            self.after_store(bucket, key, data)
        self.expected[(name, spec_hash)] = sha
        time.sleep(self.rng.uniform(*self.delay))
        return PodOutcome(0, json.dumps(message))


# ---------------------------------------------------------------- a lifecycle


def spec_hash_of(obj: Obj) -> str:
    return CompressedModel.model_validate(obj).spec.spec_hash()


def settled(obj: Obj, phases: set[str] = FINAL) -> bool:
    """In one of `phases` for the current generation; Ready with a Deployment
    means its rollout completed on the current artifact."""
    st = obj.get("status") or {}
    if st.get("phase") not in phases:
        return False
    if st.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    if st.get("specHash") != spec_hash_of(obj):
        return False
    if st["phase"] == "Ready" and obj["spec"].get("deployment"):
        return st.get("servingArtifact") == (st.get("artifact") or {}).get("sha256")
    return True


def wait_settled(
    bed: Bed, names: list[str], deadline: float, check: Callable[[Obj], bool] = settled
) -> dict[str, Obj]:
    """The objects of `names` that pass `check` by `deadline` seconds from now."""
    end = time.monotonic() + deadline
    done: dict[str, Obj] = {}
    while True:
        with contextlib.suppress(Exception):  # the API server may be restarting
            objs = bed.objects()
            done = {n: objs[n] for n in names if n in objs and check(objs[n])}
        if len(done) == len(names) or time.monotonic() > end:
            return done
        time.sleep(0.5)


def wait_gone(bed: Bed, names: list[str], deadline: float) -> int:
    end = time.monotonic() + deadline
    left = set(names)
    while left and time.monotonic() < end:
        with contextlib.suppress(Exception):
            left &= set(bed.objects())
        time.sleep(0.5)
    return len(names) - len(left)


def count_lost(rec: Recorder, hook: StoredResults, objs: Iterable[Obj]) -> tuple[int, list[str]]:
    """Objects whose current spec's Job succeeded while status lacks its result."""
    lost, which = 0, []
    for obj in objs:
        h = spec_hash_of(obj)
        jobs = rec.succeeded(obj["metadata"]["uid"], h)
        if not jobs:
            continue
        st = obj.get("status") or {}
        want = hook.expected.get((obj["metadata"]["name"], h))
        got = (st.get("artifact") or {}).get("sha256")
        recorded = st.get("specHash") == h and st.get("jobName") in jobs and got == want
        if not (recorded and st.get("results")):
            lost += 1
            which.append(obj["metadata"]["name"])
    return lost, which


def lifecycle(
    bed: Bed,
    rec: Recorder,
    hook: StoredResults,
    names: list[str],
    row: Row,
    deadline: float,
    *,
    after_create: Callable[[], None] | None = None,
    after_change: Callable[[], None] | None = None,
) -> None:
    """Create (half with the cleanup finalizer), spec change, delete -- each
    followed by a wait for every object to settle, and the lost-result check."""
    for i, name in enumerate(names):
        body = model_body(
            name,
            bed.bucket,
            max_drop=FIRST_DROP,
            annotations={CLEANUP_ANNOTATION: "true"} if i % 2 else None,
        )
        body["spec"]["deployment"] = deployment()
        _retrying(lambda body=body: create_model(bed.k8s, bed.namespace, body))
    row.objects += len(names)
    row.reconciles += len(names)
    if after_create:
        after_create()
    for step in ("create", "change"):
        if step == "change":
            for name in names:
                _retrying(
                    lambda name=name: bed.patch_spec(
                        name, {"evaluation": {"maxMetricDrop": SECOND_DROP}}
                    )
                )
            row.reconciles += len(names)
            if after_change:
                after_change()
        # Every result passes the gate: anything but Ready (RolloutFailed, say) is wrong.
        done = wait_settled(bed, names, deadline, lambda o: settled(o, {"Ready"}))
        row.final += len(done)
        row.checks += len(names)
        if len(done) < len(names):
            objs = _retrying(bed.objects)
            stuck = {n: (objs.get(n) or {}).get("status", {}) for n in names if n not in done}
            row.notes.append(f"not final after {step}: " + _describe(stuck))
        lost, which = count_lost(rec, hook, _retrying(bed.objects).values())
        row.lost += lost
        if which:
            row.notes.append(f"lost after {step}: {', '.join(which)}")
    for name in names:
        with contextlib.suppress(ApiException):
            _retrying(lambda name=name: bed.delete(name))
    row.reconciles += len(names)
    gone = wait_gone(bed, names, deadline)
    row.final += gone
    row.checks += len(names)
    if gone < len(names):
        row.notes.append(f"{len(names) - gone} objects not deleted within {deadline:.0f} s")


def _count_duplicates(row: Row, rec: Recorder) -> None:
    row.duplicates = rec.duplicates()
    if row.duplicates:
        row.notes.append("duplicate Jobs: " + ", ".join(rec.duplicate_names()))


def _describe(stuck: dict[str, Obj]) -> str:
    return "; ".join(
        f"{n}: {st.get('phase')} ({st.get('reason') or ''}) {str(st.get('message') or '')[:120]}"
        for n, st in list(stuck.items())[:5]
    )


# ------------------------------------------------------- 1. operator SIGKILL


class Killer:
    """SIGKILLs the operator after a random uptime (counted from /readyz) and
    starts a new one at once, until stopped; returns the last one running."""

    def __init__(
        self, start: Callable[[], Operator], rng: random.Random, interval: tuple[float, float]
    ) -> None:
        self._start, self.rng, self.interval = start, rng, interval
        self.kills = 0
        self.op: Operator | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="killer")
        self.error: BaseException | None = None

    def start(self) -> Killer:
        self.op = self._start()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.rng.uniform(*self.interval)):
                assert self.op is not None
                self.op.kill()
                self.kills += 1
                self.op = self._start()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> Operator:
        self._stop.set()
        self._thread.join(timeout=120)
        if self.error is not None:
            raise RuntimeError(f"restarting the operator failed: {self.error}") from self.error
        assert self.op is not None
        return self.op


def operator_kills(
    bed: Bed,
    *,
    objects: int = 16,
    min_kills: int = 20,
    min_reconciles: int = 100,
    interval: tuple[float, float] = (0.5, 3.0),
    deadline: float = 180.0,
    seed: int = 1,
) -> Row:
    """Scenario 1: the operator SIGKILLed at random points and restarted, while
    objects are created, compressed, rolled out, changed, rolled out again and
    deleted; rounds of `objects` repeat until both minimums are reached."""
    rng = random.Random(seed)
    row = Row("operator SIGKILL + restart")
    rec = Recorder(bed.k8s, bed.namespace).start()
    hook = StoredResults(bed, rng, delay=(0.0, 3.0))
    started = time.monotonic()
    killer = Killer(lambda: bed.start_operator(**STUB_ENV), rng, interval)
    try:
        with bed.agent.hooked(hook):
            killer.start()
            rounds = 0
            while rounds == 0 or (
                rounds < 10
                and (
                    killer.kills < min_kills
                    or row.reconciles + rec.completions() + rec.rollouts() < min_reconciles
                )
            ):
                names = [f"k{rounds}-{i}" for i in range(objects)]
                lifecycle(bed, rec, hook, names, row, deadline)
                rounds += 1
            op = killer.stop()
            op.log_tail()
    finally:
        killer._stop.set()
        rec.stop()
    row.faults = killer.kills
    row.reconciles += rec.completions() + rec.rollouts()
    _count_duplicates(row, rec)
    row.seconds = time.monotonic() - started
    return row


# -------------------------------------------------------- 2. S3 during upload


# Which PUT under an object's prefix the server dies on (the pipeline stages
# then publishes the model, then the manifest: see edgeslim/storage/s3.py).
UPLOAD_CUTS = {
    1: "model staging upload",
    2: "model publish (server-side copy)",
    3: "manifest staging upload",
    4: "manifest publish",
}


class BucketPoller:
    """Polls the bucket as a reader would, all through the run: every
    `manifest.json` must name an artifact that is there with the manifest's
    sha256. A `model.onnx` without a manifest is the window between the two
    uploads (the manifest is the commit mark); one left at the end is partial."""

    def __init__(self, s3: S3Server, bucket: str, prefix: str = "") -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, prefix
        self.bad: dict[str, str] = {}  # artifact dir -> what was wrong
        self.unpublished: set[str] = set()  # dirs seen with a model but no manifest yet
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bucket-poller")

    def start(self) -> BucketPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):  # down is down: nobody reads then
                self.poll()

    def poll(self) -> set[str]:
        """One look; returns the dirs that hold a model without a manifest now."""
        s3 = self.s3.client()
        files: dict[str, set[str]] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for o in page.get("Contents", []):
                d, _, base = o["Key"].rpartition("/")
                files.setdefault(d, set()).add(base)
        waiting = set()
        for d, names in files.items():
            if "manifest.json" in names:
                manifest = json.loads(
                    s3.get_object(Bucket=self.bucket, Key=f"{d}/manifest.json")["Body"].read()
                )
                art = manifest.get("artifact") or {}
                _, _, key = str(art.get("uri", "")).removeprefix("s3://").partition("/")
                try:
                    data = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                except s3.exceptions.NoSuchKey:
                    self.bad[d] = f"manifest names {key}, which is missing"
                    continue
                if hashlib.sha256(data).hexdigest() != art.get("sha256"):
                    self.bad[d] = f"{key} does not match the manifest's sha256"
            elif "model.onnx" in names:
                waiting.add(d)
        self.unpublished |= waiting
        self.polls += 1
        return waiting

    def stop(self) -> set[str]:
        """Stops polling; returns the dirs whose model still has no manifest."""
        self._stop.set()
        self._thread.join(timeout=30)
        return self.poll()


def s3_outage(
    bed: Bed,
    *,
    cuts: tuple[int, ...] = (1, 2, 3, 4),
    down_seconds: float = 6.0,
    deadline: float = 300.0,
) -> Row:
    """Scenario 2: the S3 server goes down in the middle of one of the compressor's
    uploads (a real `edgeslim compress`), stays down, comes back; the Job must
    retry and finish, and no reader may ever see a partial artifact.

    `bed.s3` must be an `S3Server(faults=True)` holding `digits/cnn.onnx` and
    `digits/val.npz` in `bed.bucket`."""
    row = Row("S3 down during an upload")
    rec = Recorder(bed.k8s, bed.namespace).start()
    poller = BucketPoller(bed.s3, bed.bucket, "edge/").start()
    started = time.monotonic()
    op = bed.start_operator()
    downs = 0
    try:
        for nth in cuts:
            name = f"cut{nth}"
            bed.s3.down_on_upload(f"/{name}/", nth)
            body = model_body(name, bed.bucket)
            create_model(bed.k8s, bed.namespace, body)
            row.objects += 1
            row.reconciles += 1
            downs += 1
            bed.s3.wait_down(downs, timeout=deadline)
            row.faults += 1
            time.sleep(down_seconds)
            bed.s3.up()
            done = wait_settled(bed, [name], deadline, lambda o: settled(o, {"Ready"}))
            row.checks += 1
            row.final += len(done)
            if not done:
                st = bed.objects()[name].get("status") or {}
                row.notes.append(f"{name} ({UPLOAD_CUTS[nth]}) not Ready: {_describe({name: st})}")
                continue
            job = bed.k8s.batch.read_namespaced_job(done[name]["status"]["jobName"], bed.namespace)
            retried = (job.status.failed or 0) > 0
            row.notes.append(
                f"{name}: cut during the {UPLOAD_CUTS[nth]}; "
                + ("the Job retried and completed" if retried else "completed without a retry")
            )
    finally:
        leftover = poller.stop()
        rec.stop()
        op.log_tail()
    row.reconciles += rec.completions()
    _count_duplicates(row, rec)
    row.partial = len(poller.bad) + len(leftover)
    for d, what in poller.bad.items():
        row.notes.append(f"partial: {d}: {what}")
    for d in leftover:
        row.notes.append(f"partial: {d}: model.onnx without manifest.json at the end")
    row.notes.append(
        f"{poller.polls} bucket polls; {len(poller.unpublished)} artifact dirs seen between "
        "model and manifest upload (never read: the manifest is the commit mark)"
    )
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------- 3. kube-apiserver restart


def apiserver_restarts(
    bed: Bed,
    *,
    objects: int = 12,
    restarts: int = 2,
    down_seconds: float = 5.0,
    deadline: float = 240.0,
    seed: int = 3,
) -> Row:
    """Scenario 3: kube-apiserver restarted (SIGTERM, then SIGKILL) while Jobs
    run and finish, and again after a spec change; the operator keeps running."""
    assert bed.control_plane is not None
    cp = bed.control_plane
    rng = random.Random(seed)
    row = Row("kube-apiserver restart")
    rec = Recorder(bed.k8s, bed.namespace).start()
    hook = StoredResults(bed, rng, delay=(1.0, 6.0))
    started = time.monotonic()
    op = bed.start_operator(**STUB_ENV)
    pid = op.proc.pid if op.proc else None

    def restart() -> None:
        if row.faults >= restarts:
            return
        time.sleep(rng.uniform(1.0, 3.0))  # Jobs are running and finishing now
        cp.restart_apiserver(down_seconds, kill=row.faults % 2 == 1)
        row.faults += 1

    try:
        with bed.agent.hooked(hook):
            names = [f"a{i}" for i in range(objects)]
            lifecycle(
                bed, rec, hook, names, row, deadline, after_create=restart, after_change=restart
            )
    finally:
        rec.stop()
    alive = op.proc is not None and op.proc.poll() is None and op.proc.pid == pid
    if not alive:
        row.notes.append("the operator exited: " + op.log_tail(2000))
        row.final = 0
    else:
        row.notes.append(f"operator pid {pid} ran throughout (no restart of its own)")
    row.reconciles += rec.completions() + rec.rollouts()
    _count_duplicates(row, rec)
    row.seconds = time.monotonic() - started
    return row


# -------------------------------------------------- 4. artifact flipped in S3


def tiny_onnx(offset: float) -> bytes:
    """A real, loadable model (y = x + offset over FP32[1, 4]); `offset` picks the bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.full((1, 4), offset, dtype=np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "c"], ["output"])],
        "chaos",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def served_version(k8s: K8s, namespace: str, name: str) -> set[str]:
    """The model versions (sha256 prefixes) the object's ready serving pods answer with."""
    pods = k8s.core.list_namespaced_pod(
        namespace, label_selector=f"{MODEL_LABEL}={name},app.kubernetes.io/component=serving"
    ).items
    versions = set()
    for p in pods:
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        if p.metadata.deletion_timestamp or not ready or not p.status.pod_ip:
            continue
        try:
            with urlopen_direct(f"http://{p.status.pod_ip}:8080/v2/models/{name}", timeout=5) as r:
                versions.update(json.loads(r.read())["versions"])
        except urllib.error.HTTPError as exc:
            versions.add(f"HTTP {exc.code} {exc.read()[:200]!r}")
    return versions


def corrupt_artifact(bed: Bed, *, objects: int = 3, deadline: float = 120.0) -> Row:
    """Scenario 4: after the gate passed and the result was stored, one byte of
    the new artifact flips in storage. It must never reach a Deployment (the
    object goes Failed with the reason named) and the last good artifact keeps
    serving (real `edgeslim serve` pods, real models)."""
    row = Row("artifact byte flipped in storage")
    good, bad = tiny_onnx(1.0), tiny_onnx(2.0)
    bad_sha = hashlib.sha256(bad).hexdigest()
    s3 = bed.s3.client()

    def content(model: CompressedModel, _h: str) -> bytes:
        return good if model.spec.evaluation.max_metric_drop == FIRST_DROP else bad

    def flip(bucket: str, key: str, data: bytes) -> None:
        if data == bad:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x01
            s3.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))

    rec = Recorder(bed.k8s, bed.namespace).start()
    hook = StoredResults(bed, random.Random(4), content=content, after_store=flip)
    started = time.monotonic()
    op = bed.start_operator()
    names = [f"flip{i}" for i in range(objects)]
    try:
        with bed.agent.hooked(hook):
            for name in names:
                body = model_body(name, bed.bucket, max_drop=FIRST_DROP)
                body["spec"]["deployment"] = deployment()
                create_model(bed.k8s, bed.namespace, body)
            row.objects = row.reconciles = objects
            first = wait_settled(bed, names, deadline, lambda o: settled(o, {"Ready"}))
            row.checks += objects
            row.final += len(first)
            if len(first) < objects:
                row.notes.append(
                    "not Ready on the good artifact: " + ", ".join(set(names) - set(first))
                )
            for name in names:
                bed.patch_spec(name, {"evaluation": {"maxMetricDrop": SECOND_DROP}})
            row.reconciles += objects
            row.faults = objects
            second = wait_settled(bed, names, deadline, lambda o: settled(o, {"Failed"}))
            row.checks += objects
            row.final += len(second)
            for name in names:
                obj = second.get(name) or bed.objects()[name]
                st = obj.get("status") or {}
                good_sha = hashlib.sha256(good).hexdigest()
                ready = next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})
                failed = {(f["sha256"], f["reason"]) for f in st.get("failedArtifacts") or []}
                serving = served_version(bed.k8s, bed.namespace, name)
                wrong = []
                if ready.get("reason") != "ArtifactCorrupted":
                    wrong.append(f"Ready reason {ready.get('reason')}: {ready.get('message')}")
                if (bad_sha, "ArtifactCorrupted") not in failed:
                    wrong.append(f"failedArtifacts {sorted(failed)}")
                if st.get("servingArtifact") != good_sha or serving != {good_sha[:12]}:
                    wrong.append(f"serving {st.get('servingArtifact')} / pods {serving}")
                if wrong:
                    row.partial += 1
                    row.notes.append(f"{name}: " + "; ".join(wrong))
    finally:
        rec.stop()
        op.log_tail()
    rolled = rec.rolled_out()
    if bad_sha in rolled:
        row.notes.append("the corrupt artifact reached a Deployment template")
        row.partial = max(row.partial, 1)
    else:
        row.notes.append(
            f"the corrupt artifact never reached a Deployment; {len(rolled)} artifact(s) served"
        )
    row.reconciles += rec.completions() + rec.rollouts()
    _count_duplicates(row, rec)
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------------------- the table


HEADER = (
    "scenario",
    "objects",
    "reconciles",
    "faults",
    "duplicate Jobs",
    "lost results",
    "partial artifacts",
    "final",
    "seconds",
)


def table(rows: list[Row]) -> str:
    """A Markdown table, ready for the README."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        cells = (
            r.scenario,
            r.objects,
            r.reconciles,
            r.faults,
            r.duplicates,
            r.lost,
            r.partial,
            f"{r.final}/{r.checks} ({r.final_pct:.0f}%)",
            f"{r.seconds:.0f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
