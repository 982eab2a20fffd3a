"""manifest.json, the result contract (kind CompressionResult).

Users, the operator, dashboards and scripts read it, so its keys are stable and
camelCase; `status.results` of a CompressedModel reuses the same names.
"""

from __future__ import annotations

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
    metric: str
    samples: int
    baseline: float
    compressed: float
    drop: float
    """baseline - compressed (compressed - baseline for mse): positive means worse."""


class LatencyFigures(OpenWireModel):
    source_p50_ms: float
    source_p95_ms: float
    compressed_p50_ms: float
    compressed_p95_ms: float
    speedup: float
    """source p50 / compressed p50 at batch 1."""
    slower: bool
    """The compressed model is slower than its source (e.g. int8 on a CPU without VNNI)."""


class MemoryFigures(OpenWireModel):
    source_peak_rss_bytes: int
    compressed_peak_rss_bytes: int


class GateVerdict(OpenWireModel):
    passed: bool
    max_metric_drop: float
    reason: str


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
    inputs: list[InputIdentity] = Field(default_factory=list)
    """Every file the result was computed from, with the content identity of the bytes
    used; a stored result is reused only while all of them are unchanged."""
