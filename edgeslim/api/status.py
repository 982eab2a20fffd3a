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
from edgeslim.api.canary import CanaryStatus
from edgeslim.api.lineage import MAX_HISTORY, HistoryEntry, Recompression, SourceIdentity
from edgeslim.api.result import EvaluationFigures, GateVerdict, LatencyFigures, ParetoPoint


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
    """One aspect of the object's state, in metav1.Condition form."""

    type: str
    """Ready, Compressed, GatePassed, Available, Reconciling or Stalled."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """One CamelCase word, for machines."""
    message: str = Field(default="", max_length=32768)
    """A sentence, for people."""
    last_transition_time: str
    """RFC 3339; changes only when status changes."""
    observed_generation: int | None = None
    """metadata.generation the condition was set for."""


class PartArtifact(OpenWireModel):
    """One part of a split artifact (deployment.split)."""

    uri: str
    """Where parts/part-<i>.onnx lies."""
    sha256: str
    """sha256 of the part file."""


class SplitServingStatus(OpenWireModel):
    """deployment.split: the chain of part Deployments serving the model."""

    parts: int
    """Part Deployments (and Services) running, `<name>-part-0` first."""
    service: str
    """The Service clients call: part 0's, which forwards through the chain and answers
    with the whole model's outputs."""
    ready_replicas: list[int] = Field(default_factory=list)
    """Ready pods of each part's Deployment, part 0 first."""


class ArtifactStatus(OpenWireModel):
    """The compressed model the current spec produced."""

    uri: str
    """Where the compressed model.onnx lies."""
    sha256: str
    """sha256 of the compressed model file."""
    size_bytes: int
    """Size of the compressed model file in bytes."""
    manifest_uri: str | None = None
    """Where its manifest.json (figures, inputs, versions) lies."""
    parts: list[PartArtifact] | None = None
    """deployment.split: the parts the chain serves, in order (part 0 first)."""


class ServedArtifact(OpenWireModel):
    """An artifact the edge Deployment runs (or ran)."""

    uri: str
    """Where the served model.onnx lies."""
    sha256: str
    """sha256 of the served model file."""
    parts: list[PartArtifact] | None = None
    """deployment.split: the parts of this artifact the part Deployments run."""


class FailedArtifact(OpenWireModel):
    """An artifact whose rollout failed: not rolled out again for the same spec hash."""

    sha256: str
    """sha256 of the artifact that failed."""
    spec_hash: str
    """specHash that produced it; a spec with another hash may try its artifact again."""
    reason: str
    """Why, e.g. ProgressDeadlineExceeded."""
    message: str | None = None
    """Details, e.g. the canary analysis that rolled it back."""


MAX_FAILED_ARTIFACTS = 10


class Results(OpenWireModel):
    """The figures of manifest.json that people look at, under the same names."""

    compression_ratio: float
    """Source size / artifact size, uncompressed."""
    download_ratio: float
    """Source size / artifact size, both gzipped: what each device downloads."""
    evaluation: EvaluationFigures
    latency: LatencyFigures | None = None
    gate: GateVerdict
    candidates_tried: int | None = None
    """spec.optimize only: candidates the search measured."""
    pareto: list[ParetoPoint] | None = None
    """spec.optimize only: the top 5 of the Pareto front, download size against drop."""


class PolicyRef(OpenWireModel):
    """The CompressionPolicy whose defaults the status reflects."""

    name: str
    """The policy's name (same namespace)."""
    generation: int | None = None
    """The policy's metadata.generation merged into the current specHash."""


class TargetStatus(OpenWireModel):
    """One spec.targets entry's state: the same fields, with the same meaning, as the
    object's own status has for an object without targets."""

    name: str
    """The target (spec.targets[].name)."""
    phase: Phase = Phase.pending
    """This target's phase (Pending ... Ready, Rejected, Failed)."""
    observed_generation: int | None = None
    """metadata.generation this entry describes."""
    spec_hash: str | None = None
    """Hash of the target's effective spec; its Job and artifact prefix are named after it."""
    job_name: str | None = None
    """The target's compressor Job."""
    message: str | None = None
    """What happened last to this target, for people."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Compressed, GatePassed, Available, Reconciling, Stalled of this target."""
    artifact: ArtifactStatus | None = None
    results: Results | None = None
    serving_artifact: str | None = None
    """sha256 of the artifact the target's Deployment serves on all its replicas."""
    ready_replicas: int | None = None
    """Ready pods of the target's serving Deployment."""
    last_good_artifact: ServedArtifact | None = None
    """The target's last artifact rolled out completely."""
    failed_artifacts: list[FailedArtifact] = Field(
        default_factory=list, max_length=MAX_FAILED_ARTIFACTS
    )
    """The target's artifacts whose pods never became ready (newest last)."""
    source: SourceIdentity | None = None
    """The source model the target's current artifact was made from, and when the
    operator last compared it with storage (a change re-compresses every target once)."""
    recompression: Recompression | None = None
    """The target's re-compression under way without a spec change (source replaced, or
    a new compressor with spec.recompressOnUpgrade); its previous artifact serves meanwhile."""
    history: list[HistoryEntry] = Field(default_factory=list, max_length=MAX_HISTORY)
    """The target's last spec.historyLimit artifacts (newest last) with source identity,
    toolchain versions and verdict: lineage for audits."""
    canary: CanaryStatus | None = None
    """spec.deployment.canary: the step, share and analyses of the target's latest canary
    (its own `<name>-<target>-canary` Deployment)."""


class CompressedModelStatus(OpenWireModel):
    phase: Phase = Phase.pending
    """Pending, Queued, Compressing, Deploying, Ready, Rejected (the gate refused the
    result) or Failed."""
    observed_generation: int | None = None
    """metadata.generation this status describes (GitOps tools wait for it to match)."""
    spec_hash: str | None = None
    """Hash of the spec fields that decide the artifact; child objects are named after it."""
    job_name: str | None = None
    """The compressor Job of this spec hash."""
    message: str | None = None
    """What happened last, for people."""
    candidates: str | None = None
    """spec.optimize searched by parallel Jobs: candidate Jobs finished / planned (`3/6`)."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Compressed, GatePassed, Available, and Reconciling / Stalled (which kstatus
    reads), each with the generation it describes."""
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
    source: SourceIdentity | None = None
    """The source model the current artifact was made from, and when the operator last
    compared it with storage (a change starts one re-compression)."""
    recompression: Recompression | None = None
    """The re-compression under way without a spec change (source replaced, or a new
    compressor with spec.recompressOnUpgrade); the previous artifact serves meanwhile."""
    history: list[HistoryEntry] = Field(default_factory=list, max_length=MAX_HISTORY)
    """The last spec.historyLimit artifacts (newest last) with source identity, toolchain
    versions and verdict: lineage for audits."""
    policy: PolicyRef | None = None
    """The CompressionPolicy that selects this object and the generation of it
    merged into the current specHash; absent when no policy selects it."""
    targets: list[TargetStatus] | None = Field(default=None, max_length=16)
    """spec.targets only: one entry per target; the phase and conditions above then
    sum them up (Ready when every target is; while any still works, the furthest
    behind; then Failed, else Rejected, if any target ended so)."""
    targets_ready: str | None = None
    """spec.targets only: targets Ready / targets (`1/2`), the TARGETS column."""
    split: SplitServingStatus | None = None
    """deployment.split only: the part Deployments and the Service to call."""
    canary: CanaryStatus | None = None
    """spec.deployment.canary: the step, share and analyses of the latest canary. With
    spec.targets each target's canary is in its status.targets entry, not here."""
