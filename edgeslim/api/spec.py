"""The CompressedModel resource: the single source of truth for its schema.

The CLI parses specs with these models, the operator reads objects with them
and the CRD's openAPIV3Schema is generated from them, so a field description
written here is what `kubectl explain` shows.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from edgeslim.api.base import WireModel
from edgeslim.api.canary import CanarySpec
from edgeslim.api.lineage import MAX_HISTORY

SHA256_PATTERN = r"^[a-f0-9]{64}$"
# s3://bucket/key, file:///abs/path or a plain filesystem path.
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+|[^:]+)$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Uri = Annotated[str, Field(min_length=1, max_length=1024, pattern=URI_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Metric(StrEnum):
    accuracy = "accuracy"
    top5 = "top5"
    agreement = "agreement"
    cosine = "cosine"
    mse = "mse"

    @property
    def higher_is_better(self) -> bool:
        return self is not Metric.mse

    @property
    def needs_labels(self) -> bool:
        return self in (Metric.accuracy, Metric.top5)


MIN_SOURCE_CHECK_SECONDS = 60
"""Shortest spec.source.checkIntervalSeconds: a HEAD per object per minute is cheap."""


class Source(WireModel):
    """Where the model to compress lives."""

    uri: Uri
    """Model location: s3://bucket/key, file:///path or a path. ONNX, or TorchScript
    with allowModelCode."""
    sha256: Sha256 | None = None
    """Expected sha256 of the file; the download is refused when it differs."""
    credentials_secret: str | None = Field(default=None, pattern=DNS_LABEL, max_length=253)
    """Secret (same namespace) holding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    optionally AWS_ENDPOINT_URL / AWS_REGION for s3:// URIs. Used by the operator only."""
    allow_model_code: bool = False
    """Run this model's own code. A TorchScript file is a program: loading and converting
    it to ONNX runs its code, so it is refused unless this is true. When true, the
    conversion runs inside edgeslim's sandbox: a separate, time-limited process with no
    credentials or environment, no network, and file access confined to a private scratch
    folder (Landlock; refused where the kernel cannot confine it). ONNX files are data and
    never need this."""
    check_interval_seconds: int | None = Field(default=None, ge=0, le=7 * 86_400)
    """In a cluster: how often the operator compares the source in storage with the one
    the artifact was made from (S3 HEAD: ETag / VersionId; a file's size and mtime, then
    its sha256) and re-compresses once when it was replaced; the artifact serving keeps
    serving until the new one passes the gate. 0 = never; at least 60; default: the
    operator's EDGESLIM_SOURCE_CHECK_SECONDS (600). A pinned sha256 is never checked."""

    @model_validator(mode="after")
    def _check_interval(self) -> Source:
        every = self.check_interval_seconds
        if every is not None and 0 < every < MIN_SOURCE_CHECK_SECONDS:
            raise ValueError(
                f"source.checkIntervalSeconds: {every} is below the minimum of "
                f"{MIN_SOURCE_CHECK_SECONDS} (0 turns checks off)"
            )
        return self


class Evaluation(WireModel):
    """How the compressed model is proven good enough."""

    dataset: Uri
    """An .npz file: one array per model input (named after it; `x` for a single-input
    model), first axis = samples, optional labels `y`."""
    dataset_sha256: Sha256 | None = None
    """Expected sha256 of the dataset file."""
    metric: Metric = Metric.accuracy
    """accuracy and top5 need labels `y`; agreement (same top-1 as the source model),
    cosine (output similarity to the source model) and mse compare with the source model."""
    max_metric_drop: float = Field(default=0.01, ge=0, le=1e6)
    """The gate: a result whose metric is worse than the source model's by more than
    this is Rejected and never deployed. Absolute, in the metric's own units."""
    samples: int | None = Field(default=None, ge=1, le=10_000_000)
    """Evaluate on the first N samples only (default: all)."""
    latency_runs: int = Field(default=100, ge=5, le=100_000)
    """Batch-1 inference runs timed per model (after warm-up) for p50/p95 latency."""


class SimplifyConfig(WireModel):
    """Graph clean-up with onnxslim: constant folding, dead-node removal, fusion."""


class PruneMethod(StrEnum):
    magnitude = "magnitude"
    structured = "structured"


class Criterion(StrEnum):
    l1 = "l1"
    l2 = "l2"
    activation = "activation"
    taylor = "taylor"
    fpgm = "fpgm"


class PruneScope(StrEnum):
    global_ = "global"
    layer = "layer"


class PruneConfig(WireModel):
    """Remove weights (magnitude) or whole channels and neurons (structured)."""

    method: PruneMethod = PruneMethod.structured
    """structured removes output channels of Conv and neurons of Gemm/MatMul layers and
    shrinks the layers that consume them (smaller and faster); magnitude zeroes single
    weights (smaller download once compressed, same latency)."""
    sparsity: float = Field(ge=0, lt=1)
    """Target share of weights (magnitude) or of prunable channels (structured) removed."""
    criterion: Criterion = Criterion.l1
    """Importance of a weight or channel: L1 or L2 norm of its weights, or (structured
    only) activation: Wanda-style |W| times the L2 norm of its input on calibration data,
    taylor: |weight x gradient| over calibration batches (needs the torch bridge), or
    fpgm: how far the channel's weights point from the others' in its group, so the most
    redundant go first (unaffected by BatchNorm folded into the weights)."""
    scope: PruneScope = PruneScope.layer
    """One threshold for all layers or groups, ranked across the model (global), or the
    same sparsity in every layer or group (layer)."""
    min_channels: int = Field(default=1, ge=1, le=1_000_000)
    """structured only: channels (or heads) every group keeps whatever the sparsity."""
    # None rather than 1 so that specs written before it existed keep their spec hash.
    round_to: int | None = Field(default=None, ge=1, le=4096)
    """structured only: round the channels each group keeps up to a multiple of this
    (never past the original width), e.g. 8 for SIMD- and GPU-friendly widths; unset
    keeps the exact share."""
    # None rather than true so that specs written before it existed keep their spec hash.
    compensate_bias: bool | None = None
    """structured only, default true: each layer that read a removed channel gets that
    channel's mean input (over the calibration samples) times its weights added to its
    bias, so a constant channel goes exactly and a ReLU channel's offset is not left for
    distillation to find; false cuts the channels bare."""
    calibration_dataset: Uri | None = None
    """criterion activation or taylor, and the bias compensation: defaults to the last
    distill dataset, else the evaluation dataset."""
    calibration_samples: int = Field(default=128, ge=1, le=1_000_000)
    """criterion activation or taylor, and the bias compensation: samples fed through
    the model."""
    exclude_nodes: list[str] = Field(default_factory=list, max_length=10_000)
    """Node names whose weights are never pruned."""

    @model_validator(mode="after")
    def _calibrated_criteria_are_structured(self) -> PruneConfig:
        if self.method is PruneMethod.magnitude and self.criterion in (
            Criterion.activation,
            Criterion.taylor,
            Criterion.fpgm,
        ):
            raise ValueError(
                f"criterion {self.criterion.value} ranks channels: it needs method structured"
            )
        return self


class LearningRateSchedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class DistillConfig(WireModel):
    """Fine-tune the current model to match the source model's soft outputs."""

    dataset: Uri
    """Training .npz, same format as the evaluation dataset; labels `y` optional."""
    dataset_sha256: Sha256 | None = None
    """Expected sha256 of the training dataset file."""
    epochs: int = Field(default=5, ge=1, le=1000)
    """Training epochs. Each draws as many samples as the dataset holds from the part
    not held out (`validationSplit`), so holding data out costs samples, not steps."""
    temperature: float = Field(default=4.0, gt=0, le=100)
    """Softmax temperature for the teacher's soft targets."""
    alpha: float = Field(default=0.7, ge=0, le=1)
    """Weight of the soft-target loss; 1 - alpha goes to cross-entropy on labels `y`
    (when the dataset has none, only soft targets are used)."""
    batch_size: int = Field(default=64, ge=1, le=65536)
    """Training samples per optimizer step."""
    learning_rate: float = Field(default=3e-3, gt=0, le=10)
    """Peak Adam learning rate (reached after a short warm-up). The default is
    measured (bench/pruning.py): a structurally pruned student recovers more at
    3e-3 than at 1e-3 within the same epochs, and the held-out check returns the
    input weights if it only hurts."""
    schedule: LearningRateSchedule = LearningRateSchedule.cosine
    """cosine decays the learning rate to zero over the planned epochs; constant keeps it."""
    validation_split: float = Field(default=0.2, ge=0, le=0.5)
    """Share of the dataset held out: the student is scored on it before training and
    after every epoch, the best epoch is kept, and the input weights are kept when no
    epoch beats them. 0 trains on everything and keeps the last epoch."""
    patience: int = Field(default=3, ge=1, le=1000)
    """Stop after this many epochs without a better held-out score."""
    batch_norm: bool = True
    """Train with a BatchNorm after every Conv with a spatial output (exporters fold
    BatchNorm into the Conv, so a pruned graph has none left): set to the source's
    statistics of the kept channels, on batch statistics, the Conv in front of it at 10x
    the learning rate; folded back into the Conv afterwards, so the written graph keeps
    its nodes and shapes. false trains the convs bare."""
    features: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=list, max_length=64
    )
    """Intermediate tensors (named alike, same shape in the source and the student) whose
    activations the student matches too, by mean squared error scaled by the teacher's
    variance: helps deep students. Empty: outputs only."""
    feature_weight: float = Field(default=1.0, ge=0, le=1000)
    """Weight of the feature loss beside the output loss."""
    seed: int = Field(default=0, ge=0)
    """Seed for shuffling and initialization, so a run can be repeated."""
    student: Source | None = None
    """Train this model instead of the current one (e.g. a smaller architecture)."""


class QuantizeMode(StrEnum):
    dynamic = "dynamic"
    static = "static"
    fp16 = "fp16"
    weight_only = "weightOnly"


class CalibrationMethod(StrEnum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class QuantizeConfig(WireModel):
    """Lower precision with onnxruntime.quantization: int8 dynamic, int8 static (QDQ), fp16,
    or weightOnly (int4/int8 MatMul weights, float activations)."""

    mode: QuantizeMode = QuantizeMode.static
    """dynamic: int8 weights, activations quantized at run time; static: int8 weights and
    activations (QDQ), ranges calibrated on data; fp16: half-precision floats;
    weightOnly: int4/int8 MatMul weights only."""
    calibration_samples: int = Field(default=256, ge=1, le=1_000_000)
    """static only: samples fed through the model to choose activation ranges."""
    calibration_method: CalibrationMethod = CalibrationMethod.minmax
    """static only: how activation ranges are chosen from the calibration samples
    (minmax: observed extremes; entropy: least KL divergence; percentile: clips outliers)."""
    calibration_dataset: Uri | None = None
    """static only: defaults to the last distill dataset, else the evaluation dataset."""
    per_channel: bool = True
    """One scale per output channel of a weight: usually more accurate for Conv."""
    op_types: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9]*$")]] = Field(
        default_factory=list, max_length=200
    )
    """Quantize only these operator types (e.g. [Conv, Gemm, MatMul]); empty = all supported."""
    exclude_nodes: list[str] = Field(default_factory=list, max_length=10_000)
    """Node names kept in float."""
    # weightOnly's settings default to None (not their values) so that specs written
    # before they existed keep their spec hash.
    bits: Literal[4, 8] | None = None
    """weightOnly only: integer width of MatMul weights (onnxruntime's MatMulNBits,
    default 4); activations stay float. Suits MatMul-heavy models (transformers)."""
    block_size: int | None = Field(default=None, ge=16, le=256)
    """weightOnly only: weights sharing one scale, a power of two (default 32)."""
    reduce_range: bool | None = None
    """dynamic and static only: int8 weights in 7 bits. onnxruntime's x86 kernels for
    uint8 activations times int8 weights saturate on CPUs without VNNI (AVX2, AVX-512
    without VNNI); 7-bit weights avoid that. Unset: on where the compressor itself runs
    on such a CPU, since the evaluation that gates the artifact runs there; set it to
    make the artifact independent of where it was made."""

    @model_validator(mode="after")
    def _mode_settings(self) -> QuantizeConfig:
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"blockSize {self.block_size}: must be a power of two")
        if self.mode is not QuantizeMode.weight_only and (self.bits or self.block_size):
            raise ValueError("bits and blockSize apply to mode weightOnly only")
        int8 = self.mode in (QuantizeMode.dynamic, QuantizeMode.static)
        if self.reduce_range is not None and not int8:
            raise ValueError("reduceRange applies to modes dynamic and static only")
        return self


STEP_TYPES = ("simplify", "prune", "distill", "quantize")


class PipelineStep(WireModel):
    """One step, written as a one-key mapping: `- prune: {sparsity: 0.5}`."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    simplify: SimplifyConfig | None = None
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    quantize: QuantizeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_known_key(cls, data: Any) -> Any:
        if isinstance(data, str) and data in STEP_TYPES:
            return {data: {}}  # `- simplify` is accepted as shorthand
        if not isinstance(data, dict):
            raise ValueError(
                f"a step is a one-key mapping such as {{prune: {{...}}}}, got {data!r}"
            )
        unknown = [k for k in data if k not in STEP_TYPES]
        if unknown:
            raise ValueError(f"unknown step {unknown[0]!r}; known steps: {', '.join(STEP_TYPES)}")
        if len(data) != 1:
            raise ValueError(f"a step has exactly one key, got {sorted(data)}")
        key = next(iter(data))
        if data[key] is None:  # `- simplify:` with nothing after it
            return {key: {}}
        return data

    @property
    def type(self) -> str:
        return next(k for k in STEP_TYPES if getattr(self, k) is not None)

    @property
    def config(self) -> WireModel:
        return getattr(self, self.type)


def check_step_order(pipeline: list[PipelineStep]) -> None:
    """Step order rules, shared with a CompressionPolicy's default pipeline."""
    types = [s.type for s in pipeline]
    if types.count("quantize") > 1:
        raise ValueError("pipeline: quantize may appear at most once")
    if "quantize" in types:
        after = types[types.index("quantize") + 1 :]
        if any(t in ("prune", "distill") for t in after):
            raise ValueError("pipeline: prune and distill cannot follow quantize")


class Output(WireModel):
    uri: Uri
    """Prefix under which <namespace>/<name>/<spec-hash>/<inputs-id>/model.onnx and
    manifest.json are written (namespace `default` for the CLI on a spec without one;
    inputs-id a digest of the bytes of the source and datasets, so new bytes at the same
    URIs never overwrite an artifact that may be serving)."""


class ResourceRequirements(WireModel):
    """Kubernetes resource requests and limits, e.g. {cpu: "2", memory: 4Gi}."""

    requests: dict[str, str | int] = Field(default_factory=dict)
    """Resources the scheduler reserves, e.g. {cpu: 500m, memory: 1Gi}."""
    limits: dict[str, str | int] = Field(default_factory=dict)
    """Most the container may use (memory above it is OOM-killed)."""


class Toleration(WireModel):
    """A Kubernetes toleration: lets serving pods run on nodes with a matching taint."""

    key: str | None = None
    """Taint key to tolerate; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Equal (the default) matches key and value; Exists matches the key alone."""
    value: str | None = None
    """Taint value to match (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates every effect."""
    toleration_seconds: int | None = None
    """NoExecute only: how long a pod stays bound after the taint appears (default: forever)."""


MAX_SPLIT_PARTS = 8


class SplitPartPlacement(WireModel):
    """Where one part of a split model runs (its own node class)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels this part's pods need, merged over deployment.nodeSelector."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints this part's pods tolerate, besides deployment.tolerations."""


class SplitSpec(WireModel):
    """Serve the artifact as a chain of parts (model parallelism): the compressor cuts it
    with `edgeslim split`, checks the chain against the whole model on the evaluation data
    and stores parts/part-i.onnx with parts/split.json; the operator runs one Deployment
    and Service per part (`<name>-part-<i>`), each forwarding to the next; clients call
    part 0's Service. Give parts, maxPartBytes or both."""

    parts: int | None = Field(default=None, ge=2, le=MAX_SPLIT_PARTS)
    """Number of parts (2 to 8), cut where parameter bytes balance."""
    max_part_bytes: int | None = Field(default=None, ge=1)
    """Parameter bytes a part may hold at most; alone, the fewest parts that fit."""
    placement: list[SplitPartPlacement] = Field(default_factory=list, max_length=MAX_SPLIT_PARTS)
    """Per part, in order (part 0 first): its nodeSelector and tolerations; parts past
    the list's end use deployment's own."""

    @model_validator(mode="after")
    def _some(self) -> SplitSpec:
        if self.parts is None and self.max_part_bytes is None:
            raise ValueError("split: give parts, maxPartBytes or both")
        if self.parts is not None and len(self.placement) > self.parts:
            raise ValueError(
                f"split.placement: {len(self.placement)} entries for {self.parts} parts"
            )
        return self


class DeploymentSpec(WireModel):
    """Serve the compressed model on edge nodes once it passes the gate."""

    replicas: int = Field(default=1, ge=0, le=10_000)
    """Serving pods to run."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels a serving pod's node must have, e.g. {node-role.kubernetes.io/edge: ""}."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints of the edge nodes that serving pods tolerate."""
    resources: ResourceRequirements | None = None
    """Resources of each serving pod."""
    progress_deadline_seconds: int = Field(default=300, ge=10, le=86_400)
    """Pods of a new artifact not ready by then are rolled back to the last good one."""
    threads: int = Field(default=1, ge=1, le=256)
    """onnxruntime intra-op threads per replica (small edge CPUs)."""
    canary: CanarySpec | None = None
    """Roll each new artifact out in steps judged on live traffic (errors, latency,
    agreement with the stable artifact) instead of all at once; unset: a rolling update
    gated by readiness only."""
    split: SplitSpec | None = None
    """Serve the model as a chain of parts on several devices (see SplitSpec); not with
    canary or spec.targets."""


MAX_TARGETS = 16
# Target `x`'s canary Deployment is `<name>-x-canary`, target `x-canary`'s serving one too.
CANARY_TARGET_CLASH = (
    "targets: with deployment.canary no target may be named <another target>-canary "
    "(its Deployment would be that target's canary Deployment)"
)


class Target(WireModel):
    """A node class the model is compressed and served for: its own compressor Job on
    those nodes (so the manifest's latency is that hardware's own), its own artifact and
    gate verdict, and with spec.deployment its own Deployment and Service
    `<name>-<target>` on that node pool."""

    name: str = Field(max_length=30, pattern=DNS_LABEL)
    """Name of the node class (a DNS label, unique among the targets), e.g. arm64 or gpu."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels of this class, e.g. {kubernetes.io/arch: arm64}; merged over
    spec.deployment.nodeSelector (this wins per key) for the Job and the serving pods."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints of this class's nodes that its Job and serving pods tolerate (added to
    spec.deployment.tolerations)."""
    quantize: QuantizeConfig | None = None
    """Replaces the config of the pipeline's quantize step for this class (appended as
    the last step when the pipeline has none), e.g. mode static for VNNI x86, fp16 for
    accelerators. Needs spec.pipeline."""
    pipeline: list[PipelineStep] | None = Field(default=None, min_length=1, max_length=32)
    """A whole pipeline for this class instead of spec.pipeline or spec.optimize."""

    @model_validator(mode="after")
    def _one_override(self) -> Target:
        if self.quantize is not None and self.pipeline is not None:
            raise ValueError(f"targets[{self.name}]: give at most one of quantize and pipeline")
        check_step_order(self.pipeline or [])
        return self


class Objective(StrEnum):
    download = "download"
    size = "size"
    latency = "latency"


class Optimize(WireModel):
    """Search for the best recipe within the gate instead of naming one."""

    objective: Objective = Objective.download
    """What "best" means among candidates that pass the gate: the smallest download
    (gzip), the smallest file, or the lowest batch-1 latency (formats slower than the
    source are then dropped)."""
    train_dataset: Uri | None = None
    """Training .npz (same format as the evaluation dataset): enables structured pruning
    with distillation candidates, and serves as calibration data."""
    train_dataset_sha256: Sha256 | None = None
    """Expected sha256 of the training dataset."""
    max_candidates: int = Field(default=32, ge=1, le=1000)
    """Most candidates evaluated (the sensitivity analysis is not counted)."""
    max_seconds: int = Field(default=900, ge=1, le=7 * 86_400)
    """Wall-clock budget of the search; the best result so far is kept when it runs out."""
    place_on_deployment_nodes: bool | None = None
    """In a cluster: run the search's Jobs on the nodes spec.deployment selects (its
    nodeSelector and tolerations), so latency is measured on the hardware that serves."""


class CompressedModelSpec(WireModel):
    source: Source
    evaluation: Evaluation
    pipeline: list[PipelineStep] | None = Field(default=None, min_length=1, max_length=32)
    """Ordered steps, applied one after the other."""
    optimize: Optimize | None = None
    """Find the pipeline automatically: the search tries quantization formats, mixed
    precision and (with trainDataset) pruning, and keeps the best that passes the gate.
    Exactly one of pipeline and optimize."""
    output: Output | None = None
    """Where artifacts go; required for a deployment (the CLI may pass --output instead)."""
    resources: ResourceRequirements | None = None
    """Resources of the compressor Job's pod."""
    active_deadline_seconds: int = Field(default=3600, ge=60, le=7 * 86_400)
    """The compressor Job is stopped and marked Failed after this long."""
    deployment: DeploymentSpec | None = None
    """Serve the artifact on edge nodes once it passes the gate (needs output)."""
    recompress_on_upgrade: bool = False
    """Re-compress (once) when the operator's compressor is another edgeslim version than
    the one that made the current artifact; the artifact serving keeps serving until the
    new one passes the gate. Off: an upgrade changes nothing that already runs."""
    history_limit: int = Field(default=5, ge=1, le=MAX_HISTORY)
    """Artifacts kept in status.history (source identity, toolchain versions, verdict)."""
    targets: list[Target] | None = Field(default=None, min_length=1, max_length=MAX_TARGETS)
    """Node classes to build for: each gets its own Job on its nodes, artifact, gate
    verdict, Deployment and an entry in status.targets (see Target)."""

    @model_validator(mode="after")
    def _pipeline_order(self) -> CompressedModelSpec:
        if (self.pipeline is None) == (self.optimize is None):
            raise ValueError("give exactly one of pipeline and optimize")
        check_step_order(self.pipeline or [])
        if self.deployment is not None and self.output is None:
            raise ValueError("output: a deployment needs an output location")
        if self.optimize and self.optimize.place_on_deployment_nodes and not self.deployment:
            raise ValueError("optimize.placeOnDeploymentNodes: needs spec.deployment")
        if self.deployment is not None and self.deployment.split is not None:
            # A canary shares one Service between two Deployments of one model and
            # targets name one Deployment per node class: neither has a chain of parts.
            if self.deployment.canary is not None:
                raise ValueError("deployment.split: not with deployment.canary")
            if self.targets:
                raise ValueError("deployment.split: not with spec.targets")
        return self

    @model_validator(mode="after")
    def _targets(self) -> CompressedModelSpec:
        names = [t.name for t in self.targets or []]
        if len(set(names)) != len(names):
            raise ValueError("targets: names must be unique")
        canary = self.deployment is not None and self.deployment.canary is not None
        if canary and any(f"{n}-canary" in names for n in names):
            raise ValueError(CANARY_TARGET_CLASH)
        for t in self.targets or []:
            if t.quantize is not None and self.pipeline is None:
                raise ValueError(f"targets[{t.name}].quantize: needs spec.pipeline")
            check_step_order(self._target_pipeline(t) or [])
        return self

    def _target_pipeline(self, target: Target) -> list[PipelineStep] | None:
        if target.pipeline is not None:
            return list(target.pipeline)
        if target.quantize is None or self.pipeline is None:
            return self.pipeline
        steps = [s for s in self.pipeline if s.quantize is None]
        at = next((i for i, s in enumerate(self.pipeline) if s.quantize is not None), len(steps))
        return [*steps[:at], PipelineStep(quantize=target.quantize), *steps[at:]]

    def for_target(self, name: str) -> CompressedModelSpec:
        """The spec one target's Job compresses: its pipeline (override applied), its
        placement merged into spec.deployment, and `targets` reduced to that one class
        with the merged placement and no overrides. Its spec_hash is the target's own
        (name and placement included: the same recipe measured on other hardware is
        another artifact), and for_target of the result is the result itself."""
        target = next((t for t in self.targets or [] if t.name == name), None)
        if target is None:
            raise KeyError(name)
        selector = {**(self.deployment.node_selector if self.deployment else {})}
        selector |= target.node_selector
        tolerations = list(self.deployment.tolerations) if self.deployment else []
        tolerations += [t for t in target.tolerations if t not in tolerations]
        pipeline = self._target_pipeline(target)
        update: dict[str, Any] = {
            "pipeline": pipeline,
            "optimize": None if target.pipeline is not None else self.optimize,
            "targets": [Target(name=name, node_selector=selector, tolerations=tolerations)],
        }
        if self.deployment is not None:
            update["deployment"] = self.deployment.model_copy(
                update={"node_selector": selector, "tolerations": tolerations}
            )
        return self.model_validate(self.model_copy(update=update).wire())

    def spec_hash(self) -> str:
        """Content hash of everything that changes the artifact (not the deployment)."""
        payload = self.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude=_NOT_HASHED
        )
        split = self.deployment.split if self.deployment else None
        if split is not None:
            # The compressor stores the parts beside the artifact: how it cuts is part of
            # the result (where each part runs is not). Absent: hashes stay as they were.
            payload["split"] = split.model_dump(
                mode="json", by_alias=True, exclude_none=True, exclude={"placement"}
            )
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Fields that do not change the artifact: how it is served, the Job's resources,
# and how the operator watches and records it.
_NOT_HASHED: Any = {
    "deployment": True,
    "resources": True,
    "recompress_on_upgrade": True,
    "history_limit": True,
    "source": {"check_interval_seconds": True},
}


class ObjectMeta(WireModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=63, pattern=DNS_LABEL)
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CompressedModel(WireModel):
    """The object a platform team applies: the same YAML works with kubectl and the CLI."""

    model_config = ConfigDict(extra="ignore")  # status and server fields are not input

    api_version: Literal["edgeslim.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["CompressedModel"]
    metadata: ObjectMeta
    spec: CompressedModelSpec
