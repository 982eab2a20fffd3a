"""What a finished compressor Job produced, and whether to believe it.

The compressor writes a compact result (< 4 KiB) to its termination message;
the operator reads it from the pod status. "The operator never trusts a result
it cannot tie to its Job": the message must name the Job's model and spec
hash, and its URIs must lie under the location the spec asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from edgeslim import storage
from edgeslim.api.base import OpenWireModel
from edgeslim.api.result import EvaluationFigures, GateVerdict, LatencyFigures, ModelFigures
from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import ArtifactStatus, Phase, Results
from edgeslim.operator.jobs import (
    EXIT_BAD_INPUT,
    EXIT_REJECTED,
    JobRef,
    JobState,
    Termination,
)

LOG_TAIL_BYTES = 2048


class UntrustedResult(Exception):
    """A termination message that cannot be tied to its Job."""


class TerminationResult(OpenWireModel):
    """The compressor's termination message (CompressionResult.summary() + manifestUri).

    Everything but identity and gate is optional: when the summary would not
    fit in 4 KiB the compressor writes only these, and the manifest has the rest.
    """

    name: str
    spec_hash: str
    gate: GateVerdict
    manifest_uri: str | None = None
    artifact: ModelFigures | None = None
    compression_ratio: float | None = None
    download_ratio: float | None = None
    evaluation: EvaluationFigures | None = None
    latency: LatencyFigures | None = None

    @property
    def complete(self) -> bool:
        return None not in (
            self.artifact,
            self.compression_ratio,
            self.download_ratio,
            self.evaluation,
        )


def parse_message(text: str) -> TerminationResult:
    try:
        return TerminationResult.model_validate_json(text)
    except (ValidationError, ValueError) as exc:
        raise UntrustedResult(f"termination message is not a compression result: {exc}") from exc


def _under(uri: str | None, prefix: str) -> bool:
    return uri is not None and uri.startswith(prefix.rstrip("/") + "/")


def verify(result: TerminationResult, job: JobRef, model: CompressedModel) -> None:
    """Raises UntrustedResult unless the result belongs to this Job of this model."""
    if result.name != job.model or result.name != model.metadata.name:
        raise UntrustedResult(
            f"result names model {result.name!r}, Job {job.name} belongs to {job.model!r}"
        )
    if result.spec_hash != job.spec_hash:
        raise UntrustedResult(
            f"result is for spec hash {result.spec_hash}, Job {job.name} ran {job.spec_hash}"
        )
    if model.metadata.uid and job.owner_uid != model.metadata.uid:
        raise UntrustedResult(f"Job {job.name} is not owned by this object (uid)")
    if model.spec.output is not None:
        prefix = storage.join(model.spec.output.uri, model.metadata.name, job.spec_hash)
        for uri in (result.manifest_uri, result.artifact.uri if result.artifact else None):
            if uri is not None and not _under(uri, prefix):
                raise UntrustedResult(f"result URI {uri} is outside {prefix}/")


def merge_manifest(result: TerminationResult, manifest: dict) -> TerminationResult:
    """Fills a short termination message from manifest.json (same keys, camelCase)."""
    merged = {**manifest, **result.wire()}
    for key in ("artifact", "compressionRatio", "downloadRatio", "evaluation", "latency"):
        if key in manifest:
            merged[key] = manifest[key]
    parsed = TerminationResult.model_validate(merged)
    if (parsed.name, parsed.spec_hash) != (result.name, result.spec_hash):
        raise UntrustedResult("manifest.json names another model or spec hash")
    return parsed


# ----------------------------------------------------------------- the outcome


@dataclass(frozen=True)
class Outcome:
    """The status a finished Job leads to."""

    phase: Phase
    reason: str
    message: str
    result: TerminationResult | None = None

    @property
    def metric_result(self) -> str:
        """The `result` label of edgeslim_compressions_finished_total."""
        return {Phase.ready: "passed", Phase.rejected: "rejected"}.get(self.phase, "failed")


def error_line(text: str) -> str:
    """The CLI's one-line error (`edgeslim: error: ...`) from a log tail, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("edgeslim: error:"):
            return line.removeprefix("edgeslim: error:").strip()
    return lines[-1] if lines else ""


def log_tail(text: str) -> str:
    return text[-LOG_TAIL_BYTES:]


def artifact_status(result: TerminationResult) -> ArtifactStatus | None:
    if result.artifact is None:
        return None
    return ArtifactStatus(
        uri=result.artifact.uri,
        sha256=result.artifact.sha256,
        size_bytes=result.artifact.size_bytes,
        manifest_uri=result.manifest_uri,
    )


def results_status(result: TerminationResult) -> Results | None:
    if not result.complete:
        return None
    return Results(
        compression_ratio=result.compression_ratio,
        download_ratio=result.download_ratio,
        evaluation=result.evaluation,
        latency=result.latency,
        gate=result.gate,
    )


def _trusted(term: Termination, job: JobRef, model: CompressedModel) -> TerminationResult:
    result = parse_message(term.message)
    verify(result, job, model)
    return result


def outcome(
    state: JobState,
    failure_reason: str,
    terms: list[Termination],
    job: JobRef,
    model: CompressedModel,
) -> Outcome:
    """Decides phase, reason and message from a finished Job and its pods.

    The result (phase Ready/Rejected) comes only from a termination message
    that passes :func:`verify`; anything else is Failed with the reason why.
    """
    last = terms[-1] if terms else None
    if state is JobState.succeeded:
        done = next((t for t in reversed(terms) if t.exit_code == 0), None)
        if done is None:
            return Outcome(
                Phase.failed, "NoResult", f"Job {job.name} succeeded but no pod reported a result"
            )
        try:
            result = _trusted(done, job, model)
        except UntrustedResult as exc:
            return Outcome(Phase.failed, "UntrustedResult", str(exc))
        if not result.gate.passed:
            return Outcome(Phase.failed, "UntrustedResult", "exit code 0 but the gate did not pass")
        return Outcome(Phase.ready, "GatePassed", result.gate.reason, result)

    rejected = next((t for t in reversed(terms) if t.exit_code == EXIT_REJECTED), None)
    if rejected is not None:
        try:
            result = _trusted(rejected, job, model)
        except UntrustedResult as exc:
            return Outcome(Phase.failed, "UntrustedResult", str(exc))
        return Outcome(Phase.rejected, "GateRejected", result.gate.reason, result)
    bad = next((t for t in reversed(terms) if t.exit_code == EXIT_BAD_INPUT), None)
    if bad is not None:
        return Outcome(Phase.failed, "InvalidSpec", error_line(bad.message) or "bad input")
    if failure_reason == "DeadlineExceeded":
        return Outcome(
            Phase.failed,
            "DeadlineExceeded",
            "compression ran longer than activeDeadlineSeconds="
            f"{model.spec.active_deadline_seconds}",
        )
    tail = log_tail(last.message) if last else ""
    summary = f"Job {job.name} failed ({failure_reason})"
    if last is not None:
        summary += f", last exit code {last.exit_code}"
    return Outcome(Phase.failed, "CompressionFailed", f"{summary}: {tail}" if tail else summary)
