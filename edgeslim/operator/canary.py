"""Metric-gated canary: a new artifact serves a growing share of the replicas and
is promoted only while it answers as well as the one serving now.

Readiness-gated rollout (`serving`) catches an artifact that cannot load; this
catches one that loads and answers worse. With `spec.deployment.canary` set,
a new candidate that passed the gate, while another artifact serves on every
replica, is not rolled into the Deployment. Instead:

* **Two Deployments, one Service.** The model's Deployment `<name>` keeps the
  stable artifact, scaled down to the stable share; a second Deployment
  `<name>-canary` runs the candidate on the step's share (`split`: at least one
  replica each). Both carry the Service's selector labels, so clients reach
  both in proportion to their replicas; the canary's pods carry
  `edgeslim.io/track=canary` in addition (their own ReplicaSet owns them, so
  the stable Deployment never adopts them).
* **Agreement in shadow.** The canary's pods run `edgeslim serve --shadow-url`
  with the stable pods' addresses: after answering its client, a canary pod
  sends a sample (`shadowSampleRate`) of its requests to a stable pod in the
  background and counts how often the answers agree (same top-1, or cosine;
  `edgeslim.serving.shadow`). The client always gets the canary's own answer
  and never waits. Stable pods are addressed by pod IP, fixed when the canary
  Deployment is created (a Service DNS name would need cluster DNS and a proxy
  that not every edge cluster or test bed runs; a stable pod that goes away is
  skipped by the shadow client's back-off, its failures count as errors, not
  as disagreement).
* **Measured from the pods themselves.** Each analysis the operator reads the
  canary pods' `/metrics` (request counts by code, the request-duration
  histogram, the shadow counters) over HTTP from their pod IPs: no Prometheus
  needed (`scrape`; on the test bed the pod IPs are the real serving processes'
  loopback addresses). The figures are cumulative over the canary pods' lives,
  i.e. the canary's.
* **A pure decision.** `decide(spec, step, measurement, elapsed)` returns
  advance / hold / roll back / promote and a reason: a breached threshold rolls
  back at once (once `minSamples` were seen); otherwise a step is held until
  its interval passed and enough samples came in.
* **State in status.** `status.canary` holds the candidate, the stable
  artifact, the step, its start time, the result and the latest analyses; a
  restarted operator continues from there. Every decision (and a hold once
  per interval) is an analysis entry and an Event; the CANARY column shows the
  share.
* **Endings.** Roll back: the candidate goes into `status.failedArtifacts`
  (reason `CanaryAnalysis`, with the analysis as message), the canary
  Deployment is deleted and the stable Deployment returns to all replicas: the
  stable artifact never stopped serving. Promote (the step after the last
  analysed one is 100%): the ordinary rollout takes over and rolls the
  Deployment to the candidate, replica by replica while the canary Deployment
  still serves, and the canary Deployment goes once that is complete.

**spec.targets.** Each target's rollout is canaried by this same code under the
target's key (`variants`): its body is the variant, its status the target's
`status.targets[]` entry (`canary`, `failedArtifacts` and the rest are written
there), its Deployments `<name>-<target>` and `<name>-<target>-canary`, whose
pods carry the target label, so the target's Service `<name>-<target>` reaches
its stable and canary pods and never another target's. A promotion hands over to
that target's ordinary rollout; a target dropped from the spec loses its canary
Deployment with its other serving objects (`targets.retire`), the object's
deletion through ownerReferences. The object's own `status.canary` stays unset
(the CANARY column is empty); the summary message names a target's canary while
that target is the one furthest behind, and `status.targets[].canary.shown` has
each share.
"""

from __future__ import annotations

import datetime
import http.client
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edgeslim import metrics
from edgeslim.api.canary import (
    MAX_ANALYSES,
    CanaryAnalysis,
    CanaryResult,
    CanarySpec,
    CanaryStatus,
    Verdict,
)
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import (
    MAX_FAILED_ARTIFACTS,
    CompressedModelStatus,
    FailedArtifact,
    Phase,
    ServedArtifact,
)
from edgeslim.operator import jobs, ownership, serving, status, variants
from edgeslim.operator.claimed_apply import put
from edgeslim.operator.names import (
    APPLIED_HASH_ANNOTATION,
    ARTIFACT_SHA_ANNOTATION,
    SERVING_PORT,
    serving_name,
)
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import Obj, Runtime, post_event, write_status
from edgeslim.operator.settings import Settings

log = logging.getLogger("edgeslim.operator")

TRACK_LABEL = "edgeslim.io/track"
#: How often running canaries are looked at (the loop in handlers); analyses
#: still happen once per intervalSeconds, this only bounds how late.
TICK_SECONDS = 2.0
#: Keys with a running canary, ticked by `handlers.canary_loop`. Filled by
#: `reconcile` (after a restart, the resync reconciles Deploying objects again).
ACTIVE: set[ModelKey] = set()
_METRICS_MAX_BYTES = 4 * 1024 * 1024
_METRICS_TIMEOUT = 2.0


def canary_name(model_name: str, target: str = "") -> str:
    """The canary Deployment beside the serving one: `<serving name>-canary`, so a
    spec.targets entry's is `<name>-<target>-canary` (spec validation keeps a target
    from being named `<another target>-canary`)."""
    return f"{serving_name(model_name, target)}-canary"


# ------------------------------------------------------------------ pure parts


def split(replicas: int, weight: int) -> tuple[int, int]:
    """(stable, canary) replicas for a step of `weight` percent: at least one of
    each below 100% (a single-replica model runs one extra pod during a canary),
    all canary at 100%."""
    if weight >= 100:
        return 0, replicas
    canary = max(1, round(replicas * weight / 100))
    return max(1, replicas - canary), canary


@dataclass(frozen=True)
class Measurement:
    """What the canary pods report, summed over them (cumulative)."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    samples: int = 0
    agreement_sum: float = 0.0
    pods: int = 0  # canary pods measured

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.samples if self.samples else None


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def decide(spec: CanarySpec, step: int, m: Measurement, elapsed: float) -> Decision:
    """Advance, hold, roll back or promote the canary at `step` (index into
    spec.steps) after `elapsed` seconds of it, from what its pods measured."""
    judged = m.requests >= spec.min_samples
    agreement = m.agreement
    if m.samples >= spec.min_samples and agreement is not None and agreement < spec.min_agreement:
        return Decision(
            Verdict.rollback,
            f"agreement with the stable artifact {agreement:.3f} < minAgreement "
            f"{spec.min_agreement} over {m.samples} shadow comparisons",
        )
    if judged and m.error_rate is not None and m.error_rate > spec.max_error_rate:
        return Decision(
            Verdict.rollback,
            f"error rate {m.error_rate:.4f} > maxErrorRate {spec.max_error_rate} "
            f"({m.errors} of {m.requests} requests)",
        )
    limit = spec.max_p95_ms
    if judged and limit is not None and m.p95_ms is not None and m.p95_ms > limit:
        return Decision(
            Verdict.rollback,
            f"p95 latency {m.p95_ms:.1f} ms > maxP95Ms {limit:g} over {m.requests} requests",
        )
    weight = spec.steps[step]
    if elapsed < spec.interval_seconds:
        return Decision(
            Verdict.hold, f"step {weight}% runs {spec.interval_seconds - elapsed:.0f} s more"
        )
    if not judged or m.samples < spec.min_samples:
        return Decision(
            Verdict.hold,
            f"waiting for minSamples {spec.min_samples}: {m.requests} requests, "
            f"{m.samples} shadow comparisons so far",
        )
    figures = _figures(m)
    nxt = spec.steps[step + 1] if step + 1 < len(spec.steps) else 100
    if nxt >= 100:
        return Decision(Verdict.promote, f"{figures} at {weight}%: promoted")
    return Decision(Verdict.advance, f"{figures} at {weight}%: advancing to {nxt}%")


def _figures(m: Measurement) -> str:
    parts = [f"{m.requests} requests"]
    if m.error_rate is not None:
        parts.append(f"error rate {m.error_rate:.4f}")
    if m.p95_ms is not None:
        parts.append(f"p95 {m.p95_ms:.1f} ms")
    if m.agreement is not None:
        parts.append(f"agreement {m.agreement:.3f} over {m.samples}")
    return ", ".join(parts)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram {upper bound: count}, interpolated
    within its bucket as Prometheus' histogram_quantile does."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the largest finite bucket: its bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def measure(texts: Iterable[str]) -> Measurement:
    """The canary's figures from its pods' /metrics texts."""
    requests = errors = samples = pods = 0
    agreement_sum = 0.0
    buckets: dict[float, float] = {}
    for text in texts:
        pods += 1
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "edgeslim_serving_requests_total" and s.labels.get("route") == "infer":
                    requests += int(s.value)
                    errors += int(s.value) if s.labels.get("code", "").startswith("5") else 0
                elif s.name == "edgeslim_serving_request_duration_seconds_bucket":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif (
                    s.name == "edgeslim_serving_shadow_requests_total"
                    and s.labels.get("result") == "compared"
                ):
                    samples += int(s.value)
                elif s.name == "edgeslim_serving_shadow_agreement_sum_total":
                    agreement_sum += s.value
    p95 = quantile(buckets, 0.95)
    return Measurement(
        requests=requests,
        errors=errors,
        p95_ms=None if p95 is None else p95 * 1e3,
        samples=samples,
        agreement_sum=agreement_sum,
        pods=pods,
    )


def seconds_since(when: str, now: str) -> float:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    a = datetime.datetime.strptime(when, fmt)
    b = datetime.datetime.strptime(now, fmt)
    return (b - a).total_seconds()


def build_canary_deployment(
    model: CompressedModel,
    artifact: ServedArtifact,
    replicas: int,
    shadow_url: str,
    settings: Settings,
) -> Obj:
    """The canary Deployment: the serving Deployment of `artifact` under its own
    name, with the track label on its pods and the shadow flags."""
    spec = model.spec.deployment
    if spec is None or spec.canary is None:
        raise ValueError(f"{model.metadata.name} has no spec.deployment.canary")
    manifest = serving.build_deployment(model, artifact, settings)
    meta = manifest["metadata"]
    # A target's variant model: its labels (the target's Service selects them) and name.
    meta["name"] = canary_name(model.metadata.name, jobs.target_name(model))
    meta["labels"] = {**meta["labels"], TRACK_LABEL: "canary"}
    body = manifest["spec"]
    body["replicas"] = replicas
    body["selector"]["matchLabels"] = {**body["selector"]["matchLabels"], TRACK_LABEL: "canary"}
    body["template"]["metadata"]["labels"] = {
        **body["template"]["metadata"]["labels"],
        TRACK_LABEL: "canary",
    }
    container = body["template"]["spec"]["containers"][0]
    if shadow_url:
        container["command"] = [
            *container["command"],
            "--shadow-url",
            shadow_url,
            "--shadow-sample-rate",
            str(spec.canary.shadow_sample_rate),
        ]
    del meta["annotations"][APPLIED_HASH_ANNOTATION]
    meta["annotations"][APPLIED_HASH_ANNOTATION] = serving.applied_hash(manifest)
    return manifest


def scaled(manifest: Obj, replicas: int) -> Obj:
    """The stable Deployment's manifest at `replicas` (its applied hash follows)."""
    manifest["spec"]["replicas"] = replicas
    del manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = serving.applied_hash(manifest)
    return manifest


def shadow_url_of(deployment: Obj | None) -> str | None:
    """The --shadow-url a canary Deployment was created with (kept for its life, so
    its pods are not restarted, and their counts not lost, when stable pods change)."""
    if deployment is None:
        return None
    command = deployment["spec"]["template"]["spec"]["containers"][0].get("command") or []
    for flag, value in pairwise(command):
        if flag == "--shadow-url":
            return value
    return None


def _ready(pod: Obj) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def stable_urls(pods: list[Obj], sha256: str) -> str:
    """http://podIP:8080 of the ready pods running the stable artifact."""
    urls = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        ip = (pod.get("status") or {}).get("podIP")
        labels = meta.get("labels") or {}
        sha = (meta.get("annotations") or {}).get(ARTIFACT_SHA_ANNOTATION)
        stable = sha == sha256 and labels.get(TRACK_LABEL) != "canary"
        if ip and stable and _ready(pod) and not meta.get("deletionTimestamp"):
            urls.append(f"http://{ip}:{SERVING_PORT}")
    return ",".join(sorted(urls))


# ------------------------------------------------------------------ measuring


def scrape(pods: list[Obj]) -> list[str]:
    """The /metrics texts of the ready pods: GET http://<podIP>:8080/metrics, straight
    from the operator (no Prometheus); a pod that does not answer is left out of this
    analysis."""
    texts = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or not _ready(pod):
            continue
        conn = http.client.HTTPConnection(ip, SERVING_PORT, timeout=_METRICS_TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            data = resp.read(_METRICS_MAX_BYTES)
            if resp.status == 200:
                texts.append(data.decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException) as exc:
            log.info("canary pod %s: metrics not read: %s", ip, exc)
        finally:
            conn.close()
    return texts


# ------------------------------------------------------------------ reconcile


def _short(sha: str) -> str:
    return sha[:12]


def _about(key: ModelKey) -> str:
    """An Event's lead for a target's canary (Events are the object's, like the
    rollout's `target <name>: ...`)."""
    target = variants.target_of(key)
    return f"target {target}: " if target else ""


def selector(model_name: str, target: str, canary: bool) -> str:
    """The pods of the model's (or its target's) Deployments; a target's never select
    another target's pods (the target label is part of its selector)."""
    labels = serving.selector_labels(model_name, target)
    base = ",".join(f"{k}={v}" for k, v in labels.items())
    return f"{base},{TRACK_LABEL}=canary" if canary else base


def reconcile(
    rt: Runtime, key: ModelKey, body: Obj, model: CompressedModel, main: Obj | None
) -> bool:
    """Runs the canary step for `key`; True when the canary owns the serving side
    this time (the ordinary rollout must not touch the Deployment), False when
    the ordinary rollout goes on (no canary, or it ended).

    A spec.targets entry's key runs the same steps on its variant (see `variants`):
    its body's status is the target's entry, its Deployments `<name>-<target>` and
    `<name>-<target>-canary`, and every status write goes into that entry."""
    namespace, name, target = variants.split(key)
    cname = canary_name(name, target)
    spec = model.spec.deployment.canary if model.spec.deployment else None
    cur = status.parse(body.get("status"))
    c = cur.canary
    canary_dep = rt.kube.read_deployment(namespace, cname) if (spec or c) else None
    # Never touch (scale, delete) a `<name>-canary` that is not this model's: NameConflict.
    found = ownership.claim(canary_dep, "Deployment", cname, name, model.metadata.uid or "")
    ownership.require(found, namespace)
    spec_hash = model.spec.spec_hash()
    cand = serving.candidate(cur, spec_hash)
    state = serving.rollout_state(main)
    running = c is not None and c.result is CanaryResult.running

    if running and (spec is None or cand is None or cand.sha256 != c.artifact):
        # The spec changed under a running canary (or the canary was switched off):
        # it ends without a verdict on the artifact, the ordinary rollout decides.
        _end(rt, key, body, CanaryResult.rolled_back, "the spec changed; canary abandoned")
        running = False
        c = None
    if not running:
        ACTIVE.discard(key)
        _cleanup(rt, key, cname, canary_dep, c, state)
        if spec is None or not _starts(cur, spec_hash, cand, state, c):
            return False
        assert cand is not None and cur.last_good_artifact is not None
        c = _start(rt, key, body, spec, cand, cur.last_good_artifact)
        if c is None:
            return True
        canary_dep = None
    assert spec is not None and c is not None and cand is not None
    ACTIVE.add(key)
    stable = cur.last_good_artifact
    if stable is None or stable.sha256 != c.stable:
        return True  # the status moved on meanwhile; the next reconcile reads it again

    # Measure and decide.
    now = status.now()
    pods = rt.kube.list_pods(namespace, selector(name, target, canary=True))
    pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    m = measure(scrape(pods))
    canary_state = serving.rollout_state(canary_dep)
    if canary_state.rollout is serving.Rollout.failed:
        d = Decision(
            Verdict.rollback,
            f"canary pods not ready within progressDeadlineSeconds ({canary_state.message})",
        )
    elif canary_dep is None or canary_state.ready_replicas < canary_state.replicas:
        d = Decision(
            Verdict.hold,
            f"waiting for canary pods: {canary_state.ready_replicas} "
            f"of {split(_replicas(model), c.weight)[1]} ready",
        )
    else:
        d = decide(spec, c.step, m, seconds_since(c.step_started, now))
    last = c.analyses[-1].time if c.analyses else c.step_started
    record = d.verdict is not Verdict.hold or seconds_since(last, now) >= spec.interval_seconds
    if record:
        c = _record(rt, key, body, c, m, d, now, spec, cand, spec_hash, stable)
        if c is None:
            return True
        if c.result is not CanaryResult.running:
            ACTIVE.discard(key)
            _cleanup(rt, key, cname, rt.kube.read_deployment(namespace, cname), c, state)
            return False  # promoted or rolled back: the ordinary rollout goes on

    # Apply the step: stable scaled to its share, the canary to its own.
    stable_n, canary_n = split(_replicas(model), c.weight)
    manifest = scaled(serving.build_deployment(model, stable, rt.settings), stable_n)
    if main is None or state.applied_hash != _hash(manifest):
        put(rt, model, manifest, main)
    url = shadow_url_of(canary_dep)
    if url is None:
        url = stable_urls(
            rt.kube.list_pods(namespace, selector(name, target, canary=False)), stable.sha256
        )
    wanted = build_canary_deployment(model, cand, canary_n, url, rt.settings)
    have = ((canary_dep or {}).get("metadata", {}).get("annotations") or {}).get(
        APPLIED_HASH_ANNOTATION
    )
    if canary_dep is None or have != _hash(wanted):
        put(rt, model, wanted, canary_dep)
    return True


def _hash(manifest: Obj) -> str:
    return manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]


def _replicas(model: CompressedModel) -> int:
    return model.spec.deployment.replicas if model.spec.deployment else 1


def _starts(
    cur: CompressedModelStatus,
    spec_hash: str,
    cand: ServedArtifact | None,
    state: serving.RolloutState,
    last: CanaryStatus | None,
) -> bool:
    """A canary starts for a new candidate while another artifact serves everywhere."""
    good = cur.last_good_artifact
    if cand is None or good is None or cand.sha256 == good.sha256:
        return False
    if serving.is_failed(cur.failed_artifacts, cand.sha256, spec_hash):
        return False
    if last is not None and last.artifact == cand.sha256:
        return False  # this candidate had its canary (promoted, or abandoned)
    deployed = state.artifact
    return (
        state.rollout is serving.Rollout.complete
        and deployed is not None
        and deployed.sha256 == good.sha256
    )


def _cleanup(
    rt: Runtime,
    key: ModelKey,
    cname: str,
    canary_dep: Obj | None,
    c: CanaryStatus | None,
    state: serving.RolloutState,
) -> None:
    """Deletes the canary Deployment once it is no longer needed: after a roll back
    at once; after a promotion once the Deployment serves the artifact everywhere."""
    if canary_dep is None:
        return
    if c is not None and c.result is CanaryResult.promoted:
        done = (
            state.rollout is serving.Rollout.complete
            and state.artifact is not None
            and state.artifact.sha256 == c.artifact
        )
        if not done:
            return
    rt.kube.delete_deployment(key[0], cname, canary_dep["metadata"]["uid"])
    log.info("%s/%s: canary Deployment %s deleted", *key, cname)


def remove(rt: Runtime, namespace: str, name: str, target: str, uid: str) -> None:
    """Deletes the canary Deployment of `name` (or of its `target`) when it is there
    and this object's: a target gone from the spec, spec.deployment gone. Only a
    canary's (its track label), never a serving Deployment of the same name."""
    cname = canary_name(name, target)
    obj = rt.kube.read_deployment(namespace, cname)
    found = ownership.claim(obj, "Deployment", cname, name, uid)
    if obj is None or found.verdict is not ownership.Verdict.owned:
        return
    if (obj["metadata"].get("labels") or {}).get(TRACK_LABEL) == "canary":
        rt.kube.delete_deployment(namespace, cname, obj["metadata"]["uid"])
        log.info("%s/%s: canary Deployment %s deleted", namespace, name, cname)


def _serving_status(
    cur: CompressedModelStatus, generation: int | None, stable: ServedArtifact, c: CanaryStatus
) -> Obj:
    n = len(c.analyses)
    last = f"; last analysis: {c.analyses[-1].reason}" if n else ""
    message = (
        f"canary: artifact {_short(c.artifact)} on {c.weight}% of the replicas, "
        f"{_short(stable.sha256)} serves the rest{last}"
    )
    p = serving.Plan(
        target=stable,
        phase=Phase.deploying,
        available="True",
        reason="Canary",
        message=message,
        serving=stable.sha256,
        ready_replicas=cur.ready_replicas,
        last_good=cur.last_good_artifact,
        failed=tuple(cur.failed_artifacts),
    )
    wire = serving.apply_plan(cur, generation, p, status.now())
    wire["canary"] = c.wire()
    return wire


def _start(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    spec: CanarySpec,
    cand: ServedArtifact,
    stable: ServedArtifact,
) -> CanaryStatus | None:
    now = status.now()
    c = CanaryStatus(
        artifact=cand.sha256,
        stable=stable.sha256,
        step=0,
        weight=spec.steps[0],
        shown=f"{spec.steps[0]}%",
        step_started=now,
    )
    generation = body["metadata"].get("generation")
    new = write_status(rt, key, lambda cur, _b: _serving_status(cur, generation, stable, c), body)
    if new is None:
        return None
    post_event(
        rt,
        body,
        (
            "Normal",
            "CanaryStarted",
            f"{_about(key)}artifact {_short(cand.sha256)} on {spec.steps[0]}% of the replicas, "
            f"compared with {_short(stable.sha256)}",
        ),
    )
    return c


def _record(
    rt: Runtime,
    key: ModelKey,
    body: Obj,
    c: CanaryStatus,
    m: Measurement,
    d: Decision,
    now: str,
    spec: CanarySpec,
    cand: ServedArtifact,
    spec_hash: str,
    stable: ServedArtifact,
) -> CanaryStatus | None:
    """The analysis and its consequence in status, then its Event."""
    analysis = CanaryAnalysis(
        time=now,
        step=c.step,
        weight=c.weight,
        requests=m.requests,
        error_rate=None if m.error_rate is None else round(m.error_rate, 6),
        p95_ms=None if m.p95_ms is None else round(m.p95_ms, 3),
        samples=m.samples,
        agreement=None if m.agreement is None else round(m.agreement, 6),
        verdict=d.verdict,
        reason=d.reason,
    )
    update: dict[str, Any] = {"analyses": [*c.analyses, analysis][-MAX_ANALYSES:]}
    if d.verdict is Verdict.advance:
        step = c.step + 1
        update |= {
            "step": step,
            "weight": spec.steps[step],
            "shown": f"{spec.steps[step]}%",
            "step_started": now,
        }
    elif d.verdict is Verdict.promote:
        update |= {"result": CanaryResult.promoted, "shown": None, "reason": d.reason}
    elif d.verdict is Verdict.rollback:
        update |= {"result": CanaryResult.rolled_back, "shown": None, "reason": d.reason}
    new_c = c.model_copy(update=update)
    generation = body["metadata"].get("generation")

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj | None:
        if (
            cur.canary is None
            or cur.canary.artifact != c.artifact
            or cur.canary.result is not CanaryResult.running
        ):
            return None  # another reconcile decided meanwhile
        if d.verdict is Verdict.rollback:
            entry = FailedArtifact(
                sha256=cand.sha256,
                spec_hash=spec_hash,
                reason=serving.CANARY_REASON,
                message=d.reason,
            )
            failed = [*cur.failed_artifacts, entry][-MAX_FAILED_ARTIFACTS:]
            cur = cur.model_copy(update={"failed_artifacts": failed})
        if d.verdict in (Verdict.rollback, Verdict.promote):
            wire = cur.wire()
            wire["canary"] = new_c.wire()
            return wire
        return _serving_status(cur, generation, stable, new_c)

    if write_status(rt, key, compute, body) is None:
        return None
    if d.verdict is Verdict.rollback:
        metrics.rollouts.labels(result="rolled_back").inc()
    kind, reason = {
        Verdict.advance: ("Normal", "CanaryAdvanced"),
        Verdict.hold: ("Normal", "CanaryHeld"),
        Verdict.promote: ("Normal", "CanaryPromoted"),
        Verdict.rollback: ("Warning", "CanaryRolledBack"),
    }[d.verdict]
    message = f"{_about(key)}artifact {_short(cand.sha256)}: {d.reason}"
    post_event(rt, body, (kind, reason, message[:1024]))
    log.info("%s/%s: canary %s: %s", *key, d.verdict.value, d.reason)
    return new_c


def _end(rt: Runtime, key: ModelKey, body: Obj, result: CanaryResult, reason: str) -> None:
    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj | None:
        if cur.canary is None or cur.canary.result is not CanaryResult.running:
            return None
        wire = cur.wire()
        wire["canary"] = cur.canary.model_copy(
            update={"result": result, "shown": None, "reason": reason}
        ).wire()
        return wire

    write_status(rt, key, compute, body)
