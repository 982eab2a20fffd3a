"""split.json: how `edgeslim split` cut a model into parts that run one after another.

Each part is an ONNX model of its own; part 0 takes the whole model's inputs,
part i+1 takes exactly part i's outputs, and the last part's outputs are the
whole model's. Tensor sizes are per sample: symbolic dims (batch, sequence)
counted as 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgeslim.api.base import GROUP_VERSION, OpenWireModel

#: deployment.split: the parts lie in this folder beside the artifact's model.onnx.
PARTS_DIR = "parts"
PLAN_FILE = "split.json"


def part_file(index: int) -> str:
    return f"part-{index}.onnx"


def part_uri(artifact_uri: str, index: int) -> str:
    """Where part `index` of a split artifact lies: `<artifact folder>/parts/part-<i>.onnx`
    (one place, for the compressor that writes it and the operator that serves it)."""
    return f"{artifact_uri.rsplit('/', 1)[0]}/{PARTS_DIR}/{part_file(index)}"


class CrossingTensor(OpenWireModel):
    """One tensor sent from a part to the next."""

    name: str
    dtype: str
    """numpy's name for the element type (float32, int64, ...)."""
    shape: list[int | str]
    """Static dims as ints, symbolic ones (batch, sequence) by name."""
    bytes: int
    """Size with every symbolic dim counted as 1."""


class SplitCut(OpenWireModel):
    """The boundary between part `after` and part `after + 1`."""

    after: int
    tensors: list[CrossingTensor]
    bytes: int
    """What crosses this cut per sample: the sum over `tensors`."""


class SplitPart(OpenWireModel):
    index: int
    file: str
    """The part's file name, relative to split.json."""
    sha256: str
    inputs: list[str]
    outputs: list[str]
    nodes: int
    parameter_bytes: int
    """Bytes of the stored tensors the part holds: initializers and Constant-node values."""
    estimated_peak_bytes: int
    """parameterBytes plus the largest set of activations alive at once, per sample;
    the runtime's own overhead comes on top."""


class SplitCheck(OpenWireModel):
    """The chain of parts run against the whole model on the same inputs."""

    source: str
    """The dataset's path, or `synthetic` for one generated sample."""
    samples: int
    max_abs_diff: float
    tolerance: float
    passed: bool


class SplitSource(OpenWireModel):
    file: str
    sha256: str
    nodes: int
    parameter_bytes: int


class SplitPlan(OpenWireModel):
    """What `edgeslim split` wrote: the parts in the order they run, and each cut."""

    api_version: Literal["edgeslim.io/v1alpha1"] = Field(default=GROUP_VERSION, alias="apiVersion")
    kind: Literal["SplitPlan"] = "SplitPlan"
    source: SplitSource
    max_part_bytes: int | None = None
    """The per-part budget asked for, if any."""
    parts: list[SplitPart]
    cuts: list[SplitCut]
    check: SplitCheck | None = None
