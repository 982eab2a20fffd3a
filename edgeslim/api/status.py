"""status of a CompressedModel, written only by the operator.

Conditions follow the Kubernetes API conventions (metav1.Condition), so
kstatus (Flux), Argo CD and `kubectl wait --for=condition=Ready` read them.
`results` reuses manifest.json's names for the same figures.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from edgeslim.api.base import OpenWireModel
from edgeslim.api.result import EvaluationFigures, GateVerdict, LatencyFigures


class Phase(StrEnum):
    pending = "Pending"
    queued = "Queued"
    compressing = "Compressing"
    rejected = "Rejected"
    deploying = "Deploying"
    ready = "Ready"
    failed = "Failed"


class ConditionType(StrEnum):
    ready = "Ready"
    compressed = "Compressed"
    gate_passed = "GatePassed"
    available = "Available"
    # kstatus (Flux, Config Sync, cli-utils) reads these two before Ready:
    # Reconciling=True means "still working", Stalled=True means "cannot progress".
    reconciling = "Reconciling"
    stalled = "Stalled"


class Condition(OpenWireModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """One CamelCase word, for machines."""
    message: str = Field(default="", max_length=32768)
    """A sentence, for people."""
    last_transition_time: str
    """RFC 3339; changes only when status changes."""
    observed_generation: int | None = None


class ArtifactStatus(OpenWireModel):
    uri: str
    sha256: str
    size_bytes: int
    manifest_uri: str | None = None


class ServedArtifact(OpenWireModel):
    """An artifact the edge Deployment runs (or ran)."""

    uri: str
    sha256: str


class FailedArtifact(OpenWireModel):
    """An artifact whose rollout failed: not rolled out again for the same spec hash."""

    sha256: str
    spec_hash: str
    """specHash that produced it; a spec with another hash may try its artifact again."""
    reason: str
    """Why, e.g. ProgressDeadlineExceeded."""


MAX_FAILED_ARTIFACTS = 10


class Results(OpenWireModel):
    """The figures of manifest.json that people look at, under the same names."""

    compression_ratio: float
    download_ratio: float
    evaluation: EvaluationFigures
    latency: LatencyFigures | None = None
    gate: GateVerdict


class CompressedModelStatus(OpenWireModel):
    phase: Phase = Phase.pending
    observed_generation: int | None = None
    """metadata.generation this status describes (GitOps tools wait for it to match)."""
    spec_hash: str | None = None
    job_name: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    artifact: ArtifactStatus | None = None
    results: Results | None = None
    serving_artifact: str | None = None
    """sha256 of the artifact the Deployment serves on all its replicas."""
    ready_replicas: int | None = None
    """Ready pods of the serving Deployment."""
    last_good_artifact: ServedArtifact | None = None
    """The last artifact rolled out completely: what a failed rollout returns to."""
    failed_artifacts: list[FailedArtifact] = Field(
        default_factory=list, max_length=MAX_FAILED_ARTIFACTS
    )
    """Artifacts whose pods never became ready (newest last): never rolled out
    again while the spec keeps the hash that produced them."""
