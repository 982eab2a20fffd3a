"""manifest.json, the result contract (kind CompressionResult).

Users, the operator, dashboards and scripts read it, so its keys are stable and
camelCase; `status.results` of a CompressedModel reuses the same names.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from edgeslim.api.base import GROUP_VERSION, OpenWireModel


class ModelFigures(OpenWireModel):
    """Static facts about one model file."""

    uri: str = ""
    sha256: str = ""
    size_bytes: int = 0
    gzip_size_bytes: int = 0
    """What a fleet downloads: unstructured sparsity only pays off here."""
    parameters: int = 0
    """Weight elements in initializers (float and integer), subgraphs included."""
    sparsity: float = 0.0
    """Share of weight elements that are exactly zero."""


class StepRecord(OpenWireModel):
    type: str
    config: dict[str, Any] = Field(default_factory=dict)
    before: ModelFigures
    after: ModelFigures
    seconds: float
    changed: bool
    """False when the step left the weights and graph as they were."""
    grew: bool = False
    """True when the step made the file bigger; never counted as compression."""
    notes: list[str] = Field(default_factory=list)
    """What the step did or could not do, in words (e.g. layers skipped and why)."""


class EvaluationFigures(OpenWireModel):
    """The evaluation metric on the source and on the compressed model."""

    metric: str
    """The metric compared (spec.evaluation.metric)."""
    samples: int
    """Evaluation samples both models ran on."""
    baseline: float
    """The source model's metric."""
    compressed: float
    """The compressed model's metric."""
    drop: float
    """baseline - compressed (compressed - baseline for mse): positive means worse."""


class LatencyFigures(OpenWireModel):
    """Batch-1 inference latency of both models, measured by the compressor."""

    source_p50_ms: float
    """Median latency of the source model, milliseconds."""
    source_p95_ms: float
    """95th-percentile latency of the source model, milliseconds."""
    compressed_p50_ms: float
    """Median latency of the compressed model, milliseconds."""
    compressed_p95_ms: float
    """95th-percentile latency of the compressed model, milliseconds."""
    speedup: float
    """source p50 / compressed p50 at batch 1."""
    slower: bool
    """The compressed model is slower than its source (e.g. int8 on a CPU without VNNI)."""


class MemoryFigures(OpenWireModel):
    source_peak_rss_bytes: int
    compressed_peak_rss_bytes: int


class GateVerdict(OpenWireModel):
    """Whether the compressed model may roll out, and why."""

    passed: bool
    """True when the metric drop is within maxMetricDrop."""
    max_metric_drop: float
    """The gate's limit (spec.evaluation.maxMetricDrop) when it was judged."""
    reason: str
    """The verdict in words, e.g. the drop compared to the limit."""


class InputIdentity(OpenWireModel):
    """The content of one file a result was computed from (source, dataset, student...)."""

    field: str
    """The spec field that named it, e.g. `source`, `evaluation.dataset`."""
    uri: str
    sha256: str
    """sha256 of the bytes fetched and used: what decides whether a stored result is reused."""
    size_bytes: int
    etag: str | None = None
    """The store's ETag for those bytes (S3 only)."""
    version_id: str | None = None
    """The S3 object version, on versioned buckets."""


INPUTS_ID_CHARS = 16


def inputs_id(inputs: list[InputIdentity]) -> str:
    """A short digest of the content of every input (URI and sha256 of the bytes used).

    Names the folder a result is stored in under its spec hash, so the same spec
    over new bytes at the same URIs (a replaced source model) gets a folder of its
    own. The spec field is left out: it names, it does not change content.
    """
    pairs = sorted({(i.uri, i.sha256) for i in inputs})
    canonical = "\n".join(f"{uri}\0{sha}" for uri, sha in pairs)
    return hashlib.sha256(canonical.encode()).hexdigest()[:INPUTS_ID_CHARS]


class CandidateFigures(OpenWireModel):
    """One recipe the optimize search built and measured."""

    index: int
    """Position in the order the search tried candidates."""
    name: str
    """What the recipe is, in words (e.g. `static int8 per-channel minmax`)."""
    recipe: list[dict[str, Any]]
    """The pipeline steps, as spec.pipeline would write them: a passing one can be pinned."""
    size_bytes: int = 0
    """File size of the candidate's model (0: it could not be built)."""
    gzip_size_bytes: int = 0
    """Download size of the candidate's model."""
    metric: float | None = None
    """The evaluation metric of the candidate's model."""
    drop: float | None = None
    """baseline - metric (metric - baseline for mse): positive means worse."""
    latency_p50_ms: float | None = None
    """Batch-1 p50 on the machine that ran the search."""
    passed: bool = False
    """Within the gate (and, for objective latency, not slower than the source)."""
    reason: str = ""
    """Why it did not pass (gate, slower than the source, or the error that stopped it)."""
    float_nodes: list[str] = Field(default_factory=list)
    """Quantizable nodes this recipe keeps in float (mixed precision)."""
    seconds: float = 0.0
    """Time to build and measure it."""


class NodeSensitivity(OpenWireModel):
    """What quantizing one region costs: a computing node, the layout and constant
    elementwise ops its output flows through, and their readers (optimize_sensitivity)."""

    node: str
    """The computing node whose output region was measured."""
    op_type: str
    """Its operator type."""
    tensor: str = ""
    """Its output tensor."""
    recovery: float
    """Share of the quantized model's output error that goes away when this tensor stays
    float (1: all of it, 0: none)."""
    nodes: list[str] = Field(default_factory=list)
    """The nodes kept in float (quantize.excludeNodes) to keep the tensor float: its
    writer and its readers."""


class SearchRecord(OpenWireModel):
    """How an optimize search went."""

    objective: str
    """spec.optimize.objective: what "best" meant."""
    complete: bool
    """False in a manifest written while the search was still running (best so far)."""
    stopped_by: str | None = None
    """maxCandidates or maxSeconds when a budget ended the search early."""
    seconds: float = 0.0
    """Wall-clock time of the search."""
    sensitivity: list[NodeSensitivity] = Field(default_factory=list)
    """The most sensitive quantizable nodes, most sensitive first."""
    sensitive_nodes: list[str] = Field(default_factory=list)
    """Nodes the chosen candidate keeps in float because quantizing them broke the gate."""


class ParetoPoint(OpenWireModel):
    """A candidate no other beats on both download size and metric drop."""

    index: int
    """The candidate's index in the manifest's `candidates`."""
    name: str
    """What the recipe is, in words."""
    gzip_size_bytes: int
    """Download size of the candidate's model."""
    drop: float
    """Its metric drop (the gate compares it to maxMetricDrop)."""
    latency_p50_ms: float | None = None
    """Batch-1 p50 latency on the machine that ran the search."""
    passed: bool
    """Whether it passed the gate (and, for objective latency, was not slower)."""


PARETO_TOP = 5


def pareto_front(candidates: list[CandidateFigures], top: int = PARETO_TOP) -> list[ParetoPoint]:
    """Measured candidates not dominated on (download size, drop), smallest first."""
    measured = [c for c in candidates if c.drop is not None and c.gzip_size_bytes]
    front = [
        c
        for c in measured
        if not any(
            o.gzip_size_bytes <= c.gzip_size_bytes
            and o.drop <= c.drop
            and (o.gzip_size_bytes, o.drop) != (c.gzip_size_bytes, c.drop)
            for o in measured
        )
    ]
    front.sort(key=lambda c: (c.gzip_size_bytes, c.drop))
    return [
        ParetoPoint(
            index=c.index,
            name=c.name,
            gzip_size_bytes=c.gzip_size_bytes,
            drop=c.drop,
            latency_p50_ms=c.latency_p50_ms,
            passed=c.passed,
        )
        for c in front[:top]
    ]


class SplitFile(OpenWireModel):
    """One file of a split artifact, beside model.onnx under parts/."""

    uri: str
    sha256: str
    size_bytes: int


class SplitArtifacts(OpenWireModel):
    """deployment.split: the artifact cut into parts that run one after another, and the
    check that the chain answers as the whole artifact does on the evaluation data."""

    plan: SplitFile
    """parts/split.json: each part's inputs, outputs, bytes and the cuts (kind SplitPlan)."""
    parts: list[SplitFile]
    """parts/part-<i>.onnx, in the order they run."""
    samples: int
    """Evaluation samples the chain was compared on."""
    max_abs_diff: float
    """Largest |whole - chain| over every output and sample."""
    tolerance: float


class CompressionResult(OpenWireModel):
    api_version: Literal["edgeslim.io/v1alpha1"] = Field(default=GROUP_VERSION, alias="apiVersion")
    kind: Literal["CompressionResult"] = "CompressionResult"
    name: str
    namespace: str | None = None
    """The object's namespace (`default` for the CLI without one); None in manifests
    written before it was recorded, which are never reused."""
    spec_hash: str
    source: ModelFigures
    artifact: ModelFigures
    steps: list[StepRecord]
    evaluation: EvaluationFigures
    latency: LatencyFigures
    memory: MemoryFigures
    compression_ratio: float
    download_ratio: float
    gate: GateVerdict
    versions: dict[str, str]
    notes: list[str] = Field(default_factory=list)
    """What the evaluation did differently, in words (e.g. a model run one sample at a
    time because it fails on larger batches)."""
    inputs: list[InputIdentity] = Field(default_factory=list)
    """Every file the result was computed from, with the content identity of the bytes
    used; a stored result is reused only while all of them are unchanged."""
    candidates: list[CandidateFigures] = Field(default_factory=list)
    """spec.optimize only: every candidate the search measured, in the order tried."""
    chosen: int | None = None
    """spec.optimize only: index of the candidate written as the artifact (the closest
    one when none passed)."""
    search: SearchRecord | None = None
    """spec.optimize only: objective, budgets, sensitivity analysis."""
    split: SplitArtifacts | None = None
    """deployment.split only: the parts stored beside the artifact (gate passed)."""
