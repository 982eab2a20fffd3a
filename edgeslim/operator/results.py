"""What a finished compressor Job produced, and whether to believe it.

The compressor writes a compact result (edgeslim.api.termination, < 4 KiB) to
its termination message; the operator reads it from the pod status. "The
operator never trusts a result it cannot tie to its Job": the message, and
the manifest.json that fills in a short one, must name the Job's model,
namespace and spec hash, and their URIs must lie under the object's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeslim import storage
from edgeslim.api.result import CompressionResult
from edgeslim.api.spec import CompressedModel
from edgeslim.api.split import part_uri
from edgeslim.api.status import ArtifactStatus, PartArtifact, Phase, Results
from edgeslim.api.termination import TerminationMessage
from edgeslim.errors import BadInput
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


def parse_message(text: str) -> TerminationMessage:
    try:
        return TerminationMessage.parse(text)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise UntrustedResult(f"termination message is not a compression result: {exc}") from exc


def verify(result: TerminationMessage, job: JobRef, model: CompressedModel) -> None:
    """Raises UntrustedResult unless the result belongs to this Job of this model.

    The one check for a termination message and for what a manifest adds to it.
    """
    if result.name != job.model or result.name != model.metadata.name:
        raise UntrustedResult(
            f"result names model {result.name!r}, Job {job.name} belongs to {job.model!r}"
        )
    namespace = model.metadata.namespace or job.namespace
    if result.namespace is not None and result.namespace != namespace:
        raise UntrustedResult(
            f"result is for namespace {result.namespace!r}, Job {job.name} runs in {namespace!r}"
        )
    if result.spec_hash != job.spec_hash:
        raise UntrustedResult(
            f"result is for spec hash {result.spec_hash}, Job {job.name} ran {job.spec_hash}"
        )
    if model.metadata.uid and job.owner_uid != model.metadata.uid:
        raise UntrustedResult(f"Job {job.name} is not owned by this object (uid)")
    if model.spec.output is not None:
        try:
            prefix = storage.result_prefix(
                model.spec.output.uri, model.metadata.namespace, model.metadata.name, job.spec_hash
            )
        except BadInput as exc:  # e.g. a Job label that is no spec hash
            raise UntrustedResult(str(exc)) from exc
        for uri in (result.manifest_uri, result.artifact.uri if result.artifact else None):
            # Parsed, not a string prefix: no '..', no other bucket, no %-escapes.
            if uri is not None and not storage.within(uri, prefix):
                raise UntrustedResult(f"result URI {uri} is outside {prefix}")


def merge_manifest(
    result: TerminationMessage, manifest: bytes, job: JobRef, model: CompressedModel
) -> TerminationMessage:
    """The full result from manifest.json, for a termination message that left figures out.

    The manifest is held to the same checks as the message (:func:`verify`)
    and must agree with the verdict the message reported.
    """
    try:
        stored = CompressionResult.model_validate_json(manifest)
    except ValueError as exc:
        raise UntrustedResult(f"manifest.json is not a compression result: {exc}") from exc
    full = TerminationMessage.from_result(stored, result.manifest_uri or "", limit=None)
    try:
        verify(full, job, model)
    except UntrustedResult as exc:
        raise UntrustedResult(f"manifest.json: {exc}") from exc
    if result.namespace is not None and full.namespace is None:
        raise UntrustedResult("manifest.json does not name the namespace the result is for")
    # The message's reason may have been shortened to fit; the verdict may not differ.
    verdict = (full.gate.passed, full.gate.max_metric_drop)
    if verdict != (result.gate.passed, result.gate.max_metric_drop):
        raise UntrustedResult("manifest.json reports another gate verdict than the Job")
    return full


# ----------------------------------------------------------------- the outcome


@dataclass(frozen=True)
class Outcome:
    """The status a finished Job leads to."""

    phase: Phase
    reason: str
    message: str
    result: TerminationMessage | None = None

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


def artifact_status(result: TerminationMessage) -> ArtifactStatus | None:
    if result.artifact is None:
        return None
    return ArtifactStatus(
        uri=result.artifact.uri,
        sha256=result.artifact.sha256,
        size_bytes=result.artifact.size_bytes,
        manifest_uri=result.manifest_uri,
        parts=[
            PartArtifact(uri=part_uri(result.artifact.uri, i), sha256=sha)
            for i, sha in enumerate(result.parts)
        ]
        if result.parts
        else None,
    )


def results_status(result: TerminationMessage) -> Results | None:
    """status.results, when the result carries its figures (latency may be missing)."""
    if None in (result.compression_ratio, result.download_ratio, result.evaluation):
        return None
    return Results(
        compression_ratio=result.compression_ratio,
        download_ratio=result.download_ratio,
        evaluation=result.evaluation,
        latency=result.latency,
        gate=result.gate,
        candidates_tried=result.candidates_tried,
        pareto=result.pareto,
    )


def _trusted(term: Termination, job: JobRef, model: CompressedModel) -> TerminationMessage:
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
