"""`edgeslim split`: a model cut into parts that run one after another.

Real architectures from the exporters third parties use (a small BERT from a
transformers config, torchvision's mobilenet_v3_small), the digits CNN at
opset 12 with its weights in Constant nodes, and the CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeslim.api.split import SplitPlan
from edgeslim.compressor import split as sp
from edgeslim.compressor.tensor_sizes import declared_bytes
from tests.archs import digits_build, export, tiny_bert

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("transformers")

RNG = np.random.default_rng(0)


def _bert() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module = tiny_bert(17)
    ids = torch.randint(0, 100, (2, 8))
    model = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], 17)
    mask = np.ones((3, 10), np.int64)
    mask[0, 6:] = 0  # padding: the mask path crosses the cuts too
    return model, {"input_ids": RNG.integers(0, 100, (3, 10)), "attention_mask": mask}


def _mobilenet() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module = torchvision.models.mobilenet_v3_small(num_classes=10, weights=None)
    model = export(module, (torch.randn(1, 3, 32, 32),), ["input"], 17)
    return model, {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}


@pytest.fixture(scope="module", params=["bert", "mobilenet_v3_small"])
def arch(request: pytest.FixtureRequest) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return _bert() if request.param == "bert" else _mobilenet()


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _whole(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))


def _assert_chain(result: sp.SplitResult, model: onnx.ModelProto, parts: int) -> None:
    plan = result.plan
    assert len(result.parts) == len(plan.parts) == parts and len(plan.cuts) == parts - 1
    for part in result.parts:
        onnx.checker.check_model(part, full_check=True)
        assert part.ir_version == model.ir_version
        assert [(o.domain, o.version) for o in part.opset_import] == [
            (o.domain, o.version) for o in model.opset_import
        ]
    # part 0 takes the model's inputs, each next part the previous part's outputs
    assert plan.parts[0].inputs == [i.name for i in model.graph.input]
    assert plan.parts[-1].outputs == [o.name for o in model.graph.output]
    for before, after, cut in zip(plan.parts, plan.parts[1:], plan.cuts, strict=False):
        assert before.outputs == after.inputs == [t.name for t in cut.tensors]
        assert 0 < len(cut.tensors) <= sp.MAX_CROSSING_TENSORS
        assert cut.bytes == sum(t.bytes for t in cut.tensors) > 0
    # no weight ever crosses a cut: each part holds the initializers it reads
    weights = {t.name for t in model.graph.initializer}
    assert not weights & {t.name for c in plan.cuts for t in c.tensors}
    for part, record in zip(result.parts, plan.parts, strict=True):
        used = {n for node in part.graph.node for n in node.input}
        assert {t.name for t in part.graph.initializer} <= used
        assert record.estimated_peak_bytes >= record.parameter_bytes > 0


@pytest.mark.parametrize("parts", [2, 3])
def test_chained_parts_reproduce_the_whole_model(arch, parts: int) -> None:
    model, feed = arch
    result = sp.split(model, parts)
    _assert_chain(result, model, parts)
    whole = _whole(model, feed)
    chained = sp.run_chain([_session(p) for p in result.parts], feed)
    assert sp.max_abs_diff(whole, chained) <= 1e-4
    assert whole["output"].shape == chained["output"].shape
    # balanced: every part within half of an equal share either way
    sizes = [p.parameter_bytes for p in result.plan.parts]
    share = sum(sizes) / parts
    assert all(0.5 * share <= s <= 1.5 * share for s in sizes), sizes


def test_bert_cuts_carry_the_hidden_state_and_the_mask_not_the_inputs() -> None:
    model, _ = _bert()
    plan = sp.split(model, 2).plan
    (cut,) = plan.cuts
    shapes = {tuple(t.shape) for t in cut.tensors}
    assert ("batch", "seq", 64) in shapes  # the hidden state, per token
    assert all(t.bytes <= 256 for t in cut.tensors)  # 64 floats per token at most


def test_constant_node_weights_count_as_parameters_and_stay_in_their_part(
    digits, tmp_path: Path
) -> None:
    path = tmp_path / "c12.onnx"
    digits_build().reexport(digits.model_path, path, 12, constant_weights=True)
    model = onnx.load(str(path))
    assert not model.graph.initializer and model.opset_import[0].version == 12
    feed = {"input": np.load(digits.val)["x"][:16]}
    whole = _whole(model, feed)
    stored = sum(declared_bytes(list(t.dims), t.data_type) or 0 for t in _constants(model))
    for parts in (2, 3):
        result = sp.split(model, parts)
        _assert_chain(result, model, parts)
        chained = sp.run_chain([_session(p) for p in result.parts], feed)
        assert sp.max_abs_diff(whole, chained) <= 1e-4
        assert result.plan.source.parameter_bytes >= stored
        # every weight lives in exactly one part, as the Constant node it was
        assert sum(p.parameter_bytes for p in result.plan.parts) == stored
        for part in result.parts:
            assert not part.graph.initializer
            assert part.opset_import[0].version == 12


def _constants(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]


def test_a_budget_moves_the_cut_and_an_impossible_one_is_refused(digits) -> None:
    from edgeslim.errors import BadInput

    model = digits.model()
    first = sp.split(model, 2).plan.parts[0].parameter_bytes
    budget = sp.split(model, 2, max_part_bytes=2_000_000).plan
    assert all(p.parameter_bytes <= 2_000_000 for p in budget.parts)
    assert first > 0
    with pytest.raises(BadInput, match="max-part-bytes"):
        sp.split(model, 2, max_part_bytes=1000)


# ------------------------------------------------------------------ the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "split", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )


def test_cli_writes_the_parts_and_split_json_checked_on_the_dataset(digits, tmp_path: Path) -> None:
    out = tmp_path / "split"
    proc = _cli(
        str(digits.model_path), "--parts", "2", "--output", str(out), "--check", str(digits.val)
    )
    assert proc.returncode == 0, proc.stderr
    plan = SplitPlan.model_validate_json((out / "split.json").read_text())
    assert [p.file for p in plan.parts] == ["part-0.onnx", "part-1.onnx"]
    assert plan.check is not None and plan.check.passed and plan.check.samples > 100
    assert plan.check.max_abs_diff <= 1e-4
    assert "max |diff|" in proc.stdout
    x = np.load(digits.val)["x"][:8]
    chained = sp.run_chain(
        [_session(onnx.load(str(out / p.file))) for p in plan.parts], {"input": x}
    )
    np.testing.assert_allclose(
        chained["logits"], _whole(digits.model(), {"input": x})["logits"], atol=1e-5
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "0"], "--parts 0"),
        (["--parts", "500"], "only"),
        (["--parts", "2", "--max-part-bytes", "1000"], "max-part-bytes"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture, args, message
) -> None:
    from edgeslim.cli import main

    assert main(["split", str(digits.model_path), "--output", str(tmp_path / "o"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("edgeslim: error:")
    assert not (tmp_path / "o").exists()


def test_cli_unreadable_or_missing_model_exits_2(tmp_path: Path, capsys) -> None:
    from edgeslim.cli import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    proc = _cli(str(bad), "--parts", "2", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "bad.onnx: not a valid ONNX file" in line
    assert main(["split", str(tmp_path / "missing.onnx"), "--parts", "2", "--output", "o"]) == 2
    assert "no such model file" in capsys.readouterr().err
