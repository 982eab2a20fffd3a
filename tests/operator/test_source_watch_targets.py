"""Re-compression on a replaced source for an object with spec.targets (pure parts):
each target is a unit with its own key, recorded source, re-compression and history,
kept in its status.targets entry through every write."""

from __future__ import annotations

from edgeslim.api.lineage import Recompression, SourceIdentity
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import CompressedModelStatus, Phase, ServedArtifact
from edgeslim.operator import source_watch, status, variants
from edgeslim.operator.names import job_name
from edgeslim.operator.status import Transition
from edgeslim.storage.identity import StoredIdentity
from tests.operator.test_source_watch import AT, message
from tests.operator.test_targets import body

URI = "s3://models/digits/cnn.onnx"
NAMES = ["x86", "gpu"]


def hashes() -> dict[str, str]:
    spec = CompressedModel.model_validate(body()).spec
    return {n: spec.for_target(n).spec_hash() for n in NAMES}


def served(name: str, etag: str = '"e1"', phase: str = "Ready") -> dict:
    """A target's entry: serving its first artifact, made from source `etag`."""
    h = hashes()[name]
    art = ServedArtifact(
        uri=f"s3://models/edge/vision/digits/{h}/aaaa/model.onnx", sha256=name[0] * 64
    )
    return {
        "name": name,
        "phase": phase,
        "specHash": h,
        "jobName": job_name("digits", h),
        "artifact": {"uri": art.uri, "sha256": art.sha256, "sizeBytes": 10},
        "servingArtifact": art.sha256,
        "lastGoodArtifact": art.wire(),
        "source": {"uri": URI, "etag": etag, "checkedAt": AT},
        "history": [
            {"time": AT, "jobName": job_name("digits", h), "specHash": h, "verdict": "Passed"}
        ],
    }


def with_entries(*entries: dict) -> dict:
    return variants.aggregate({}, list(entries), NAMES, 4, AT)


def units(raw: dict) -> list[source_watch.Unit]:
    b = body(status_=raw)
    return source_watch.units(("vision", "digits"), b, CompressedModel.model_validate(b))


def test_each_target_is_a_unit_with_its_own_key_hash_and_recorded_source() -> None:
    raw = with_entries(served("x86"), served("gpu", etag='"e0"', phase="Compressing"))
    found = units(raw)
    assert [(u.key, u.target, u.spec_hash) for u in found] == [
        (("vision", "digits/x86"), "x86", hashes()["x86"]),
        (("vision", "digits/gpu"), "gpu", hashes()["gpu"]),
    ]
    # The target still compressing is not checked (its Job records what it reads).
    assert [u.checkable for u in found] == [True, False]
    assert source_watch.recorded_source(found[0].cur, URI).etag == '"e1"'
    assert source_watch.recorded_source(found[0].cur, "s3://models/other.onnx") is None
    # Without targets the object is its one unit.
    plain = body(None, status_={"phase": "Ready"})
    [own] = source_watch.units(("vision", "digits"), plain, CompressedModel.model_validate(plain))
    assert (own.key, own.target, own.checkable) == (("vision", "digits"), "", False)


def test_one_head_judges_every_target_and_the_object_says_one_word() -> None:
    stored = StoredIdentity(uri=URI, size_bytes=7, etag='"e2"')
    old, new = SourceIdentity(uri=URI, etag='"e1"'), SourceIdentity(uri=URI, etag="e2")
    assert source_watch.judge(old, stored, None) == "changed"
    assert source_watch.judge(new, stored, None) == "same"
    assert source_watch.judge(None, stored, None) == "unknown"
    local = StoredIdentity(uri="/m.onnx", size_bytes=5, modified_ns=2)
    hashed = SourceIdentity(uri="/m.onnx", size_bytes=5, modified_ns=1, sha256="c" * 64)
    assert source_watch.judge(hashed, local, "c" * 64) == "same"
    assert source_watch.judge(hashed, local, "d" * 64) == "changed"
    assert source_watch.outcome(["same", "changed"]) == "changed"
    assert source_watch.outcome(["busy", "same"]) == "same"
    assert source_watch.outcome(["upgrade", "same"]) == "upgrade"
    assert source_watch.outcome([]) == "busy"


def test_the_index_entry_of_an_object_with_targets_reads_their_entries() -> None:
    raw = with_entries(served("x86"), {"name": "gpu", "phase": "Failed"})
    raw["targets"][0]["source"]["checkedAt"] = "1970-01-01T00:03:20Z"
    raw["targets"][0]["history"][0]["time"] = "1970-01-01T00:01:40Z"
    e = source_watch.source_entry(body(status_=raw))
    assert (e.has_result, e.last_checked) == (True, 200.0)
    both = with_entries(served("x86"), served("gpu"))
    both["targets"][1]["source"]["checkedAt"] = "1970-01-01T00:01:40Z"
    # The clock of the target checked longest ago.
    assert source_watch.source_entry(body(status_=both)).last_checked == 100.0
    nothing = with_entries({"name": "x86", "phase": "Failed"}, {"name": "gpu"})
    assert source_watch.source_entry(body(status_=nothing)).has_result is False


def write(raw: dict, target: str, new_view: dict) -> dict:
    """What runtime's target status write does with a computed entry."""
    return variants.with_target(raw, target, new_view, NAMES, 4, AT)


def test_a_targets_recompression_history_and_rejection_live_in_its_entry() -> None:
    raw = with_entries(served("x86"), served("gpu"))
    h = hashes()
    recs = {}
    # 1. Each target queues its own re-compression, once; the old artifacts serve.
    for u in units(raw):
        seen = SourceIdentity(uri=URI, etag='"e2"', checked_at=AT)
        rec = Recompression(
            reason="SourceChanged",
            revision=source_watch.source_revision(seen),
            spec_hash=u.spec_hash,
            source=seen,
            since=AT,
        )
        new = source_watch.start_recompression(u.cur, u.model, rec, "replaced", 4, AT)
        assert new is not None
        raw, recs[u.target] = write(raw, u.target, new), rec
    top = CompressedModelStatus.model_validate(raw)
    assert top.phase is Phase.queued and top.targets_ready == "0/2"
    for u in units(raw):
        rec = recs[u.target]
        assert u.cur.recompression == rec and u.cur.serving_artifact == u.target[0] * 64
        assert u.cur.job_name == job_name("digits", h[u.target], rec.revision)
        assert source_watch.pending_revision(u.cur, u.spec_hash) == rec.revision
        assert source_watch.start_recompression(u.cur, u.model, rec, "again", 4, AT) is None

    # 2. x86's new artifact passes, gpu's is rejected: each result lands in its entry.
    results = {"x86": True, "gpu": False}
    for u in units(raw):
        passed = results[u.target]
        new_sha = ("9" if passed else "8") * 64
        art = ServedArtifact(
            uri=f"s3://models/edge/vision/digits/{u.spec_hash}/bbbb/m", sha256=new_sha
        )
        result = message(art, passed=passed)
        phase = Phase.deploying if passed else Phase.rejected
        t = Transition(
            phase, "Gate", result.gate.reason, spec_hash=u.spec_hash, job_name=u.cur.job_name
        )
        t = source_watch.with_lineage(t, u.cur, u.cur.job_name, u.spec_hash, result, 5)
        raw = write(raw, u.target, status.apply(u.cur, 4, t, AT))
    after = {u.target: u.cur for u in units(raw)}
    for name, cur in after.items():
        assert cur.recompression is None and cur.source.etag == '"e2"'
        assert [(e.trigger, e.verdict) for e in cur.history] == [
            ("SpecChanged", "Passed"),
            ("SourceChanged", "Passed" if results[name] else "Rejected"),
        ]
    gpu = after["gpu"]
    assert gpu.phase is Phase.rejected and gpu.serving_artifact == "g" * 64
    assert f"artifact {'g' * 12} keeps serving" in gpu.message
    summary = CompressedModelStatus.model_validate(raw)
    assert summary.phase is Phase.deploying and "x86" in {t.name for t in summary.targets}
