"""Hostile inputs built from scratch: .npz files and ONNX models that attack the readers,
and a way to run the real CLI and measure the memory it used.

Each builder writes a small file; none of them needs the memory the file
claims (the zip bomb is written from one precomputed deflate block).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.lib import format as npy
from onnx import TensorProto, helper, numpy_helper

MiB = 1024**2
GiB = 1024**3

# ---------------------------------------------------------------------------
# .npz


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def object_array_npz(path: Path) -> Path:
    """What `np.savez(x=np.array([...], dtype=object))` writes: a pickle inside the .npy."""
    np.savez(path, x=np.array([{"a": 1}, None, "three"], dtype=object))
    return path


def header_lies_npz(path: Path, rows: int = 2**40) -> Path:
    """A well-formed zip whose .npy header claims `rows` rows of 1x8x8 floats; 64 bytes of data."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_header((rows, 1, 8, 8)) + bytes(64))
    return path


def zip_bomb_npz(path: Path, inflated: int = 2 * GiB) -> Path:
    """An honest .npz (header, data, CRC all consistent) of `inflated` bytes of zeros, ~2 MB.

    Deflate after a full flush starts from an empty window, so 16 MiB of zeros
    compress to the same bytes every time: the stream is the header's block,
    that one block repeated, and an empty final block. The CRC is computed
    over the zeros chunk by chunk. Nothing of `inflated` size is ever in memory.
    """
    chunk = bytes(16 * MiB)
    assert inflated % len(chunk) == 0
    header = npy_header((inflated // (4 * 64), 1, 8, 8))
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    head_block = first.compress(header) + first.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_block = zeros.compress(chunk) + zeros.flush(zlib.Z_FULL_FLUSH)
    final_block = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    repeats = inflated // len(chunk)
    crc = zlib.crc32(header)
    for _ in range(repeats):
        crc = zlib.crc32(chunk, crc)
    size = len(header) + inflated
    csize = len(head_block) + repeats * len(zero_block) + len(final_block)
    name = b"x.npy"
    # Local file header, data, central directory, end record (sizes fit 32 bits: no zip64).
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, csize, size, len(name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, csize, size,
        len(name), 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    with open(path, "wb") as f:
        f.write(local + name + head_block)
        for _ in range(repeats):
            f.write(zero_block)
        f.write(final_block)
        directory_at = f.tell()
        f.write(central + name)
        directory_size = f.tell() - directory_at
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory_size, directory_at, 0))
    return path


# ---------------------------------------------------------------------------
# ONNX: each variant appends a node after the digits model's output.


def _append(model: onnx.ModelProto, nodes: list, inits: list | None = None) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name = out.graph.output[0].name
    for node in out.graph.node:
        for i, o in enumerate(node.output):
            if o == name:
                node.output[i] = name + "_pre"
    for node in nodes:
        node.input[:] = [name + "_pre" if i == "$out" else i for i in node.input]
        node.output[:] = [name if o == "$out" else o for o in node.output]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits or [])
    return out


def constant_with_bad_attribute(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Constant whose `value` is a float attribute, not a tensor."""
    return _append(
        model,
        [
            helper.make_node("Constant", [], ["c"], value=1.0),
            helper.make_node("Add", ["$out", "c"], ["$out"]),
        ],
    )


def unknown_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """Valid to the checker (custom domains are allowed), refused by onnxruntime."""
    out = _append(model, [helper.make_node("Steal", ["$out"], ["$out"], domain="com.evil")])
    out.opset_import.append(helper.make_opsetid("com.evil", 1))
    return out


def conv_group_zero(model: onnx.ModelProto) -> onnx.ModelProto:
    """Passes the checker and loads in onnxruntime; fails on the first run."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "group").i = 0
    return out


def huge_constant_of_shape(model: onnx.ModelProto) -> onnx.ModelProto:
    """ConstantOfShape of a constant [2^20, 2^20]: 4 TiB of floats once run."""
    shape = numpy_helper.from_array(np.array([2**20, 2**20], dtype=np.int64), "shape")
    return _append(
        model,
        [
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
            helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
            helper.make_node("Add", ["$out", "total"], ["$out"]),
        ],
        [shape],
    )


def huge_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    """An initializer that declares [2^20, 2^20] floats and holds 16 bytes."""
    t = TensorProto(name="h", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])
    t.raw_data = bytes(16)
    return _append(model, [helper.make_node("Add", ["$out", "h"], ["$out"])], [t])


def huge_sparse_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    """One stored value in a sparse [2^20, 2^20] tensor, which onnxruntime densifies."""
    values = numpy_helper.from_array(np.ones(1, dtype=np.float32), "sparse")
    indices = numpy_helper.from_array(np.zeros(1, dtype=np.int64), "sparse_indices")
    out = _append(model, [helper.make_node("Add", ["$out", "sparse"], ["$out"])])
    out.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2**20, 2**20]))
    return out


# ---------------------------------------------------------------------------
# Running the real CLI


@dataclass(frozen=True)
class Run:
    rc: int
    stdout: str
    stderr: str
    peak_rss_bytes: int


# A small parent that waits for the CLI with wait4: its rusage is the CLI's own
# peak, not the test process's (Linux carries a parent's peak into a child
# spawned straight from it, and pytest holds torch).
_RUNNER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)
"""


def run_cli(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> Run:
    """`edgeslim ARGS` as a real subprocess; exit code, output and its peak RSS."""
    peak = tmp / f"peak-{os.getpid()}-{len(list(tmp.glob('peak-*')))}"
    script = Path(sys.executable).with_name("edgeslim")  # the installed console script
    cli = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from edgeslim.cli import main; sys.exit(main())"]
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(peak), *cli, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, int(peak.read_text() or 0))
