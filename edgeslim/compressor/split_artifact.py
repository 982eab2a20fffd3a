"""deployment.split in the compressor: the artifact that passed the gate, cut into parts.

The parts go beside model.onnx (`parts/part-<i>.onnx`, `parts/split.json`) and
into the manifest with their sha256, so the operator can pin every part it
serves. The chain is run against the whole artifact on the evaluation data
first: parts that answer otherwise than the artifact that passed the gate
are never stored, and the result fails saying by how much.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import onnx

from edgeslim.api.result import SplitArtifacts, SplitFile
from edgeslim.api.spec import MAX_SPLIT_PARTS, SplitSpec
from edgeslim.api.split import PLAN_FILE, SplitCheck, part_uri
from edgeslim.compressor import split as splitting
from edgeslim.compressor.datasets import Dataset
from edgeslim.errors import BadInput, OutputModelFailed


@dataclass(frozen=True)
class SplitOutput:
    record: SplitArtifacts
    files: list[tuple[bytes, str]]
    """(bytes, uri) to write, the plan last."""


def _cut(model: onnx.ModelProto, spec: SplitSpec, source_file: str) -> splitting.SplitResult:
    """`parts` as asked, or with maxPartBytes alone the fewest parts (2 or more) that fit."""
    if spec.parts is not None:
        try:
            return splitting.split(
                model, spec.parts, max_part_bytes=spec.max_part_bytes, source_file=source_file
            )
        except BadInput as exc:
            raise BadInput(f"deployment.split: {exc}") from exc
    last: BadInput | None = None
    for parts in range(2, MAX_SPLIT_PARTS + 1):
        try:
            return splitting.split(
                model, parts, max_part_bytes=spec.max_part_bytes, source_file=source_file
            )
        except BadInput as exc:
            last = exc
    raise BadInput(
        f"deployment.split: no split into {MAX_SPLIT_PARTS} parts or fewer keeps each part "
        f"within maxPartBytes {spec.max_part_bytes} ({last})"
    )


def split_artifact(
    model: onnx.ModelProto, spec: SplitSpec, eval_data: Dataset, model_uri: str
) -> SplitOutput:
    """The parts of `model` (stored at `model_uri`), checked against it sample by sample."""
    result = _cut(model, spec, model_uri.rsplit("/", 1)[-1])
    data = eval_data.head(splitting.CHECK_SAMPLES)
    feeds = [data.batch(i, i + 1) for i in range(len(data))]
    diff, samples = splitting.compare_chain(model, result.parts, feeds)
    tolerance = splitting.CHECK_TOLERANCE
    if not diff <= tolerance:
        raise OutputModelFailed(
            f"deployment.split: the chain of {len(result.parts)} parts differs from the "
            f"artifact by up to {diff:.3g} on {samples} evaluation samples (tolerance "
            f"{tolerance}); no parts were stored"
        )
    check = SplitCheck(
        source="evaluation", samples=samples, max_abs_diff=diff, tolerance=tolerance, passed=True
    )
    plan = result.plan.model_copy(update={"check": check})
    files: list[tuple[bytes, str]] = []
    records: list[SplitFile] = []
    for i, part in enumerate(result.parts):
        blob = part.SerializeToString()
        uri = part_uri(model_uri, i)
        files.append((blob, uri))
        records.append(
            SplitFile(uri=uri, sha256=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob))
        )
    plan_blob = (plan.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n").encode()
    plan_uri = part_uri(model_uri, 0).rsplit("/", 1)[0] + "/" + PLAN_FILE
    files.append((plan_blob, plan_uri))
    record = SplitArtifacts(
        plan=SplitFile(
            uri=plan_uri, sha256=hashlib.sha256(plan_blob).hexdigest(), size_bytes=len(plan_blob)
        ),
        parts=records,
        samples=samples,
        max_abs_diff=diff,
        tolerance=tolerance,
    )
    return SplitOutput(record, files)
