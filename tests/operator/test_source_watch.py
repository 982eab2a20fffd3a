"""Re-compression on a replaced source or a new compressor, and lineage, without a
cluster: the pure decisions of `source_watch`, the Job names of a re-compression,
the storage identity a check reads (a real local file and the real S3 server) and
what serving does while a re-compression runs or after it is rejected."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeslim import storage
from edgeslim.api.lineage import Recompression, SourceIdentity
from edgeslim.api.result import (
    EvaluationFigures,
    GateVerdict,
    InputIdentity,
    ModelFigures,
    inputs_id,
)
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase, ServedArtifact
from edgeslim.api.termination import TerminationMessage
from edgeslim.operator import events, serving, source_watch, status
from edgeslim.operator.names import job_name
from edgeslim.operator.serving import Rollout, RolloutState
from edgeslim.operator.settings import Settings
from edgeslim.operator.source_watch import Seen, SourceEntry, decide
from edgeslim.operator.status import Transition
from edgeslim.storage import identity
from edgeslim.storage.identity import StoredIdentity

HASH = "0123456789abcdef"
OLD = ServedArtifact(uri=f"s3://models/edge/vision/digits/{HASH}/aaaa/model.onnx", sha256="a" * 64)
NEW = ServedArtifact(uri=f"s3://models/edge/vision/digits/{HASH}/bbbb/model.onnx", sha256="b" * 64)
AT = "2026-01-01T00:00:00Z"


def model(**spec: object) -> CompressedModel:
    return CompressedModel.model_validate(
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": "digits", "namespace": "vision", "uid": "u", "generation": 1},
            "spec": {
                "source": {"uri": "s3://models/digits/cnn.onnx", "credentialsSecret": "s3-creds"},
                "evaluation": {"dataset": "s3://models/digits/val.npz"},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "output": {"uri": "s3://models/edge/"},
                **spec,
            },
        }
    )


def ready(**over: object) -> CompressedModelStatus:
    """A Ready object serving OLD, made by Job digits-<hash> from source etag "e1"."""
    raw = {
        "phase": "Ready",
        "specHash": HASH,
        "jobName": job_name("digits", HASH),
        "artifact": {"uri": OLD.uri, "sha256": OLD.sha256, "sizeBytes": 10},
        "servingArtifact": OLD.sha256,
        "lastGoodArtifact": OLD.wire(),
        "source": {"uri": "s3://models/digits/cnn.onnx", "sha256": "c" * 64, "etag": '"e1"'},
        "history": [
            {
                "time": AT,
                "jobName": job_name("digits", HASH),
                "specHash": HASH,
                "verdict": "Passed",
                "versions": {"edgeslim": "0.1.0"},
            }
        ],
    }
    return status.parse({**raw, **over})


def message(
    artifact: ServedArtifact, passed: bool = True, etag: str = '"e2"'
) -> TerminationMessage:
    return TerminationMessage(
        name="digits",
        namespace="vision",
        spec_hash=HASH,
        gate=GateVerdict(passed=passed, max_metric_drop=0.01, reason="drop 0.002 <= 0.01"),
        artifact=ModelFigures(uri=artifact.uri, sha256=artifact.sha256, size_bytes=9),
        evaluation=EvaluationFigures(
            metric="accuracy", samples=9, baseline=0.9, compressed=0.9, drop=0.0
        ),
        source=InputIdentity(
            field="source",
            uri="s3://models/digits/cnn.onnx",
            sha256="d" * 64,
            size_bytes=7,
            etag=etag,
        ),
        versions={"edgeslim": "0.2.0", "onnxruntime": "1.20"},
    )


# ------------------------------------------------------------------- compare


@pytest.mark.parametrize(
    ("recorded", "seen", "verdict"),
    [
        ({"etag": '"e1"'}, {"etag": "e1"}, "same"),  # quotes are not content
        ({"etag": '"e1"'}, {"etag": '"e2"'}, "changed"),
        ({"etag": '"e1"', "version_id": "v1"}, {"etag": '"e1"', "version_id": "v2"}, "changed"),
        ({"version_id": "v1"}, {"etag": '"x"', "version_id": "v1"}, "same"),
        ({"size_bytes": 5, "sha256": "c" * 64}, {"size_bytes": 6, "modified_ns": 1}, "changed"),
        ({"size_bytes": 5, "modified_ns": 1}, {"size_bytes": 5, "modified_ns": 1}, "same"),
        ({"size_bytes": 5, "sha256": "c" * 64}, {"size_bytes": 5, "modified_ns": 2}, "hash"),
        ({"size_bytes": 5}, {"size_bytes": 5, "modified_ns": 2}, "changed"),
        ({"size_bytes": 5}, {"size_bytes": 5}, "unknown"),
    ],
)
def test_what_a_check_concludes_from_storage_metadata(
    recorded: dict, seen: dict, verdict: str
) -> None:
    got = source_watch.compare(
        SourceIdentity(uri="u", **recorded), StoredIdentity(uri="u", **{"size_bytes": 5, **seen})
    )
    assert got == verdict


# --------------------------------------------------------------- when to check


SETTINGS = Settings(source_check_seconds=600)


def entry(
    phase: str = "Ready", generation: int = 1, touched: str = "", **kw: object
) -> SourceEntry:
    return SourceEntry(
        phase=phase,
        generation=generation,
        touched=touched,
        interval=kw.get("interval"),  # type: ignore[arg-type]
        has_result=bool(kw.get("has_result", True)),
    )


def test_checks_are_due_on_start_then_every_interval_and_at_once_when_touched() -> None:
    e = entry()
    assert decide(e, None, 0.0, SETTINGS) is False  # once after the operator starts
    seen = Seen(e.token, 100.0)
    assert decide(e, seen, 699.0, SETTINGS) is None
    assert decide(e, seen, 700.0, SETTINGS) is False
    assert decide(entry(interval=60), seen, 160.0, SETTINGS) is False  # the spec's own
    assert decide(entry(touched="now"), seen, 101.0, SETTINGS) is True  # the annotation
    assert decide(entry(generation=2), seen, 101.0, SETTINGS) is True  # a spec change


def test_interval_zero_checks_only_when_asked_and_busy_objects_never() -> None:
    off = entry(interval=0)
    assert decide(off, None, 0.0, SETTINGS) is None
    assert decide(off, Seen(off.token, 0.0), 10**9, SETTINGS) is None
    assert decide(entry(interval=0, touched="x"), Seen(off.token, 0.0), 1.0, SETTINGS) is True
    assert decide(entry(interval=0), None, 0.0, Settings(source_check_seconds=0)) is None
    upgrade = SourceEntry("Ready", 1, "", 0, True, upgrade=True)
    assert decide(upgrade, None, 0.0, SETTINGS) is False  # a new operator may be a new version
    for phase in ("Pending", "Queued", "Compressing", "Deploying"):
        assert decide(entry(phase), None, 0.0, SETTINGS) is None
    assert decide(entry(has_result=False), None, 0.0, SETTINGS) is None


def test_the_watch_checks_each_due_object_once_and_forgets_deleted_ones() -> None:
    watch = source_watch.Watch()
    index = {("ns", "a"): [entry()], ("ns", "b"): [entry("Compressing")]}
    assert watch.due(index, SETTINGS, 0.0) == [(("ns", "a"), False)]
    assert watch.due(index, SETTINGS, 1.0) == []
    assert watch.due(index, SETTINGS, 600.0) == [(("ns", "a"), False)]
    # b's compression ended (it recorded its source): due an interval after it was seen.
    index[("ns", "b")] = [entry("Ready")]
    assert watch.due(index, SETTINGS, 300.0) == []
    assert watch.due(index, SETTINGS, 601.0) == [(("ns", "b"), False)]
    del index[("ns", "a")]
    watch.due(index, SETTINGS, 602.0)
    assert set(watch.seen) == {("ns", "b")}


def test_a_restarted_operator_resumes_each_clock_from_status() -> None:
    wall = 1_000_000.0
    recent = dataclasses.replace(entry(), last_checked=wall - 100)
    watch = source_watch.Watch()
    index = {("ns", "a"): [recent], ("ns", "b"): [entry()]}
    # b never recorded a check: once now; a was checked 100 s ago: in 500 s.
    assert watch.due(index, SETTINGS, 0.0, wall) == [(("ns", "b"), False)]
    assert watch.due(index, SETTINGS, 499.0, wall + 499) == []
    assert watch.due(index, SETTINGS, 500.0, wall + 500) == [(("ns", "a"), False)]
    # recompressOnUpgrade: a new operator may run a new compressor, so once at start.
    upgrade = dataclasses.replace(recent, upgrade=True)
    assert source_watch.Watch().due({("ns", "u"): [upgrade]}, SETTINGS, 0.0, wall) == [
        (("ns", "u"), False)
    ]


def test_the_index_entry_reads_the_body_leniently() -> None:
    body = {
        "metadata": {"generation": 3, "annotations": {source_watch.CHECK_ANNOTATION: "t1"}},
        "spec": {"source": {"uri": "s3://b/k", "checkIntervalSeconds": 120}},
        "status": {
            "phase": "Ready",
            "artifact": {"uri": "x"},
            "history": [{"time": "1970-01-01T00:01:40Z"}],
        },
    }
    e = source_watch.source_entry(body)
    assert e.last_checked == 100.0
    assert (e.phase, e.generation, e.touched, e.interval, e.has_result) == (
        "Ready",
        3,
        "t1",
        120,
        True,
    )
    assert source_watch.source_entry({}).has_result is False


# ----------------------------------------------------- the spec and settings


def test_check_interval_is_zero_or_at_least_a_minute_and_not_part_of_the_spec_hash() -> None:
    with pytest.raises(ValidationError, match="below the minimum of 60"):
        model(source={"uri": "s3://models/digits/cnn.onnx", "checkIntervalSeconds": 5})
    base = model().spec.spec_hash()
    watched = model(
        source={
            "uri": "s3://models/digits/cnn.onnx",
            "credentialsSecret": "s3-creds",
            "checkIntervalSeconds": 0,
        },
        recompressOnUpgrade=True,
        historyLimit=9,
    )
    assert watched.spec.spec_hash() == base  # changing how it is watched re-compresses nothing
    assert model().spec.history_limit == 5 and model().spec.recompress_on_upgrade is False


def test_operator_settings_may_go_below_the_spec_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESLIM_SOURCE_CHECK_SECONDS", "2")
    monkeypatch.setenv("EDGESLIM_COMPRESSOR_VERSION", "0.2.0")
    s = Settings.from_env()
    assert (s.source_check_seconds, s.compressor_version, s.source_check_concurrency) == (
        2,
        "0.2.0",
        8,
    )


# ------------------------------------------------------- names and layout


def test_a_recompression_has_its_own_stable_job_name() -> None:
    plain = job_name("digits", HASH)
    again = job_name("digits", HASH, "1234567890abcdef")
    assert again == job_name("digits", HASH, "1234567890abcdef") == f"{plain}-123456"
    assert job_name("digits", HASH, "fedcba") != again
    long = "n" * 63
    names = {job_name(long, HASH), job_name(long, HASH, "aaaaaa"), job_name(long, HASH, "bbbbbb")}
    assert len(names) == 3 and all(len(n) <= 62 for n in names)


def test_results_are_keyed_by_the_content_of_their_inputs() -> None:
    a = InputIdentity(field="source", uri="s3://b/m.onnx", sha256="1" * 64, size_bytes=1)
    d = InputIdentity(field="evaluation.dataset", uri="s3://b/v.npz", sha256="2" * 64, size_bytes=1)
    replaced = a.model_copy(update={"sha256": "3" * 64})
    assert inputs_id([a, d]) == inputs_id([d, a]) != inputs_id([replaced, d])
    prefix = storage.result_prefix("s3://b/out/", "vision", "digits", HASH, inputs_id([a, d]))
    assert prefix == f"s3://b/out/vision/digits/{HASH}/{inputs_id([a, d])}/"
    # Everything under the spec hash's folder, which the operator checks result URIs against.
    assert storage.within(
        prefix + "model.onnx", storage.result_prefix("s3://b/out/", "vision", "digits", HASH)
    )


# --------------------------------------------------------- starting one


def recompression(revision: str = "r1" * 8) -> Recompression:
    return Recompression(
        reason="SourceChanged",
        revision=revision,
        spec_hash=HASH,
        source=SourceIdentity(uri="s3://models/digits/cnn.onnx", etag='"e2"'),
        since=AT,
    )


def test_a_changed_source_queues_one_recompression_and_the_old_artifact_keeps_serving() -> None:
    m, rec = model(deployment={}), recompression()
    new = source_watch.start_recompression(ready(), m, rec, "source replaced", 1, AT)
    assert new is not None
    cur = status.parse(new)
    assert cur.phase is Phase.queued and cur.job_name == job_name("digits", HASH, rec.revision)
    assert cur.recompression == rec and cur.serving_artifact == OLD.sha256
    assert source_watch.pending_revision(cur, HASH) == rec.revision
    # Once per change: the same revision again, or while it runs, starts nothing.
    assert source_watch.start_recompression(cur, m, rec, "again", 1, AT) is None
    done = cur.model_copy(update={"phase": Phase.ready})
    assert source_watch.start_recompression(done, m, rec, "again", 1, AT) is None
    # A spec change since: its own compression records a source, this one is void.
    assert source_watch.pending_revision(cur, "f" * 16) is None
    # Serving keeps the old artifact while the new one is queued and compressed.
    running = RolloutState(Rollout.complete, OLD, replicas=1, ready_replicas=1, updated_replicas=1)
    for phase in (Phase.queued, Phase.compressing):
        p = serving.plan(cur.model_copy(update={"phase": phase}), HASH, running)
        assert p.target == OLD and p.serving == OLD.sha256


def test_only_the_job_status_names_may_record_a_result() -> None:
    cur = ready(jobName=job_name("digits", HASH, "r1" * 8))
    assert source_watch.superseded(cur, job_name("digits", HASH), HASH)
    assert not source_watch.superseded(cur, cur.job_name, HASH)
    assert not source_watch.superseded(cur, job_name("digits", HASH), "f" * 16)


# --------------------------------------------------------------- lineage


def recorded(
    cur: CompressedModelStatus, job: str, result: TerminationMessage | None, limit: int = 5
) -> tuple[CompressedModelStatus, Transition]:
    """The status after record_result's write of `result` (the same Transition path)."""
    passed = result is not None and result.gate.passed
    t = Transition(
        Phase.deploying if passed else Phase.rejected,
        "GatePassed" if passed else "GateRejected",
        result.gate.reason if result else "",
        spec_hash=HASH,
        job_name=job,
    )
    t = source_watch.with_lineage(t, cur, job, HASH, result, limit)
    return status.parse(status.apply(cur, 1, t, AT)), t


def test_a_recorded_result_becomes_source_and_history_and_ends_the_recompression() -> None:
    rec = recompression()
    job = job_name("digits", HASH, rec.revision)
    cur = ready(jobName=job, phase="Compressing", recompression=rec.wire())
    after, t = recorded(cur, job, message(NEW))
    assert t.message == "drop 0.002 <= 0.01" and after.recompression is None
    assert after.source.etag == '"e2"' and after.source.sha256 == "d" * 64
    last = after.history[-1]
    assert (last.job_name, last.verdict, last.trigger, last.artifact_sha256) == (
        job,
        "Passed",
        "SourceChanged",
        NEW.sha256,
    )
    assert last.versions == {"edgeslim": "0.2.0", "onnxruntime": "1.20"}
    assert [h.job_name for h in after.history] == [job_name("digits", HASH), job]
    assert source_watch.lineage(after, job, HASH, message(NEW), 5, AT) is None  # once
    assert source_watch.lineage(cur, "other-job", HASH, message(NEW), 5, AT) is None


def test_history_keeps_the_last_history_limit_entries() -> None:
    cur = ready()
    for i in range(4):
        job = f"digits-{i}"
        cur, _ = recorded(cur.model_copy(update={"job_name": job}), job, message(NEW), limit=3)
    assert [h.job_name for h in cur.history] == ["digits-1", "digits-2", "digits-3"]
    assert all(h.trigger == "SpecChanged" for h in cur.history)


def test_a_rejected_recompression_leaves_the_old_artifact_serving_and_says_so() -> None:
    rec = recompression()
    job = job_name("digits", HASH, rec.revision)
    rejected = ServedArtifact(
        uri=NEW.uri.replace("model.onnx", "model.rejected.onnx"), sha256="b" * 64
    )
    cur = ready(jobName=job, phase="Compressing", recompression=rec.wire())
    after, t = recorded(cur, job, message(rejected, passed=False))
    assert f"artifact {OLD.sha256[:12]} keeps serving" in t.message
    assert "rejected by the gate (drop 0.002 <= 0.01)" in t.message
    # The message is the status' and the transition Event's.
    assert after.message == t.message and after.phase is Phase.rejected
    event = events.for_transition(Phase.compressing, t.phase, t.reason, t.message)
    assert event is not None and "keeps serving" in event[2]
    assert after.history[-1].verdict == "Rejected"
    assert after.source.etag == '"e2"'  # this source was judged: no second attempt for it
    p = serving.plan(after, HASH, RolloutState(Rollout.complete, OLD, replicas=1, ready_replicas=1))
    assert p.target == OLD and p.serving == OLD.sha256


def test_a_failed_recompression_keeps_its_record_so_the_same_change_is_not_retried() -> None:
    rec = recompression()
    job = job_name("digits", HASH, rec.revision)
    cur = ready(jobName=job, phase="Failed", artifact=None, recompression=rec.wire())
    assert source_watch.lineage(cur, job, HASH, None, 5, AT) is None
    assert source_watch.start_recompression(cur, model(), rec, "again", 1, AT) is None
    other = recompression("r2" * 8)
    assert source_watch.start_recompression(cur, model(), other, "new bytes", 1, AT) is not None


def test_the_version_that_made_the_artifact_is_read_from_its_history_entry() -> None:
    assert source_watch.artifact_version(ready()) == "0.1.0"
    assert source_watch.artifact_version(ready(jobName="another")) is None


def test_an_upgrade_recompresses_once_only_where_asked() -> None:
    m = model(recompressOnUpgrade=True)
    same, newer = Settings(compressor_version="0.1.0"), Settings(compressor_version="0.2.0")
    assert not source_watch.upgrade_due(ready(), m, same)
    assert source_watch.upgrade_due(ready(), m, newer)
    # The re-compression for 0.2.0 ran, but its compressor still says 0.1.0 (an image
    # that does not match EDGESLIM_COMPRESSOR_VERSION): not again.
    done = job_name("digits", HASH, source_watch.revision("toolchain", "0.2.0"))
    entry = {**ready().history[0].wire(), "jobName": done}
    assert not source_watch.upgrade_due(ready(jobName=done, history=[entry]), m, newer)


# ------------------------------------------------------ identity in storage


def test_a_local_source_is_identified_by_stat_and_hashed_only_on_demand(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    path.write_bytes(b"weights v1")
    seen = identity.head(str(path))
    assert seen.size_bytes == 10 and seen.modified_ns == os.stat(path).st_mtime_ns
    assert seen.etag is None
    assert identity.local_sha256(str(path)) == storage.sha256_file(path)


def test_an_s3_source_is_identified_by_one_head(s3: str) -> None:
    uri = f"s3://{s3}/models/cnn.onnx"
    storage.put_bytes(b"weights v1", uri)
    first = identity.head(uri)
    assert first.size_bytes == 10 and first.etag
    assert identity.head(uri).etag == first.etag
    storage.put_bytes(b"weights v2", uri)  # replaced at the same URI
    recorded = SourceIdentity(uri=uri, etag=first.etag, size_bytes=10)
    assert source_watch.compare(recorded, identity.head(uri)) == "changed"
