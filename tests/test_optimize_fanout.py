"""spec.optimize over separate processes: `compress --plan`, `--candidate N`, `--pick`.

The digits CNN through the real CLI: the plan lists the format candidates in
the search's order, each candidate run stores its model and manifest under
candidates/N/, a rerun skips a stored candidate (and redoes a damaged one),
and the pick step takes the stored candidates as measured, evaluates the
rest, and writes the same winner a local search writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeslim import storage
from edgeslim.api.result import CompressionResult
from edgeslim.cli import EXIT_BAD_INPUT, EXIT_OK, main
from edgeslim.compressor.optimize_fanout import CandidateRecord, OptimizePlan
from tests.results import expected_prefix

FORMATS = [
    "static int8 per-channel minmax",
    "dynamic int8",
    "static int8 per-channel percentile",
    "static int8 per-tensor minmax",
    "static int8 per-channel entropy",
    "fp16",
]


def write_spec(digits, tmp_path: Path, out: Path, **spec: object) -> tuple[Path, Path]:
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "digits-fan"},
        "spec": {
            "source": {"uri": str(digits.model_path)},
            "evaluation": {
                "dataset": str(digits.val),
                "metric": "accuracy",
                "maxMetricDrop": 0.01,
                "latencyRuns": 10,
                "samples": 200,  # enough to rank the formats of this small CNN, and fast
            },
            "optimize": {"objective": "download"},
            "output": {"uri": str(out)},
            **spec,
        },
    }
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, Path(expected_prefix(doc, str(out)))


def cli(*args: str) -> int:
    return main(["compress", *args, "--quiet"])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_plan_candidates_and_pick_give_the_local_searchs_winner(
    digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, folder = write_spec(digits, tmp_path, tmp_path / "fan")
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("EDGESLIM_TERMINATION_LOG", str(termination))
    assert cli(str(spec), "--plan") == EXIT_OK
    # The operator learns the plan's size from the plan pod's termination message.
    message = json.loads(termination.read_text())
    assert message == {
        "kind": "OptimizePlan",
        "candidates": len(FORMATS),
        "planUri": str(folder / "plan.json"),
    }
    plan_bytes = (folder / "plan.json").read_bytes()
    plan = OptimizePlan.model_validate_json(plan_bytes)
    assert [r.name for r in plan.recipes] == FORMATS  # the search's order; no MatMul formats
    assert plan.name == "digits-fan" and plan.namespace == "default"
    assert cli(str(spec), "--plan") == EXIT_OK
    assert (folder / "plan.json").read_bytes() == plan_bytes  # kept, not rewritten

    # An Indexed Job's pod: the real CLI, the index from JOB_COMPLETION_INDEX.
    done = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(spec), "--candidate", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "JOB_COMPLETION_INDEX": "1"},
        timeout=300,
    )
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert "candidates/1/manifest.json passed" in done.stdout
    assert cli(str(spec), "--candidate", "3") == EXIT_OK
    stored = {
        i: CandidateRecord.model_validate_json(
            (folder / f"candidates/{i}" / "manifest.json").read_text()
        )
        for i in (1, 3)
    }
    assert stored[1].figures.name == "dynamic int8" and stored[1].figures.passed
    assert stored[3].figures.name == "static int8 per-tensor minmax"
    assert (folder / "candidates/3/model.onnx").stat().st_size == stored[3].figures.size_bytes
    assert not (folder / "candidates/0").exists()  # nothing ran that was not asked for

    # A restarted candidate run finds its result and leaves it as it is.
    before = (folder / "candidates/3/manifest.json").read_bytes()
    assert cli(str(spec), "--candidate", "3") == EXIT_OK
    assert (folder / "candidates/3/manifest.json").read_bytes() == before

    assert cli(str(spec), "--pick") == EXIT_OK
    result = CompressionResult.model_validate_json((folder / "manifest.json").read_text())
    assert [c.name for c in result.candidates] == FORMATS
    # Stored candidates were taken as measured, not evaluated again (their seconds are theirs).
    for i in (1, 3):
        assert result.candidates[i].seconds == stored[i].figures.seconds
        assert result.candidates[i].gzip_size_bytes == stored[i].figures.gzip_size_bytes
    assert result.search.complete and result.gate.passed

    # The same spec searched in one process picks the same candidate.
    local_spec, local_folder = write_spec(digits, tmp_path, tmp_path / "local")
    assert cli(str(local_spec)) == EXIT_OK
    local = CompressionResult.model_validate_json((local_folder / "manifest.json").read_text())
    assert [c.name for c in local.candidates] == FORMATS
    assert result.candidates[result.chosen].name == local.candidates[local.chosen].name
    assert result.artifact.gzip_size_bytes == local.artifact.gzip_size_bytes


def test_a_damaged_stored_candidate_is_evaluated_again(digits, tmp_path: Path) -> None:
    spec, folder = write_spec(digits, tmp_path, tmp_path / "fan")
    assert cli(str(spec), "--plan") == EXIT_OK
    assert cli(str(spec), "--candidate", "1") == EXIT_OK
    model = folder / "candidates/1/model.onnx"
    good = model.read_bytes()
    model.write_bytes(b"not the stored model")
    assert cli(str(spec), "--candidate", "1") == EXIT_OK
    record = json.loads((folder / "candidates/1/manifest.json").read_text())
    assert model.read_bytes() != b"not the stored model"
    assert len(model.read_bytes()) == len(good) == record["figures"]["sizeBytes"]


def test_fanout_steps_refuse_what_cannot_work(digits, tmp_path: Path, capsys) -> None:
    spec, _ = write_spec(digits, tmp_path, tmp_path / "fan")
    # No plan yet: a candidate run says what to run first.
    assert cli(str(spec), "--candidate", "0") == EXIT_BAD_INPUT
    assert "run `edgeslim compress SPEC --plan`" in capsys.readouterr().err
    assert cli(str(spec), "--plan") == EXIT_OK
    assert cli(str(spec), "--candidate", "6") == EXIT_BAD_INPUT
    assert "the plan has candidates 0..5" in capsys.readouterr().err
    assert cli(str(spec), "--candidate", "-1") == EXIT_BAD_INPUT
    os.environ.pop("JOB_COMPLETION_INDEX", None)
    assert cli(str(spec), "--candidate") == EXIT_BAD_INPUT
    assert "JOB_COMPLETION_INDEX ''" in capsys.readouterr().err
    # maxCandidates bounds the plan, so the Jobs too.
    budget, _ = write_spec(
        digits, tmp_path, tmp_path / "fan", optimize={"objective": "download", "maxCandidates": 2}
    )
    assert cli(str(budget), "--plan") == EXIT_OK
    assert cli(str(budget), "--candidate", "2") == EXIT_BAD_INPUT
    assert "the plan has candidates 0..1" in capsys.readouterr().err
    # A fixed pipeline has nothing to fan out.
    pipeline, _ = write_spec(
        digits,
        tmp_path,
        tmp_path / "fan",
        optimize=None,
        pipeline=[{"quantize": {"mode": "dynamic"}}],
    )
    doc = yaml.safe_load(pipeline.read_text())
    del doc["spec"]["optimize"]
    pipeline.write_text(yaml.safe_dump(doc))
    assert cli(str(pipeline), "--plan") == EXIT_BAD_INPUT
    assert "has no optimize section" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: one step at a time
        cli(str(spec), "--plan", "--pick")
    assert exc.value.code == EXIT_BAD_INPUT


def test_the_steps_share_their_work_through_s3(digits, tmp_path: Path, s3_server, s3: str) -> None:
    """What Jobs on different nodes see: plan and candidates only under the object's S3 prefix."""
    for name, path in (("cnn.onnx", digits.model_path), ("val.npz", digits.val)):
        storage.put_file(path, f"s3://{s3}/inputs/{name}")
    spec, _ = write_spec(
        digits, tmp_path, tmp_path / "unused", optimize={"objective": "size", "maxCandidates": 2}
    )
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["source"]["uri"] = f"s3://{s3}/inputs/cnn.onnx"
    doc["spec"]["evaluation"]["dataset"] = f"s3://{s3}/inputs/val.npz"
    doc["spec"]["output"]["uri"] = f"s3://{s3}/edge/"
    spec.write_text(yaml.safe_dump(doc))
    prefix = expected_prefix(doc, f"s3://{s3}/edge/").removeprefix(f"s3://{s3}/")
    assert cli(str(spec), "--plan") == EXIT_OK
    assert cli(str(spec), "--candidate", "0") == EXIT_OK
    assert cli(str(spec), "--candidate", "1") == EXIT_OK
    record = CandidateRecord.model_validate_json(
        storage.read_bytes(f"s3://{s3}/{prefix}candidates/1/manifest.json")
    )
    assert record.model_uri == f"s3://{s3}/{prefix}candidates/1/model.onnx"
    assert cli(str(spec), "--pick") == EXIT_OK
    result = CompressionResult.model_validate_json(
        storage.read_bytes(f"s3://{s3}/{prefix}manifest.json")
    )
    assert [c.name for c in result.candidates] == FORMATS[:2] and result.search.complete
    # Taken as stored: nothing measured it again.
    assert result.candidates[1].seconds == record.figures.seconds
    listed = s3_server.client().list_objects_v2(Bucket=s3, Prefix=prefix)["Contents"]
    keys = {o["Key"].removeprefix(prefix) for o in listed}
    assert {"plan.json", "manifest.json", "model.onnx", "candidates/0/manifest.json"} <= keys
    assert {"candidates/0/model.onnx", "candidates/1/model.onnx"} <= keys


def test_pick_without_a_plan_searches_in_its_own_process(digits, tmp_path: Path) -> None:
    """A plan step that failed or never ran must not cost the result."""
    spec, folder = write_spec(
        digits, tmp_path, tmp_path / "fan", optimize={"objective": "download", "maxCandidates": 2}
    )
    assert cli(str(spec), "--pick") == EXIT_OK
    result = CompressionResult.model_validate_json((folder / "manifest.json").read_text())
    assert [c.name for c in result.candidates] == FORMATS[:2] and result.search.complete
    assert not (folder / "candidates").exists()


@pytest.mark.slow
def test_with_a_train_set_the_first_sparsity_probes_are_planned(digits, tmp_path: Path) -> None:
    """The first pruning probe and both that can follow it (a second cut, a retry at
    another learning rate) run as candidates of their own; the pick goes on from them
    (a passing student is not pruned and distilled again)."""
    # maxCandidates bounds the pick's own search (it would go on cutting deeper).
    optimize = {"objective": "download", "trainDataset": str(digits.train), "maxCandidates": 12}
    spec, folder = write_spec(digits, tmp_path, tmp_path / "fan", optimize=optimize)
    assert cli(str(spec), "--plan") == EXIT_OK
    plan = OptimizePlan.model_validate_json((folder / "plan.json").read_text())
    probes = [
        "prune 50% + distill",
        "prune 50% > 50% + distill",
        "prune 50% + distill (lr 0.01)",
    ]
    assert [r.name for r in plan.recipes] == FORMATS + probes
    for i in range(len(FORMATS), len(plan.recipes)):
        assert cli(str(spec), "--candidate", str(i)) == EXIT_OK
    stored = {
        r.name: CandidateRecord.model_validate_json(
            (folder / f"candidates/{i}/manifest.json").read_text()
        )
        for i, r in enumerate(plan.recipes)
        if r.name in probes
    }
    assert cli(str(spec), "--pick") == EXIT_OK
    result = CompressionResult.model_validate_json((folder / "manifest.json").read_text())
    by_name = {c.name: c for c in result.candidates}
    # The probes the bisection reached were taken as stored.
    reached = [n for n in probes if n in by_name]
    assert "prune 50% + distill" in reached and len(reached) >= 2
    for name in reached:
        assert by_name[name].seconds == stored[name].figures.seconds
    # A student's quantized (or further cut) candidate starts from the stored student:
    # no prune record measured in the pick (those steps' records are the stored ones).
    chosen = result.candidates[result.chosen]
    assert chosen.passed and result.gate.passed
    survivor = [
        n
        for n in reached
        if chosen.recipe[: len(stored[n].figures.recipe)] == stored[n].figures.recipe
    ]
    if survivor:  # the student is a planned probe (not only the pick's own later ones)
        longest = max(survivor, key=lambda n: len(stored[n].figures.recipe))
        assert result.steps[: len(stored[longest].records)] == stored[longest].records
