"""spec.deployment.canary and status.canary: a new artifact is judged on live
traffic by what only a model server knows (its errors, its latency and whether
its answers agree with the artifact serving now) before it replaces it.

How the operator runs a canary is in `edgeslim.operator.canary`.
"""

from __future__ import annotations

from enum import StrEnum
from itertools import pairwise

from pydantic import Field, field_validator

from edgeslim.api.base import OpenWireModel, WireModel

MAX_ANALYSES = 20


class CanarySpec(WireModel):
    """Roll a new artifact out in steps, judged on live traffic: at each step a share of
    the replicas serves the new artifact, its pods answer a sample of their requests a
    second time on the stable artifact (in shadow: the client gets the canary's answer,
    never waits for the shadow) and count how often the two agree. After each interval
    the operator advances to the next step, holds, or rolls back."""

    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1, max_length=10)
    """Percent of the replicas that serve the new artifact at each step, increasing, the
    last one 100 (reaching it promotes the new artifact), e.g. [10, 50, 100]. A step
    runs at least one canary replica."""
    interval_seconds: int = Field(default=60, ge=1, le=86_400)
    """Time each step runs before it is analysed; an analysis without enough samples
    waits for the next interval (hold)."""
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    """Largest share of the canary's inference requests that may end in a server error
    (HTTP 5xx); above it the canary is rolled back."""
    max_p95_ms: float | None = Field(default=None, gt=0)
    """Largest p95 inference request latency of the canary in milliseconds (absolute,
    measured by the canary pods' own request-duration histogram); unset: not judged."""
    min_agreement: float = Field(default=0.95, ge=0.0, le=1.0)
    """Smallest agreement between canary and stable answers to the same requests: the
    share of identical top-1 classes for outputs with a class axis, the mean cosine
    similarity of the outputs otherwise. Below it the canary is rolled back."""
    min_samples: int = Field(default=50, ge=1, le=1_000_000)
    """Shadow comparisons (and requests) the canary must have answered before a step
    is judged; fewer: hold."""
    shadow_sample_rate: float = Field(default=0.1, gt=0.0, le=1.0)
    """Share of the canary pods' requests also sent to a stable pod for comparison."""

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("steps: each step is a percent in 1..100")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError("steps: must increase")
        if steps[-1] != 100:
            raise ValueError("steps: the last step must be 100 (it promotes the new artifact)")
        return steps


class Verdict(StrEnum):
    advance = "Advance"
    hold = "Hold"
    rollback = "RollBack"
    promote = "Promote"


class CanaryAnalysis(OpenWireModel):
    """One analysis of the canary: what was measured and what was decided."""

    time: str
    """When (RFC 3339)."""
    step: int
    """Index into spec.deployment.canary.steps of the step analysed."""
    weight: int
    """Percent of the replicas serving the canary at that step."""
    requests: int = 0
    """Inference requests the canary pods answered so far."""
    error_rate: float | None = None
    """Share of those requests that ended in a server error (5xx)."""
    p95_ms: float | None = None
    """p95 request latency of the canary pods in milliseconds."""
    samples: int = 0
    """Shadow comparisons with the stable artifact so far."""
    agreement: float | None = None
    """Agreement of canary and stable answers (top-1 share, or mean cosine)."""
    verdict: Verdict
    """Advance, Hold, RollBack or Promote."""
    reason: str
    """Why, for people."""


class CanaryResult(StrEnum):
    running = "Running"
    promoted = "Promoted"
    rolled_back = "RolledBack"


class CanaryStatus(OpenWireModel):
    """The canary of the current artifact: its step, share and analyses."""

    artifact: str
    """sha256 of the new artifact under analysis."""
    stable: str
    """sha256 of the artifact it is compared with (serving throughout)."""
    step: int = 0
    """Index into spec.deployment.canary.steps of the current step."""
    weight: int = 0
    """Percent of the replicas serving the new artifact now."""
    shown: str | None = None
    """The CANARY column of kubectl get: the share while the canary runs (e.g. 50%),
    unset once it ended."""
    step_started: str
    """When the current step started (RFC 3339); its interval counts from here."""
    result: CanaryResult = CanaryResult.running
    """Running, Promoted (the new artifact replaces the stable one) or RolledBack."""
    reason: str | None = None
    """Why it ended, for people."""
    analyses: list[CanaryAnalysis] = Field(default_factory=list, max_length=MAX_ANALYSES)
    """The latest analyses, newest last."""
