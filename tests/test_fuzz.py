"""Bounded fuzzing of the real CLI with hostile spec YAML, .npz and ONNX bytes.

Whatever the bytes, `edgeslim` must answer 0 (passed), 2 (bad input, one
line) or 3 (rejected by the gate): never a traceback, never memory beyond a
stated bound. Inputs are mutations of real files (the digits example's spec,
evaluation data and model) plus free-form YAML, run through `edgeslim.cli.main`
in one long-lived worker process (tests/cli_worker.py) so a few hundred
inputs cost seconds, not a Python start and a torch import each; the worker
runs with lowered size limits so the memory bound is tight.

The examples are derandomized (the same inputs every run, so the suite never
fails by chance); EDGESLIM_FUZZ_EXAMPLES=N runs N random inputs per target.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile_files as hf

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * hf.MiB
WORKER_ENV = {
    "EDGESLIM_MAX_DATASET_BYTES": str(LIMIT),
    "EDGESLIM_MAX_TENSOR_BYTES": str(LIMIT),
    "OMP_NUM_THREADS": "1",
}
# The worker holds numpy, onnx, onnxruntime and torch, and a full compress of
# the digits model peaks near 1 GiB; one input allocating what it declares
# (gigabytes) crosses this, and a failed allocation is a traceback.
PEAK_LIMIT = 2 * hf.GiB

_RANDOM = int(os.environ.get("EDGESLIM_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int, deadline_s: float):
    return settings(
        max_examples=_RANDOM or examples,
        derandomize=not _RANDOM,
        deadline=timedelta(seconds=deadline_s),
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # onnxruntime's own C++ logging
            text=True,
            env={**os.environ, **WORKER_ENV},
        )

    def run(self, *argv: str) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the CLI worker died (exit {self.proc.wait()}) on {argv}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


def check(result: dict, what: str) -> None:
    err = result["stderr"]
    assert "Traceback" not in err, f"{what}:\n{err[-3000:]}"
    assert result["rc"] in (0, 2, 3), f"{what}: exit {result['rc']}\n{err[-3000:]}"
    if result["rc"] == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeslim: error: "), f"{what}: {err}"
    assert result["peak"] < PEAK_LIMIT, f"{what}: peak RSS {result['peak']} bytes"


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """Overwrite data[offset % len] with byte for each edit; then maybe truncate at `cut`."""
    out = bytearray(data)
    for offset, byte in edits:
        out[offset % len(out)] = byte
    return bytes(out[: cut % len(out)] if cut is not None else out)


def edits_at(positions: st.SearchStrategy[int]) -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=6)


def compress_spec(tmp: Path, model: Path, dataset: Path, name: str = "spec.yaml") -> Path:
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "fuzz"},
        "spec": {
            "source": {"uri": str(model)},
            "evaluation": {
                "dataset": str(dataset),
                "metric": "accuracy",
                "samples": 32,
                "latencyRuns": 5,
            },
            "pipeline": [{"prune": {"method": "magnitude", "sparsity": 0.1}}],
            "output": {"uri": str(tmp / "out")},
        },
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------------------
# Spec YAML through `edgeslim validate`

EXAMPLE_SPEC = (ROOT / "examples" / "digits" / "digits.yaml").read_bytes()

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def _spec_with_one_field_replaced(draw) -> bytes:
    doc = yaml.safe_load(EXAMPLE_SPEC)
    node, path = doc, []
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    value = draw(_values)
    if not path:
        return yaml.safe_dump(value).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return yaml.safe_dump(doc).encode()


spec_bytes = st.one_of(
    _spec_with_one_field_replaced(),
    st.builds(
        mutate,
        st.just(EXAMPLE_SPEC),
        edits_at(st.integers(0, len(EXAMPLE_SPEC) - 1)),
        st.none() | st.integers(0, len(EXAMPLE_SPEC)),
    ),
    st.binary(max_size=512),
    st.text(alphabet="[]{}&*!|>-:?,'\"#%@` \n\tabc01", max_size=300).map(str.encode),
)


@fuzz_settings(examples=200, deadline_s=20)
@given(data=spec_bytes)
def test_any_spec_bytes_are_0_or_2(worker: Worker, tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    check(worker.run("validate", str(path)), f"spec {data[:200]!r}")


# ---------------------------------------------------------------------------
# .npz bytes through `edgeslim compress`


@pytest.fixture(scope="module")
def small_val(digits) -> dict[str, Base]:
    """The first 64 evaluation samples, stored and deflated: the bytes to mutate."""
    with np.load(digits.val) as npz:
        arrays = {k: npz[k][:64] for k in npz.files}
    out = {}
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        out[save.__name__] = Base(f"{save.__name__} of 64 samples", buf.getvalue())
    return out


@fuzz_settings(examples=40, deadline_s=120)
@given(
    which=st.sampled_from(["savez", "savez_compressed"]),
    region=st.sampled_from(["start", "end", "anywhere"]),
    offsets=st.lists(st.integers(0, 2**31), min_size=1, max_size=6),
    values=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    cut=st.none() | st.integers(0, 2**31),
)
def test_any_npz_bytes_are_0_2_or_3(
    worker: Worker,
    digits,
    small_val: dict[str, Base],
    tmp_path: Path,
    which: str,
    region: str,
    offsets: list[int],
    values: list[int],
    cut: int | None,
) -> None:
    base = small_val[which].data
    # Headers live in the first bytes (local header, .npy header) and the last
    # (central directory): most mutations go there, where parsers are.
    span = {"start": 256, "end": 256, "anywhere": len(base)}[region]
    start = len(base) - span if region == "end" else 0
    edits = [(start + o % span, v) for o, v in zip(offsets, values, strict=False)]
    path = tmp_path / "val.npz"
    path.write_bytes(mutate(base, edits, cut if region == "anywhere" else None))
    spec = compress_spec(tmp_path, digits.model_path, path)
    check(worker.run("compress", str(spec), "--quiet", "--force"), f"npz {which} {edits} {cut}")


# ---------------------------------------------------------------------------
# ONNX bytes through `edgeslim compress`


class Base:
    """Bytes to mutate, with a short repr (hypothesis prints fixtures in failure reports)."""

    def __init__(self, name: str, data: bytes, structure: list[int] | None = None) -> None:
        self.name, self.data, self.structure = name, data, structure or []

    def __repr__(self) -> str:
        return f"<{self.name}: {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def model_bytes(digits) -> Base:
    """The digits model and the offsets that are not weight payload (where structure is)."""
    data = digits.model_path.read_bytes()
    payload = bytearray(len(data))  # 1 where a weight tensor's raw bytes lie
    for init in onnx.load(str(digits.model_path)).graph.initializer:
        at = data.find(init.raw_data) if len(init.raw_data) > 64 else -1
        if at >= 0:
            payload[at : at + len(init.raw_data)] = b"\x01" * len(init.raw_data)
    structure = [i for i, flag in enumerate(payload) if not flag]
    return Base("digits cnn.onnx", data, structure)


@fuzz_settings(examples=40, deadline_s=120)
@given(
    picks=st.lists(st.integers(0, 2**31), min_size=1, max_size=6),
    values=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    cut=st.none() | st.integers(0, 2**31),
)
def test_any_onnx_bytes_are_0_2_or_3(
    worker: Worker,
    digits,
    model_bytes: Base,
    tmp_path: Path,
    picks: list[int],
    values: list[int],
    cut: int | None,
) -> None:
    data, structure = model_bytes.data, model_bytes.structure
    edits = [(structure[p % len(structure)], v) for p, v in zip(picks, values, strict=False)]
    path = tmp_path / "model.onnx"
    path.write_bytes(mutate(data, edits, cut))
    spec = compress_spec(tmp_path, path, digits.val)
    check(worker.run("compress", str(spec), "--quiet", "--force"), f"onnx {edits} {cut}")


# Fields of the parsed model set to arbitrary values: byte flips mostly break the
# protobuf wire format, these reach the checker, onnxruntime and the run itself.
_FIELDS = ["attribute", "dims", "data_type", "input_dims", "opset", "op_type", "raw_data"]


@fuzz_settings(examples=40, deadline_s=120)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(_FIELDS), st.integers(0, 2**16), st.integers(-(2**40), 2**40)),
        min_size=1,
        max_size=3,
    )
)
def test_any_onnx_fields_are_0_2_or_3(
    worker: Worker, digits, tmp_path: Path, changes: list[tuple[str, int, int]]
) -> None:
    model = digits.model()
    g = model.graph
    for field, pick, value in changes:
        if field == "attribute":
            attrs = [a for n in g.node for a in n.attribute]
            attr = attrs[pick % len(attrs)]
            if attr.ints:
                attr.ints[pick % len(attr.ints)] = value
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = value
            else:
                attr.f = float(value)
        elif field == "dims":
            init = g.initializer[pick % len(g.initializer)]
            init.dims[pick % len(init.dims)] = value
        elif field == "data_type":
            g.initializer[pick % len(g.initializer)].data_type = value % 32
        elif field == "input_dims":
            dims = g.input[0].type.tensor_type.shape.dim
            dims[pick % len(dims)].dim_value = value
        elif field == "opset":
            model.opset_import[0].version = value % 40
        elif field == "op_type":
            ops = ["Conv", "Relu", "Gemm", "MaxPool", "Flatten", "Reshape", "Expand", "Tile"]
            g.node[pick % len(g.node)].op_type = ops[value % len(ops)]
        else:
            init = g.initializer[pick % len(g.initializer)]
            init.raw_data = init.raw_data[: abs(value) % (len(init.raw_data) + 1)]
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    spec = compress_spec(tmp_path, path, digits.val)
    check(worker.run("compress", str(spec), "--quiet", "--force"), f"onnx fields {changes}")


def test_the_worker_answers_as_the_installed_cli(
    worker: Worker, digits, small_val: dict[str, Base], model_bytes: Base, tmp_path: Path
) -> None:
    """A handful of mutated inputs also run as real `edgeslim` processes: same answers."""
    spec_path = tmp_path / "mutated.yaml"
    spec_path.write_bytes(mutate(EXAMPLE_SPEC, [(300, ord("{")), (301, ord("&"))], None))
    npz_path = tmp_path / "mutated.npz"
    npz_path.write_bytes(mutate(small_val["savez"].data, [(70, ord("("))], None))
    onnx_path = tmp_path / "mutated.onnx"
    onnx_path.write_bytes(mutate(model_bytes.data, [(model_bytes.structure[40], 0x00)], None))
    bad_data = compress_spec(tmp_path, digits.model_path, npz_path, "bad-data.yaml")
    bad_model = compress_spec(tmp_path, onnx_path, digits.val, "bad-model.yaml")
    commands = [
        ["validate", str(spec_path)],
        ["compress", str(bad_data), "--quiet"],
        ["compress", str(bad_model), "--quiet"],
    ]
    for args in commands:
        answer = worker.run(*args)
        check(answer, " ".join(args))
        real = hf.run_cli(args, tmp_path, env=WORKER_ENV)
        assert "Traceback" not in real.stderr and real.rc == answer["rc"], real.stderr
        assert real.stderr.strip() == answer["stderr"].strip()
        assert real.peak_rss_bytes < PEAK_LIMIT


def _constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer held by a Constant node, as many exporters write it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [
        onnx.helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer
    ]
    nodes = [*constants, *out.graph.node]
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@fuzz_settings(examples=30, deadline_s=120)
@given(
    changes=st.lists(
        st.tuples(st.integers(0, 2**16), st.integers(0, 8), st.integers(0, 2**16)),
        min_size=1,
        max_size=3,
    )
)
def test_any_constant_node_fields_are_0_2_or_3(
    worker: Worker, digits, tmp_path: Path, changes: list[tuple[int, int, int]]
) -> None:
    """Constant-node attributes (the checker's ValidationError once escaped from them)."""
    model = _constant_weights(digits.model())
    constants = [n for n in model.graph.node if n.op_type == "Constant"]
    names = [n.output[0] for n in constants]
    for pick, kind, value in changes:
        node = constants[pick % len(constants)]
        attr = node.attribute[0]
        if kind == 0:
            attr.name = ["value_float", "value_ints", "sparse_value", "value_string", "valu"][
                value % 5
            ]
        elif kind == 1:
            attr.type = value % 15
        elif kind == 2:
            attr.t.data_type = 1 + value % 26
        elif kind == 3 and attr.t.dims:
            attr.t.dims[value % len(attr.t.dims)] = [0, 1, 2, 7, 1024][value % 5]
        elif kind == 4:
            node.attribute.append(onnx.helper.make_attribute("value_float", 1.0))
        elif kind == 5:
            node.output[0] = ["", "input", "logits", names[value % len(names)]][value % 4]
        elif kind == 6:
            attr.t.name = ["", "input", "x"][value % 3]
        elif kind == 7:
            node.domain = ["ai.onnx", "com.microsoft", "x"][value % 3]
        else:
            attr.t.raw_data = attr.t.raw_data[: value % (len(attr.t.raw_data) + 1)]
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    spec = compress_spec(tmp_path, path, digits.val)
    check(worker.run("compress", str(spec), "--quiet", "--force"), f"constants {changes}")
