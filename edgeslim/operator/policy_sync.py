"""CompressionPolicy side effects: a policy edit re-reconciles the models it
selects (the queue then admits them `maxConcurrent` at a time), and the
policy's status counts its models by phase.

Cheap by construction: which models a policy selects and what phase each is in
come from the in-memory model index (labels, phase, status.policy), never
from an API list; model events mark their policies for a recount that runs at
most every half second, and a policy's status is written only when a count or
condition changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from edgeslim import metrics
from edgeslim.operator import compression, policy, policy_discovery
from edgeslim.operator.runtime import (
    InvalidSpec,
    ModelEntry,
    Obj,
    Runtime,
    policies,
    post_event,
    snapshot,
)
from edgeslim.operator.status import now

log = logging.getLogger("edgeslim.operator")

# One writer at a time: two threads counting from index snapshots a moment
# apart could otherwise write the older counts last.
_status_lock = threading.Lock()
# metadata.generation of each policy whose models were last reconciled for it.
_handled: dict[policy.PolicyKey, int | None] = {}
_handled_lock = threading.Lock()
# Policies whose models policy_changed is reconciling now (count of waves): the
# resync leaves those models to it rather than reconciling each a second time.
_in_wave: dict[policy.PolicyKey, int] = {}
# Reconciles of one policy's models in flight at once (each is API round-trips).
WAVE_WORKERS = 8


def _object_key(key: tuple[str, str]) -> tuple[str, str]:
    # A spec.targets variant's key is (namespace, "<name>/<target>").
    return key[0], key[1].partition("/")[0]


def _model_entries(rt: Runtime) -> list[tuple[tuple[str, str], ModelEntry]]:
    return [(k, es[0]) for k, es in snapshot(rt.models_index) if es]


def selected_models(
    entry: policy.PolicyEntry, models: Iterable[tuple[tuple[str, str], ModelEntry]]
) -> list[tuple[tuple[str, str], ModelEntry]]:
    return [(k, m) for k, m in models if entry.selects(k[0], dict(m.labels))]


def _affected(rt: Runtime, entry: policy.PolicyEntry) -> list[tuple[str, str]]:
    """Objects the policy selects now or whose status still names it."""
    keys = set()
    for key, m in _model_entries(rt):
        named = key[0] == entry.namespace and m.policy == entry.name
        if named or entry.selects(key[0], dict(m.labels)):
            keys.add(_object_key(key))
    return sorted(keys)


def event_action(event_type: str | None, before: object, generation: int | None) -> str:
    """What a policy event calls for, from its type and the generation handled
    `before` ("unseen" when none): "reconcile" its models (a new generation or a
    deleted policy), "refresh" its counts (the initial listing), or "none".

    An event for a generation already handled is a status or metadata change,
    above all our own status write echoed back: recounting on it wrote the status
    again whenever a count had moved meanwhile, about 8 writes per model in a
    1,000-model wave. Model events drive the (coalesced) recounts instead."""
    if event_type == "DELETED":
        return "reconcile"
    if event_type is None:
        return "refresh"
    return "none" if before == generation else "reconcile"


def policy_changed(rt: Runtime, event_type: str | None, body: Obj) -> None:
    """A policy event. A new generation (or a deleted policy) re-reconciles its
    models; the initial listing at startup does not (each model's resume does)."""
    entry = policy.policy_entry(body)
    with _handled_lock:
        before = _handled.get(entry.key, "unseen")
        if event_type == "DELETED":
            _handled.pop(entry.key, None)
        else:
            _handled[entry.key] = entry.generation
    action = event_action(event_type, before, entry.generation)
    if action != "reconcile":
        if policy_discovery.due(entry, time.monotonic()):  # first sight: scan at once
            policy_discovery.discover(rt, entry)
        if action == "refresh":
            refresh(rt, [entry.key])
        return
    log.info(
        "%s/%s: CompressionPolicy %s (generation %s): reconciling its models",
        entry.namespace,
        entry.name,
        "deleted" if event_type == "DELETED" else "changed",
        entry.generation,
    )
    if event_type != "DELETED":
        policy_discovery.discover(rt, entry)  # new models' own handlers take them on
    affected = _affected(rt, entry)
    if event_type != "DELETED":
        # `kubectl describe compressionpolicy` says what the edit set off.
        post_event(
            rt,
            body,
            (
                "Normal",
                "PolicyChanged",
                f"generation {entry.generation}: reconciling {len(affected)} models, "
                f"at most {entry.max_concurrent} compressing at once",
            ),
        )
    with _handled_lock:
        _in_wave[entry.key] = _in_wave.get(entry.key, 0) + 1
    try:
        # Several at once: each reconcile is a few API round-trips, and one after
        # another they started Jobs slower than the agent finished them (at most
        # 10 running in a wave of maxConcurrent 100). The queue's Slots still
        # bound what runs; this only bounds the API calls in flight.
        workers = max(1, min(WAVE_WORKERS, len(affected)))
        with ThreadPoolExecutor(workers, thread_name_prefix="policy-wave") as pool:
            list(pool.map(lambda key: reconcile_quietly(rt, key), affected))
    finally:
        with _handled_lock:
            _in_wave[entry.key] -= 1
            if not _in_wave[entry.key]:
                del _in_wave[entry.key]
    if event_type != "DELETED":
        refresh(rt, [entry.key])


def reconcile_quietly(rt: Runtime, key: tuple[str, str]) -> None:
    """Re-reconciles one model for its policy; a failure stays with that model."""
    try:
        body = rt.kube.get_model(*key)
        if body is None:
            return
        try:
            compression.reconcile_model(rt, body)
        except InvalidSpec as exc:
            compression.fail_invalid(rt, body, str(exc))
    except Exception as exc:
        metrics.reconcile_errors.labels(handler="policy").inc()
        log.warning("%s/%s: not reconciled for its policy: %s (resync retries)", *key, exc)


class _Coalesced:
    """Policy keys to recount, refreshed together at most every DELAY seconds: a
    wave over 1,000 models brings thousands of model events, and a recount costs
    a pass over the index (about 4 ms at 1,000 models)."""

    DELAY = 0.5

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirty: set[policy.PolicyKey] = set()
        self._timer: threading.Timer | None = None

    def add(self, rt: Runtime, keys: Iterable[policy.PolicyKey]) -> None:
        with self._lock:
            self._dirty.update(keys)
            if self._timer is None:
                self._timer = threading.Timer(self.DELAY, self._flush, args=(rt,))
                self._timer.daemon = True
                self._timer.start()

    def _flush(self, rt: Runtime) -> None:
        with self._lock:
            keys, self._dirty, self._timer = self._dirty, set(), None
        try:
            refresh(rt, keys)
        except Exception as exc:  # the resync recounts everything anyway
            metrics.reconcile_errors.labels(handler="policy").inc()
            log.warning("policy counts not refreshed: %s", exc)


_recount = _Coalesced()


def model_seen(rt: Runtime, body: Obj) -> None:
    """A model event: recount (soon) the policies it may count towards."""
    meta = body.get("metadata") or {}
    namespace, labels = meta.get("namespace") or "", meta.get("labels") or {}
    named = ((body.get("status") or {}).get("policy") or {}).get("name")
    # The policies selecting it now, and the one its status still names.
    keys = [
        p.key for p in policies() if p.selects(namespace, labels) or p.key == (namespace, named)
    ]
    if keys:
        _recount.add(rt, keys)


def refresh(rt: Runtime, keys: Iterable[policy.PolicyKey] | None = None) -> None:
    """Writes the status of the policies `keys` (all when None) where it changed."""
    wanted = set(keys) if keys is not None else None
    with _status_lock:
        models = _model_entries(rt)
        for entry in policies():
            if wanted is not None and entry.key not in wanted:
                continue
            by_object: dict[tuple[str, str], list[ModelEntry]] = {}
            for k, m in selected_models(entry, models):
                by_object.setdefault(_object_key(k), []).append(m)
            states = [policy.object_state(ms) for ms in by_object.values()]
            new = policy.policy_status(entry, states, now())
            if policy.same_status(entry.status, new):
                continue
            try:
                rt.kube.patch_policy_status(entry.namespace, entry.name, new)
            except Exception as exc:
                metrics.reconcile_errors.labels(handler="policy").inc()
                log.warning("%s/%s: policy status not written: %s", *entry.key, exc)


def resync(rt: Runtime) -> None:
    """Safety net: models whose status reflects an older generation of the policy
    that selects them (a reconcile failed or an event was missed) get reconciled;
    every policy's counts are refreshed."""
    by_key = {p.key: p for p in policies()}
    models = _model_entries(rt)
    stale = set()
    with _handled_lock:
        in_wave = set(_in_wave)
    for entry in by_key.values():
        if entry.key in in_wave:
            continue  # policy_changed is reconciling them right now
        for key, m in selected_models(entry, models):
            if m.phase == "Failed":
                continue  # reconciling cannot help; a spec or policy change will
            if m.observed_generation is None:
                continue  # not handled at all yet: its create handler is on it
            if (m.policy, m.policy_generation) != (entry.name, entry.generation):
                stale.add(_object_key(key))
    for key in sorted(stale):
        reconcile_quietly(rt, key)
    now = time.monotonic()
    for entry in by_key.values():
        if policy_discovery.due(entry, now):
            policy_discovery.discover(rt, entry)
    refresh(rt)
