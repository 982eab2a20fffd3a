"""The CompressionPolicy resource: defaults for many CompressedModels at once.

A policy selects CompressedModels by label (a metav1.LabelSelector) and supplies
defaults they inherit: the evaluation gate, the pipeline or the optimize search,
deployment placement and resources. A model's own fields win per key
(edgeslim/api/merge.py holds the rule). Editing a policy re-compresses the
models it selects, at most `maxConcurrent` of them at a time.

Namespaced, not cluster-scoped: a policy selects models in its own namespace
only. Every object edgeslim handles stays confined to its namespace (its Jobs,
Secrets, artifacts under `<output>/<namespace>/`), and the chart's RBAC can
then be scoped to one namespace (watchNamespace) with nothing cluster-wide. A
cluster-scoped policy would let whoever writes it rewrite the gate and the
pipeline of every team's models, a right that namespace-level RBAC could not
take away; a platform team that wants one policy everywhere applies the same
policy to each namespace (GitOps does this for free).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from edgeslim.api.base import OpenWireModel, WireModel
from edgeslim.api.merge import merge_spec
from edgeslim.api.partial import partial
from edgeslim.api.spec import (
    DNS_LABEL,
    CompressedModelSpec,
    DeploymentSpec,
    Evaluation,
    ObjectMeta,
    Optimize,
    Output,
    PipelineStep,
    ResourceRequirements,
    Uri,
    check_step_order,
)
from edgeslim.api.status import Condition

POLICY_KIND = "CompressionPolicy"
POLICY_PLURAL = "compressionpolicies"

# The model's spec as written (its CRD schema) leaves the fields a policy can supply
# (ModelDefaults) optional and undefaulted; the merged spec is validated by
# CompressedModelSpec in full. pipeline and optimize are optional already and
# replaced whole, so they stay full.
CompressedModelSpecInput = partial(
    CompressedModelSpec, {"evaluation", "deployment", "resources"}, name="CompressedModelSpecInput"
)

LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=63)]


class SelectorOperator(StrEnum):
    in_ = "In"
    not_in = "NotIn"
    exists = "Exists"
    does_not_exist = "DoesNotExist"


class LabelSelectorRequirement(WireModel):
    """One label requirement (metav1.LabelSelectorRequirement)."""

    key: LabelKey
    """The label key the requirement applies to."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[LabelValue] = Field(default_factory=list, max_length=1000)
    """In and NotIn: the values (at least one); Exists and DoesNotExist: empty."""

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> LabelSelectorRequirement:
        needs_values = self.operator in (SelectorOperator.in_, SelectorOperator.not_in)
        if needs_values and not self.values:
            raise ValueError(f"operator {self.operator.value} needs at least one value")
        if not needs_values and self.values:
            raise ValueError(f"operator {self.operator.value} takes no values")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator is SelectorOperator.exists:
            return self.key in labels
        if self.operator is SelectorOperator.does_not_exist:
            return self.key not in labels
        if self.operator is SelectorOperator.in_:
            return self.key in labels and labels[self.key] in self.values
        # NotIn, as Kubernetes reads it: a missing label is not in any set.
        return self.key not in labels or labels[self.key] not in self.values


class LabelSelector(WireModel):
    """Which CompressedModels (in the policy's namespace) the policy selects, as a
    metav1.LabelSelector: all of matchLabels and all of matchExpressions must hold.
    An empty selector selects every CompressedModel in the namespace."""

    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    """Labels a model must carry with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=100)
    """Further requirements on a model's labels."""

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )


# Partial: a policy may set only the gate, or only the nodeSelector.
EvaluationDefaults = partial(Evaluation)
DeploymentDefaults = partial(DeploymentSpec)
ResourceDefaults = partial(ResourceRequirements)


class ModelDefaults(WireModel):
    """Spec fields the selected CompressedModels inherit. A model's own value wins
    per key: mappings merge key by key, lists are replaced whole, and pipeline and
    optimize are one choice (a model that sets either ignores the policy's)."""

    evaluation: EvaluationDefaults | None = None  # type: ignore[valid-type]
    """Evaluation defaults, typically the gate (metric, maxMetricDrop); each model
    usually brings its own dataset."""
    pipeline: list[PipelineStep] | None = Field(default=None, min_length=1, max_length=32)
    """Default pipeline (steps in order), for models that set neither pipeline nor
    optimize."""
    optimize: Optimize | None = None
    """Default search, for models that set neither pipeline nor optimize. At most one
    of pipeline and optimize."""
    deployment: DeploymentDefaults | None = None  # type: ignore[valid-type]
    """Serving defaults (placement: nodeSelector, tolerations; replicas, resources)."""
    resources: ResourceDefaults | None = None  # type: ignore[valid-type]
    """Resources of the compressor Job's pod."""

    @model_validator(mode="after")
    def _one_recipe(self) -> ModelDefaults:
        if self.pipeline is not None and self.optimize is not None:
            raise ValueError("give at most one of pipeline and optimize")
        check_step_order(self.pipeline or [])
        return self


class Discovery(WireModel):
    """Create a CompressedModel for every model file under an object-store prefix, so
    adding a file to the bucket is all a team does. Each `<name>.onnx` with its
    evaluation dataset beside it (`<name>.val.npz`) becomes a model named after
    the file, labelled with the selector's matchLabels (so this policy selects it)
    and owned by the policy (deleting the policy deletes the models it created).
    Files are never un-created: removing one from the bucket leaves its model."""

    uri: Uri
    """The prefix to scan, e.g. s3://models/team-a/ (sub-folders included)."""
    credentials_secret: str | None = Field(default=None, pattern=DNS_LABEL, max_length=253)
    """Secret (the policy's namespace) with the storage credentials, used for the scan
    and as each created model's source.credentialsSecret."""
    output: Output
    """Where the created models put their artifacts."""
    dataset_suffix: str = Field(
        default=".val.npz", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$"
    )
    """The evaluation dataset of `<name>.onnx` is `<name>` plus this, beside it; a
    model file without one is skipped."""
    interval_seconds: int = Field(default=300, ge=10, le=86_400)
    """How often the prefix is scanned (and at once when the policy changes)."""
    max_models: int = Field(default=1000, ge=1, le=10_000)
    """Most models the policy creates; the scan stops with a message beyond it."""


class CompressionPolicySpec(WireModel):
    selector: LabelSelector
    """CompressedModels in this namespace the policy applies to. A model selected by
    two policies fails (InvalidSpec) until only one selects it."""
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    """What the selected models inherit unless they set it themselves."""
    max_concurrent: int = Field(default=2, ge=1, le=10_000)
    """Most selected models compressing at once (within the operator's own Job
    limit): a policy edit re-compresses its models in a rolling wave of this size,
    never all at once."""
    discover: Discovery | None = None
    """Optionally, create the models from an object-store prefix (see Discovery);
    needs selector.matchLabels, which the created models carry."""

    @model_validator(mode="after")
    def _discovered_models_are_selected(self) -> CompressionPolicySpec:
        if self.discover is not None and not self.selector.match_labels:
            raise ValueError("discover: needs selector.matchLabels (the created models carry them)")
        return self


class CompressionPolicyStatus(OpenWireModel):
    """Written by the operator only; counts the selected models by phase."""

    observed_generation: int | None = None
    """metadata.generation of the policy the counts describe."""
    models: int = 0
    """CompressedModels the selector selects."""
    ready: int = 0
    """Selected models Ready with this generation of the policy merged in."""
    rejected: int = 0
    """Selected models whose result the gate rejected."""
    failed: int = 0
    """Selected models that failed (including selection by two policies)."""
    pending: int = 0
    """Selected models still on their way: Pending, Queued, Compressing, Deploying,
    or settled for an older generation of the policy."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready (every selected model Ready), Reconciling (models still on their way)
    and Stalled (every model settled, some Rejected or Failed), for kstatus."""


class CompressionPolicy(WireModel):
    """A CompressionPolicy object as applied."""

    model_config = ConfigDict(extra="ignore")  # status and server fields are not input

    api_version: Literal["edgeslim.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["CompressionPolicy"]
    metadata: ObjectMeta
    spec: CompressionPolicySpec


def apply_policy(model: dict[str, Any], policy: CompressionPolicy) -> dict[str, Any]:
    """A CompressedModel object (wire form, as written) with its spec merged over
    the policy's defaults: what the operator compresses, and `edgeslim compress
    --policy` too."""
    return {**model, "spec": merge_spec(policy.spec.defaults.wire(), model.get("spec") or {})}
