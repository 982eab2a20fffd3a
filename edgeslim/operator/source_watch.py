"""Re-compression when a source model is replaced (or the compressor upgraded), and lineage.

* **Lineage.** In the same status write as each recorded result (`with_lineage`):
  the source bytes the compressor used (its termination message or manifest:
  sha256, ETag, VersionId) become `status.source`, and the artifact, its
  toolchain versions and the gate's verdict join `status.history` (the last
  spec.historyLimit).
* **Checks.** `loop` wakes every few seconds and checks the objects that are due:
  every `spec.source.checkIntervalSeconds` (default the operator's
  EDGESLIM_SOURCE_CHECK_SECONDS), at once when the `edgeslim.io/check-source`
  annotation or the spec changed. A restarted operator resumes each object's clock
  from status (`source.checkedAt`, else the newest history entry); a check
  is one S3 HEAD (or a stat; a local file is read only when its size or mtime
  moved), with the object's own Secret, a bounded number at a time. Which
  objects are due comes from an index filled by the watch: no API call for the
  objects that are not.
* **Re-compression.** A replaced source (or, with spec.recompressOnUpgrade,
  another compressor version than the one that made the artifact) starts one
  compression of the same spec under a Job named after the change
  (`names.job_name(..., revision)`), recorded in `status.recompression` before the
  Job exists, so a restarted operator adopts that Job instead of starting a
  second. The serving Deployment keeps its artifact meanwhile (`serving.plan`
  only rolls out a result that passed the gate), and a result the gate rejects
  leaves it serving, which status and an Event say.
* **Targets.** An object with spec.targets is checked as a whole (one HEAD: the
  source is shared), then each target as a `Unit` of its own (variant key, body
  and status entry, see `variants`): its entry holds its source, re-compression
  and history, so the same functions decide and record for it, and each target
  re-compresses once, through the same queue, while its old artifact serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeslim import metrics
from edgeslim.api.lineage import HistoryEntry, Recompression, SourceIdentity
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.api.termination import TerminationMessage
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import status, variants
from edgeslim.operator.names import API_GROUP, job_name
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import (
    InvalidSpec,
    Obj,
    Runtime,
    parse_model,
    post_event,
    snapshot,
    storage_credentials,
    variant_body,
    write_status,
)
from edgeslim.operator.settings import Settings
from edgeslim.operator.status import FINAL_PHASES, Transition
from edgeslim.storage import identity

log = logging.getLogger("edgeslim.operator")

#: Changing this annotation (any value, e.g. a timestamp) checks the source at once.
CHECK_ANNOTATION = f"{API_GROUP}/check-source"
TICK_SECONDS = 2.0
SOURCE_CHANGED = "SourceChanged"
TOOLCHAIN_UPGRADED = "ToolchainUpgraded"

Verdict = Literal["same", "changed", "hash", "unknown"]


# ------------------------------------------------------------------ the index


@dataclass(frozen=True)
class SourceEntry:
    """What deciding whether an object is due needs, read leniently from its body."""

    phase: str | None
    generation: int | None
    touched: str
    """The check annotation's value: a change asks for a check now."""
    interval: int | None
    """spec.source.checkIntervalSeconds (None: the operator's default)."""
    has_result: bool
    """status holds an artifact or a source identity: something to compare against."""
    upgrade: bool = False
    """spec.recompressOnUpgrade: checked once after the operator (maybe a new version)
    starts, even with source checks off."""
    last_checked: float | None = None
    """Epoch seconds of status.source.checkedAt (else of the newest history entry): a
    restarted operator resumes each object's clock from it instead of checking every
    object at once."""

    @property
    def token(self) -> tuple[int | None, str]:
        return self.generation, self.touched


def source_entry(body: Obj) -> SourceEntry:
    meta, raw = body.get("metadata") or {}, body.get("status") or {}
    source = ((body.get("spec") or {}).get("source")) or {}
    interval = source.get("checkIntervalSeconds")
    # With spec.targets the results live in the targets' entries: the object has one
    # if any target has, and its clock is that of the target checked longest ago.
    parts = (
        [_result_of(e) for e in variants.status_entries(raw)]
        if variants.spec_target_names(body)
        else [_result_of(raw)]
    )
    checked = [at for _, at in parts if at is not None]
    return SourceEntry(
        phase=raw.get("phase"),
        generation=meta.get("generation"),
        touched=str((meta.get("annotations") or {}).get(CHECK_ANNOTATION) or ""),
        interval=interval if isinstance(interval, int) else None,
        has_result=any(has for has, _ in parts),
        upgrade=((body.get("spec") or {}).get("recompressOnUpgrade")) is True,
        last_checked=min(checked) if checked else None,
    )


def _result_of(raw: Obj) -> tuple[bool, float | None]:
    """Whether a status (or a target's entry) has a result, and when its source was
    last checked (else its newest history entry was recorded)."""
    source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
    history = raw.get("history") if isinstance(raw.get("history"), list) else []
    newest = history[-1] if history and isinstance(history[-1], dict) else {}
    at = _epoch(source.get("checkedAt")) or _epoch(newest.get("time"))
    return bool(raw.get("artifact") or raw.get("source")), at


def _epoch(stamp: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as status.now() writes it; None if not."""
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return when.replace(tzinfo=datetime.UTC).timestamp()


def interval_of(entry: SourceEntry, settings: Settings) -> int:
    """Seconds between checks; 0 = none (the spec's, else the operator's default)."""
    return entry.interval if entry.interval is not None else settings.source_check_seconds


@dataclass(frozen=True)
class Seen:
    token: tuple[int | None, str]
    at: float


def decide(entry: SourceEntry, seen: Seen | None, now: float, settings: Settings) -> bool | None:
    """None: not due. Else due, and True when asked for explicitly (the spec or the
    check annotation changed), which checks even with interval 0."""
    if entry.phase not in FINAL_PHASES or not entry.has_result:
        return None
    every = interval_of(entry, settings)
    if seen is None:  # new to this operator (it just started): one check
        return False if every > 0 or entry.upgrade else None
    if seen.token != entry.token:
        return True
    if every > 0 and now - seen.at >= every:
        return False
    return None


# -------------------------------------------------------------- pure decisions


def _etag(value: str | None) -> str | None:
    return value.strip().strip('"') if value else None


def compare(recorded: SourceIdentity, seen: identity.StoredIdentity) -> Verdict:
    """Whether storage still holds the bytes `recorded` names: same, changed, hash
    (a local file's stat moved: compare its sha256) or unknown (nothing comparable)."""
    if recorded.version_id and seen.version_id:
        return "same" if recorded.version_id == seen.version_id else "changed"
    if recorded.etag and seen.etag:
        return "same" if _etag(recorded.etag) == _etag(seen.etag) else "changed"
    if recorded.size_bytes is not None and seen.size_bytes not in (None, recorded.size_bytes):
        return "changed"
    if seen.modified_ns is not None:
        if recorded.modified_ns == seen.modified_ns:
            return "same"
        return "hash" if recorded.sha256 else "changed"
    return "unknown"


def observed(seen: identity.StoredIdentity, sha256: str | None, at: str) -> SourceIdentity:
    return SourceIdentity(
        uri=seen.uri,
        sha256=sha256,
        size_bytes=seen.size_bytes,
        etag=seen.etag,
        version_id=seen.version_id,
        modified_ns=seen.modified_ns,
        checked_at=at,
    )


def revision(*parts: str) -> str:
    """A short digest of what changed: names the re-compression's Job."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def source_revision(seen: SourceIdentity) -> str:
    token = seen.version_id or _etag(seen.etag) or seen.sha256 or f"{seen.size_bytes}"
    return revision("source", seen.uri, token)


def artifact_version(cur: CompressedModelStatus) -> str | None:
    """The edgeslim version that made the current artifact (its history entry)."""
    entry = next((h for h in reversed(cur.history) if h.job_name == cur.job_name), None)
    return entry.versions.get("edgeslim") if entry is not None else None


def upgrade_due(cur: CompressedModelStatus, model: CompressedModel, settings: Settings) -> bool:
    """Whether the artifact was made by another edgeslim than the operator's compressor,
    and not already by the re-compression for it (a compressor image that reports
    another version than EDGESLIM_COMPRESSOR_VERSION says must not loop)."""
    made_by, wanted = artifact_version(cur), settings.compressor_version
    if not made_by or made_by == wanted or cur.spec_hash is None:
        return False
    return cur.job_name != job_name(
        model.metadata.name, cur.spec_hash, revision("toolchain", wanted)
    )


def pending(cur: CompressedModelStatus, spec_hash: str) -> Recompression | None:
    """The re-compression under way for this spec hash, if any."""
    rec = cur.recompression
    if rec is None or rec.spec_hash != spec_hash or cur.spec_hash != spec_hash:
        return None
    return rec


def pending_revision(cur: CompressedModelStatus, spec_hash: str) -> str | None:
    """The revision of the re-compression under way for this spec hash, if any: the
    compressor Job's name includes it (compression.start, resume, the queue)."""
    rec = pending(cur, spec_hash)
    return rec.revision if rec is not None else None


def superseded(cur: CompressedModelStatus, job: str, spec_hash: str) -> bool:
    """A Job of the current spec hash that status no longer names: a re-compression
    replaced it, and its (older) result must not be recorded again."""
    return cur.spec_hash == spec_hash and cur.job_name is not None and cur.job_name != job


def start_recompression(
    cur: CompressedModelStatus,
    model: CompressedModel,
    rec: Recompression,
    message: str,
    generation: int | None,
    at: str,
) -> Obj | None:
    """Status Queued for the re-compression `rec` (the queue or start() takes it
    from there), or None when it does not apply (any more)."""
    if cur.spec_hash != rec.spec_hash or cur.phase not in FINAL_PHASES:
        return None  # a compression runs, or the spec changed: that one records a source
    if cur.recompression is not None and cur.recompression.revision == rec.revision:
        return None  # started (and maybe failed) already: once per change
    job = job_name(model.metadata.name, rec.spec_hash, rec.revision)
    t = Transition(Phase.queued, rec.reason, message, spec_hash=rec.spec_hash, job_name=job)
    new = status.apply(cur, generation, t, at)
    new["recompression"] = rec.wire()
    return new


def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


def serving_now(cur: CompressedModelStatus) -> str | None:
    """sha256 of the artifact that serves while a re-compression runs, if any."""
    if cur.serving_artifact:
        return cur.serving_artifact
    return cur.last_good_artifact.sha256 if cur.last_good_artifact else None


def lineage(
    cur: CompressedModelStatus,
    job: str,
    spec_hash: str,
    result: TerminationMessage | None,
    limit: int,
    at: str,
) -> tuple[Obj, str | None] | None:
    """The status fields (wire form) to write with the result of `job`: status.source
    from the bytes the compressor used, a history entry, the re-compression done;
    plus the message when a re-compression was rejected while another artifact
    serves. None when there is nothing to record."""
    if cur.job_name != job or cur.spec_hash != spec_hash:
        return None
    if any(h.job_name == job for h in cur.history):
        return None
    if result is None or result.artifact is None:
        # No artifact (the Job failed): nothing to record, and a re-compression stays
        # in status.recompression so the same change does not start it again.
        return None
    rec = pending(cur, spec_hash)
    source = (
        SourceIdentity(
            uri=result.source.uri,
            sha256=result.source.sha256,
            size_bytes=result.source.size_bytes,
            etag=result.source.etag,
            version_id=result.source.version_id,
            checked_at=at,
        )
        if result.source is not None
        else None
    )
    entry = HistoryEntry(
        time=at,
        job_name=job,
        spec_hash=spec_hash,
        verdict="Passed" if result.gate.passed else "Rejected",
        reason=result.gate.reason[:1024],
        trigger=rec.reason if rec else "SpecChanged",
        artifact_uri=result.artifact.uri,
        artifact_sha256=result.artifact.sha256,
        source=source,
        versions=dict(result.versions or {}),
    )
    update: Obj = {"history": [h.wire() for h in [*cur.history, entry][-limit:]]}
    if source is not None:
        update["source"] = source.wire()
    if cur.recompression is not None:
        update["recompression"] = None
    warning = None
    serving = serving_now(cur)
    if rec is not None and not result.gate.passed and serving:
        warning = (
            f"the re-compression after {rec.reason} was rejected by the gate "
            f"({result.gate.reason}); artifact {_short(serving)} keeps serving"
        )[:1024]
    return update, warning


def with_lineage(
    t: Transition,
    cur: CompressedModelStatus,
    job: str,
    spec_hash: str,
    result: TerminationMessage | None,
    limit: int,
) -> Transition:
    """`t` (a finished Job's result) with its lineage written in the same status
    write, and for a rejected re-compression a message (and so an Event) saying
    which artifact keeps serving."""
    out = lineage(cur, job, spec_hash, result, limit, status.now())
    if out is None:
        return t
    update, warning = out
    return dataclasses.replace(t, extra=update, message=warning or t.message)


def _write_source(rt: Runtime, key: ModelKey, spec_hash: str, seen: SourceIdentity) -> None:
    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj | None:
        if cur.spec_hash != spec_hash or cur.phase not in FINAL_PHASES:
            return None
        old = cur.source
        keep_sha = old.sha256 if old is not None and old.uri == seen.uri else None
        new = seen.model_copy(update={"sha256": seen.sha256 or keep_sha})
        return cur.model_copy(update={"source": new}).wire()

    write_status(rt, key, compute)


@dataclass(frozen=True)
class Unit:
    """What one check looks at: an object without targets, or one target of an object
    (its variant key, body and status entry: see `variants`). The source is the
    object's for all of them; each compares it with the source its own artifact was
    made from and re-compresses on its own."""

    key: ModelKey
    body: Obj
    model: CompressedModel
    cur: CompressedModelStatus

    @property
    def target(self) -> str:
        return variants.target_of(self.key)

    @property
    def spec_hash(self) -> str:
        return self.model.spec.spec_hash()

    @property
    def checkable(self) -> bool:
        """Final for its current spec, with a result to compare against (a target
        still compressing records the source its Job uses anyway)."""
        cur = self.cur
        has_result = cur.artifact is not None or cur.source is not None
        return cur.spec_hash == self.spec_hash and cur.phase in FINAL_PHASES and has_result


def units(key: ModelKey, body: Obj, model: CompressedModel) -> list[Unit]:
    """The object itself, or with spec.targets each target (InvalidSpec propagates)."""
    if not model.spec.targets:
        return [Unit(key, body, model, status.parse(body.get("status")))]
    found = []
    for t in model.spec.targets:
        vbody = variant_body(body, t.name)
        if vbody is not None:
            vkey = variants.variant_key(key[0], key[1], t.name)
            found.append(Unit(vkey, vbody, parse_model(vbody), status.parse(vbody["status"])))
    return found


def recorded_source(cur: CompressedModelStatus, uri: str) -> SourceIdentity | None:
    """The source identity status records for `uri` (None: another URI, or none yet)."""
    return cur.source if cur.source is not None and cur.source.uri == uri else None


def judge(
    recorded: SourceIdentity | None, stored: identity.StoredIdentity, sha: str | None
) -> Verdict:
    """`compare`, with a local file's sha256 (when it was computed) settling "hash"."""
    if recorded is None:
        return "unknown"
    verdict = compare(recorded, stored)
    if verdict == "hash" and sha is not None:
        return "same" if sha == recorded.sha256 else "changed"
    return verdict


def outcome(found: list[str]) -> str:
    """One word for the check of an object from its units' words: a re-compression
    started wins, then an upgrade, else the first unit's word (all agree but "busy")."""
    for word in ("changed", "upgrade"):
        if word in found:
            return word
    return next((w for w in found if w != "busy"), "busy")


def _queue(unit: Unit, rt: Runtime, rec: Recompression, message: str) -> bool:
    """Writes the unit's re-compression (status Queued); False when it did not apply.
    The caller reconciles the object once afterwards."""
    generation = unit.body["metadata"].get("generation")

    def compute(cur: CompressedModelStatus, _b: Obj) -> Obj | None:
        return start_recompression(cur, unit.model, rec, message, generation, status.now())

    if write_status(rt, unit.key, compute, unit.body) is None:
        return False
    said = f"target {unit.target}: {message}" if unit.target else message
    log.info("%s/%s: %s", *unit.key, message)
    post_event(rt, unit.body, ("Normal", rec.reason, said[:1024]))
    return True


def check(rt: Runtime, key: ModelKey, explicit: bool) -> str:
    """One object's check; returns what it found, in a word (for logs and tests).

    With spec.targets: one HEAD of the (shared) source, then each target compares it
    with its own recorded source and starts its own re-compression, once."""
    body = rt.kube.get_model(*key)
    if body is None:
        return "gone"
    try:
        model = parse_model(body)
        due = [u for u in units(key, body, model) if u.checkable]
    except InvalidSpec:
        return "invalid"
    if not due:
        return "busy"
    at = status.now()
    found: list[str] = []
    started = False
    rest = []
    for u in due:
        if u.model.spec.recompress_on_upgrade and upgrade_due(u.cur, u.model, rt.settings):
            wanted = rt.settings.compressor_version
            rec = Recompression(
                reason=TOOLCHAIN_UPGRADED,
                revision=revision("toolchain", wanted),
                spec_hash=u.spec_hash,
                toolchain=wanted,
                since=at,
            )
            made_by = artifact_version(u.cur)
            what = f"edgeslim {made_by} -> {wanted}"
            started |= _queue(u, rt, rec, _message(rec, u.cur, what))
            found.append("upgrade")
        else:
            rest.append(u)
    source = model.spec.source
    if rest and source.sha256 is not None:
        # The bytes are fixed by the spec: a replaced file only fails the pin.
        found.append("pinned")
    elif rest and not explicit and interval_of(source_entry(body), rt.settings) <= 0:
        found.append("off")
    elif rest:
        with storage_credentials(rt, model):
            stored = identity.head(source.uri)
            recorded = [recorded_source(u.cur, source.uri) for u in rest]
            sha = None
            if any(r is not None and compare(r, stored) == "hash" for r in recorded):
                sha = identity.local_sha256(source.uri, max_bytes=rt.settings.max_download_bytes)
        seen = observed(stored, sha, at)
        for u, r in zip(rest, recorded, strict=True):
            verdict = judge(r, stored, sha)
            if verdict != "changed":
                # Unchanged, or nothing to compare with yet (an artifact made before
                # sources were recorded): this becomes what later checks compare against.
                _write_source(rt, u.key, u.spec_hash, seen)
                found.append(verdict)
                continue
            rec = Recompression(
                reason=SOURCE_CHANGED,
                revision=source_revision(seen),
                spec_hash=u.spec_hash,
                source=seen,
                since=at,
            )
            started |= _queue(u, rt, rec, _message(rec, u.cur, _what_changed(r, seen)))
            found.append("changed")
    if started:
        fresh = rt.kube.get_model(*key)
        if fresh is not None:
            # The usual path from here, for every unit at once: the queue (or Kueue) and
            # start(), which name each Job after its status.recompression. Imported
            # here: compression imports us.
            from edgeslim.operator import compression

            compression.reconcile_model(rt, fresh)
    return outcome(found)


def _what_changed(recorded: SourceIdentity | None, seen: SourceIdentity) -> str:
    if recorded is None:
        return "replaced"
    for label, old, new in (
        ("VersionId", recorded.version_id, seen.version_id),
        ("ETag", _etag(recorded.etag), _etag(seen.etag)),
        ("sha256", _short(recorded.sha256), _short(seen.sha256)),
        ("size", recorded.size_bytes, seen.size_bytes),
    ):
        if old and new and old != new:
            return f"{label} {old} -> {new}"
    return "replaced"


def _message(rec: Recompression, cur: CompressedModelStatus, what: str) -> str:
    why = (
        f"source {rec.source.uri if rec.source else ''} was replaced ({what})"
        if rec.reason == SOURCE_CHANGED
        else f"the compressor changed ({what}) and spec.recompressOnUpgrade is set"
    )
    serving = serving_now(cur)
    keep = (
        f"; artifact {_short(serving)} keeps serving until the new one passes the gate"
        if serving
        else ""
    )
    return f"{why}: re-compressing{keep}"


def check_quietly(rt: Runtime, key: ModelKey, explicit: bool) -> str:
    found = _check_quietly(rt, key, explicit)
    label = found if found in metrics.SOURCE_CHECK_RESULTS else "skipped"
    metrics.source_checks.labels(result=label).inc()
    return found


def _check_quietly(rt: Runtime, key: ModelKey, explicit: bool) -> str:
    try:
        return check(rt, key, explicit)
    except (BadInput, StorageUnavailable) as exc:
        # Not the object's fault that a check failed (a source deleted, the store
        # down): the artifact keeps serving and the next check tries again.
        log.warning("%s/%s: source not checked: %s", *key, exc)
        return "error"
    except Exception as exc:
        metrics.reconcile_errors.labels(handler="source").inc()
        log.warning("%s/%s: source check failed: %s", *key, exc)
        return "error"


# ------------------------------------------------------------------- the loop


@dataclass
class Watch:
    """When each object was last checked, on this operator's monotonic clock; an
    object it has not seen yet starts from the check (or compression) its status
    records, so a restart does not check the whole fleet at once."""

    seen: dict[ModelKey, Seen] = field(default_factory=dict)

    def due(
        self, index: Any, settings: Settings, now: float, wall: float | None = None
    ) -> list[tuple[ModelKey, bool]]:
        """The objects to check now (and whether each was asked for explicitly).

        `now` is monotonic; `wall` (epoch seconds, default the clock's) places the
        checks status records on that clock, for objects this operator has not seen.
        """
        wall = time.time() if wall is None else wall
        entries = {k: es[0] for k, es in snapshot(index) if es}
        for gone in self.seen.keys() - entries.keys():
            del self.seen[gone]
        found = []
        for key, entry in entries.items():
            if key not in self.seen and entry.last_checked is not None and not entry.upgrade:
                # Checked (or compressed) before this operator started: resume its clock.
                self.seen[key] = Seen(entry.token, now - max(0.0, wall - entry.last_checked))
            explicit = decide(entry, self.seen.get(key), now, settings)
            if explicit is not None:
                found.append((key, explicit))
                self.seen[key] = Seen(entry.token, now)
            elif key not in self.seen:
                self.seen[key] = Seen(entry.token, now)
        return found

    def tick(self, rt: Runtime, index: Any) -> dict[ModelKey, str]:
        due = self.due(index, rt.settings, time.monotonic())
        if not due:
            return {}
        workers = min(len(due), rt.settings.source_check_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="source") as pool:
            found = pool.map(lambda d: check_quietly(rt, *d), due)
            return {key: what for (key, _), what in zip(due, found, strict=True)}


async def loop(rt: Runtime, index: Any) -> None:
    watch = Watch()
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            await asyncio.to_thread(watch.tick, rt, index)
        except Exception as exc:
            metrics.reconcile_errors.labels(handler="source").inc()
            log.warning("source checks failed: %s", exc)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
