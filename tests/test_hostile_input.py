"""Hostile files through the real CLI: exit 2, one line naming the file and the problem,
no traceback, bounded memory, nothing written.

Each case was an exit 1 with a traceback, a MemoryError or a 3 GB exit 0
before the readers checked declared sizes (issue 8, item 2).
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgeslim.compressor import datasets
from edgeslim.errors import BadInput
from tests import hostile_files as hf

# Every case here fails before anything heavy loads; a reader that inflated the
# bomb or allocated the declared shapes would be well past this.
PEAK_RSS_LIMIT = 512 * hf.MiB


def spec(tmp: Path, model: Path, dataset: Path) -> Path:
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "hostile"},
        "spec": {
            "source": {"uri": str(model)},
            "evaluation": {"dataset": str(dataset), "metric": "accuracy", "latencyRuns": 5},
            "pipeline": [{"prune": {"method": "magnitude", "sparsity": 0.1}}],
            "output": {"uri": str(tmp / "out")},
        },
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def assert_refused(run: hf.Run, tmp: Path, *mentions: str) -> None:
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeslim: error: "), run.stderr
    for text in mentions:
        assert text in lines[0], lines[0]
    assert run.peak_rss_bytes < PEAK_RSS_LIMIT, run.peak_rss_bytes
    out = tmp / "out"
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


NPZ_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "object array": (hf.object_array_npz, "holds Python objects"),
    "not a zip": (lambda p: (p.write_bytes(b"not a zip file " * 100), p)[1], "not a zip archive"),
    "header claims 2^40 rows": (hf.header_lies_npz, "declares shape [1099511627776, 1, 8, 8]"),
    "2 MB inflating to 2 GiB": (hf.zip_bomb_npz, "zip bomb"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_hostile_dataset_is_exit_2_in_one_line(case: str, digits, tmp_path: Path) -> None:
    build, mention = NPZ_CASES[case]
    dataset = build(tmp_path / "hostile.npz")
    run = hf.run_cli(
        ["compress", str(spec(tmp_path, digits.model_path, dataset)), "--quiet"], tmp_path
    )
    assert_refused(run, tmp_path, str(dataset), mention)


def test_zip_bomb_under_the_ratio_is_stopped_by_the_size_limit(digits, tmp_path: Path) -> None:
    dataset = hf.zip_bomb_npz(tmp_path / "bomb.npz", inflated=256 * hf.MiB)
    run = hf.run_cli(
        ["compress", str(spec(tmp_path, digits.model_path, dataset)), "--quiet"],
        tmp_path,
        env={
            "EDGESLIM_MAX_DATASET_COMPRESSION_RATIO": "100000",
            "EDGESLIM_MAX_DATASET_BYTES": str(128 * hf.MiB),
        },
    )
    assert_refused(run, tmp_path, str(dataset), "inflate to more than 128 MiB")


ONNX_CASES: dict[str, tuple[Callable[[onnx.ModelProto], onnx.ModelProto], str]] = {
    "Constant with a float value attribute": (
        hf.constant_with_bad_attribute,
        "Mismatched attribute type",
    ),
    "op onnxruntime does not know": (hf.unknown_op, "onnxruntime cannot load the model"),
    "Conv with group 0": (hf.conv_group_zero, "onnxruntime cannot run the model"),
    "ConstantOfShape of 4 TiB": (hf.huge_constant_of_shape, "tensor 'zeros' would be"),
    "initializer declaring 4 TiB": (hf.huge_initializer, "initializer 'h' declares dims"),
    "sparse initializer of 4 TiB dense": (
        hf.huge_sparse_initializer,
        "sparse initializer 'sparse' (dense) declares dims",
    ),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_hostile_model_is_exit_2_in_one_line(case: str, digits, tmp_path: Path) -> None:
    build, mention = ONNX_CASES[case]
    model = tmp_path / "hostile.onnx"
    onnx.save(build(digits.model()), str(model))
    run = hf.run_cli(["compress", str(spec(tmp_path, model, digits.val)), "--quiet"], tmp_path)
    assert_refused(run, tmp_path, str(model), mention)


def _zip_of_many_entries(path: Path, entries: int, comment: int = 0) -> Path:
    """A zip whose central directory lists `entries` entries (each `comment` bytes of comment).

    Every entry points at the one local header, so the file is ~50 bytes an
    entry; zipfile would read the directory whole and build an object per
    entry before anyone could look at the names. Zip64 end records carry counts
    past 65535, as a real archive of that many entries would.
    """
    name = b"archive/data/0"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0)
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 0, 0, 0x21, 0, 0, 0,
        len(name), 0, comment, 0, 0, 0, 0,
    ) + name + b"c" * comment  # fmt: skip
    with open(path, "wb") as f:
        f.write(local + name)
        directory_at = f.tell()
        for _ in range(entries):
            f.write(central)
        directory_size = f.tell() - directory_at
        end64_at = f.tell()
        end64 = struct.pack(
            "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
            directory_size, directory_at,
        )  # fmt: skip
        f.write(end64)
        f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64_at, 1))
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, *[0xFFFFFFFF] * 2, 0))
    return path


ARCHIVE_CASES: dict[str, tuple[int, int, str]] = {
    "200000 entries": (200_000, 0, "declares 200000 entries"),
    "an 18 MiB central directory": (320, 60_000, "320 entries in a 19219200-byte directory"),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES))
def test_model_archive_with_a_huge_directory_is_exit_2(case: str, digits, tmp_path: Path) -> None:
    entries, comment, mention = ARCHIVE_CASES[case]
    model = _zip_of_many_entries(tmp_path / "hostile.pt", entries, comment)
    run = hf.run_cli(["compress", str(spec(tmp_path, model, digits.val)), "--quiet"], tmp_path)
    assert_refused(run, tmp_path, str(model), mention)


def _batch_one_model(reshape_first: bool) -> onnx.ModelProto:
    """x [N, 64] -> MatMul [64, 10], with a Reshape to [1, -1] written for batch 1.

    Reshape first: at batch N > 1 the MatMul sees [1, 64N] and onnxruntime
    fails. Reshape last: it runs, but answers N samples with one row of 10N.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "batch_of_one")
    reshape = ("x", "flat") if reshape_first else ("mm", "y")
    matmul = ("flat", "y") if reshape_first else ("x", "mm")
    nodes = [
        helper.make_node("Reshape", [reshape[0], "batch_of_one"], [reshape[1]]),
        helper.make_node("MatMul", [matmul[0], "w"], [matmul[1]]),
    ]
    graph = helper.make_graph(
        nodes if reshape_first else nodes[::-1],
        "batch_of_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])],
        [weight, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("reshape_first", [True, False], ids=["fails", "wrong rows"])
def test_source_that_only_runs_at_batch_1_is_evaluated_one_sample_at_a_time(
    reshape_first: bool, tmp_path: Path
) -> None:
    model, dataset = tmp_path / "batch1.onnx", tmp_path / "val.npz"
    onnx.save(_batch_one_model(reshape_first), str(model))
    rng = np.random.default_rng(1)
    np.savez(dataset, x=rng.normal(size=(40, 64)).astype(np.float32), y=np.arange(40) % 10)
    run = hf.run_cli(["compress", str(spec(tmp_path, model, dataset)), "--quiet"], tmp_path)
    assert run.rc in (0, 3), run.stderr  # 3: the gate may reject the pruned model; not a crash
    assert "Traceback" not in run.stderr
    (manifest,) = (tmp_path / "out").rglob("manifest.json")
    result = json.loads(manifest.read_text())
    assert result["evaluation"]["samples"] == 40
    assert len(result["notes"]) == 2, result["notes"]  # source, then the compressed model
    why = "onnxruntime fails" if reshape_first else "its first output has shape [1, 400]"
    assert result["notes"][0].startswith(f"evaluate source: {model} ran one sample at a time")
    assert f"(at batch 40 {why}" in result["notes"][0], result["notes"][0]


def test_a_source_failing_one_sample_at_a_time_is_bad_input_naming_it() -> None:
    """Each sample is the shape a Reshape takes: (2, 3) fits six values, (4, 4) does not."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeslim.compressor import evaluate

    six = numpy_helper.from_array(np.arange(6, dtype=np.float32), "six")
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["x", "axis0"], ["shape"]),  # batch 1 only
            helper.make_node("Reshape", ["six", "shape"], ["y"]),
        ],
        "shape_from_data",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [six, numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = datasets.Dataset({"x": np.array([[2, 3], [3, 2], [4, 4]], np.int64)}, None, "d")
    sess = evaluate.session(model)
    notes: list[str] = []
    with pytest.raises(BadInput, match=r"^src\.onnx: onnxruntime cannot run the model: "):
        evaluate.run_batched(sess, data, where="src.onnx", notes=notes)
    assert len(notes) == 1 and "ran one sample at a time (at batch 3" in notes[0], notes


def test_a_compressed_model_onnxruntime_refuses_names_the_steps(tmp_path: Path) -> None:
    from edgeslim.api.result import ModelFigures, StepRecord
    from edgeslim.api.spec import Evaluation
    from edgeslim.compressor import pipeline
    from edgeslim.compressor.steps import NullProgress
    from edgeslim.errors import OutputModelFailed

    source = _batch_one_model(reshape_first=False)
    broken = onnx.ModelProto()
    broken.CopyFrom(source)
    broken.graph.node[0].op_type = "NoSuchOp"  # what a faulty step could leave behind
    data = datasets.Dataset({"x": np.ones((4, 64), np.float32)}, None, "val.npz")
    figures = ModelFigures()
    records = [
        StepRecord(type=t, before=figures, after=figures, seconds=0.0, changed=True)
        for t in ("prune", "quantize")
    ]
    with pytest.raises(
        OutputModelFailed,
        match=r"^the compressed model \(source -> prune -> quantize\) fails in onnxruntime, "
        r"though its source runs: .*NoSuchOp",
    ):
        pipeline._measure(
            Evaluation(dataset="val.npz", metric="agreement"),
            source,
            broken,
            data,
            tmp_path,
            NullProgress(),
            "batch1.onnx",
            records,
        )


def _laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


YAML_CASES: dict[str, tuple[bytes, str]] = {
    "billion laughs": (_laughs().encode(), "expands to more than"),
    "alias inside itself": (b"spec: &a [*a]\n", "refers to a node that contains it"),
    "nested 5000 deep": (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    "a list at the top": (b"- apiVersion: edgeslim.io/v1alpha1\n", "found a YAML list"),
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "2 MiB": (b"a: '" + b"x" * (2 * hf.MiB) + b"'\n", "larger than 1 MiB"),
    "5000-digit integer": (b"a: " + b"9" * 5000 + b"\n", "not valid YAML"),
    "python tag": (b"a: !!python/object/apply:os.system [id]\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_hostile_spec_is_exit_2_in_one_line(case: str, tmp_path: Path) -> None:
    text, mention = YAML_CASES[case]
    path = tmp_path / "spec.yaml"
    path.write_bytes(text)
    assert_refused(hf.run_cli(["validate", str(path)], tmp_path), tmp_path, str(path), mention)


# ---------------------------------------------------------------------------
# The reader itself: same arrays as numpy for honest files, limits from settings.


def test_checked_reader_reads_what_numpy_reads(tmp_path: Path) -> None:
    arrays = {
        "x": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
        "f": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "y": np.array([1, 0], dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.uint8),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        got = datasets.read(path, str(path))
        assert set(got) == set(arrays)
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape
            np.testing.assert_array_equal(got[name], want)
        first = datasets.read(path, str(path), rows=1, skip={"y"})
        assert "y" not in first and first["x"].shape == (1, 3, 4)
        np.testing.assert_array_equal(first["f"], arrays["f"][:1])


def test_dataset_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((1024, 256), dtype=np.float32))  # 1 MiB
    assert datasets.read(path, "d")["x"].shape == (1024, 256)
    monkeypatch.setenv("EDGESLIM_MAX_DATASET_BYTES", str(512 * 1024))
    with pytest.raises(BadInput, match=r"inflate to more than 512 KiB.*EDGESLIM_MAX_DATASET_BYTES"):
        datasets.read(path, "d")
    monkeypatch.setenv("EDGESLIM_MAX_DATASET_BYTES", "lots")
    with pytest.raises(BadInput, match="EDGESLIM_MAX_DATASET_BYTES='lots'"):
        datasets.read(path, "d")


def test_a_header_that_understates_the_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", hf.npy_header((2, 2)) + bytes(4 * 4 + 100))
    with pytest.raises(BadInput, match=r"declares shape \[2, 2\] float32 \(16 bytes\).*116"):
        datasets.read(path, "short")


def _raw_npy(header: bytes) -> bytes:
    """A version 1.0 .npy prefix around an arbitrary header literal (padded as numpy pads)."""
    padded = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded


MALFORMED_MEMBERS: dict[str, tuple[str, bytes]] = {
    # Each of these once escaped as something other than BadInput (found by test_fuzz).
    "NUL byte in the header": (
        "x.npy",
        _raw_npy(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }\x00"),
    ),
    "unclosed header literal": ("x.npy", _raw_npy(b"(" * 500)),
    "empty member name": ("", hf.npy_header((1,)) + bytes(4)),
    "structured dtype": ("x.npy", hf.npy_header((1,), descr="[('a', '<f4')]") + bytes(4)),
    "not .npy at all": ("x.txt", b"hello"),
}


@pytest.mark.parametrize("case", list(MALFORMED_MEMBERS))
def test_malformed_members_are_bad_input(case: str, tmp_path: Path) -> None:
    name, data = MALFORMED_MEMBERS[case]
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), data)
    with pytest.raises(BadInput, match=r"^dataset m\.npz: "):
        datasets.read(path, "m.npz")


def test_tensor_limit_is_a_setting(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeslim.compressor import model_io

    model_io.load_onnx(digits.model_path, "cnn.onnx")
    # The largest weight is classifier.1.weight, [256, 1024] float32: 1 MiB.
    monkeypatch.setenv("EDGESLIM_MAX_TENSOR_BYTES", str(512 * 1024))
    with pytest.raises(
        BadInput, match=r"'classifier.1.weight' declares dims \[256, 1024\] \(1 MiB\)"
    ):
        model_io.load_onnx(digits.model_path, "cnn.onnx")
