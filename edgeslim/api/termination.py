"""The compressor's termination message: its result, compact enough for the pod status.

The compressor Job writes it to the container's termination-message file and
the operator reads it back from the pod status; the kubelet keeps at most
4096 bytes. It names the result (model, namespace, spec hash), carries the
gate's verdict and where the full manifest.json is, and as many of the
figures as fit. Both sides use this one model, so the contract cannot drift.
"""

from __future__ import annotations

import json
from typing import ClassVar

from edgeslim.api.base import OpenWireModel
from edgeslim.api.result import (
    CompressionResult,
    EvaluationFigures,
    GateVerdict,
    InputIdentity,
    LatencyFigures,
    ModelFigures,
    ParetoPoint,
    pareto_front,
)

TERMINATION_MESSAGE_LIMIT = 4096
"""Bytes the kubelet keeps of a container's termination message."""


class TerminationMessage(OpenWireModel):
    """What a finished compressor reports; everything but identity and gate may be left out.

    A message without some figures is still whole: the operator reads them
    from `manifestUri` and holds them to the same checks as the message.
    Unknown keys are ignored, so an older operator reads a newer compressor's.
    """

    name: str
    namespace: str | None = None
    """The object's namespace; absent from compressors that predate it."""
    spec_hash: str
    gate: GateVerdict
    manifest_uri: str | None = None
    artifact: ModelFigures | None = None
    compression_ratio: float | None = None
    download_ratio: float | None = None
    evaluation: EvaluationFigures | None = None
    latency: LatencyFigures | None = None
    candidates_tried: int | None = None
    """spec.optimize only: candidates the search measured."""
    pareto: list[ParetoPoint] | None = None
    """spec.optimize only: the top of the Pareto front (download size vs drop)."""
    source: InputIdentity | None = None
    """The source bytes the result was made from (the operator records it as lineage
    and compares storage with it later)."""
    versions: dict[str, str] | None = None
    """Toolchain versions that made the result (manifest.json `versions`)."""
    parts: list[str] | None = None
    """deployment.split only: sha256 of parts/part-<i>.onnx beside the artifact, in order
    (never left out: at most 8 x 64 characters, and the rollout pins each part)."""

    DROP_ORDER: ClassVar[tuple[str, ...]] = (
        "pareto",
        "latency",
        "evaluation",
        "download_ratio",
        "compression_ratio",
        "artifact",
    )
    """Figures left out, in this order, until the message fits; all are in the manifest."""
    LINEAGE: ClassVar[tuple[str, ...]] = ("versions", "source")
    """Left out only after every figure: a message without figures sends the operator to
    the manifest, which has these too."""

    @classmethod
    def from_result(
        cls,
        result: CompressionResult,
        manifest_uri: str,
        limit: int | None = TERMINATION_MESSAGE_LIMIT,
    ) -> TerminationMessage:
        """The message for `result`, fitted to `limit` bytes (None: everything, unfitted)."""
        full = cls(
            name=result.name,
            namespace=result.namespace,
            spec_hash=result.spec_hash,
            gate=result.gate,
            manifest_uri=manifest_uri,
            artifact=result.artifact,
            compression_ratio=round(result.compression_ratio, 4),
            download_ratio=round(result.download_ratio, 4),
            evaluation=result.evaluation,
            latency=result.latency,
            candidates_tried=len(result.candidates) if result.candidates else None,
            pareto=pareto_front(result.candidates) if result.candidates else None,
            source=next((i for i in result.inputs if i.field == "source"), None),
            versions=dict(result.versions) or None,
            parts=[p.sha256 for p in result.split.parts] if result.split else None,
        )
        return full if limit is None else full.fitted(limit)

    def fitted(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> TerminationMessage:
        """This message within `limit` bytes: figures dropped in DROP_ORDER, then the
        gate's reason shortened. Identity, verdict and manifest URI are never dropped;
        the spec's limits (names of 63, URIs of 1024 characters) keep them far below
        4096 bytes, and a message that still does not fit is refused, never cut."""
        msg = self
        for field in (*self.DROP_ORDER, *self.LINEAGE):
            if msg.size() <= limit:
                return msg
            msg = msg.model_copy(update={field: None})
        over = msg.size() - limit
        if over > 0:
            reason = msg.gate.reason.encode()
            # Cut bytes, then drop a partial UTF-8 character at the end.
            short = reason[: max(len(reason) - over - 3, 0)].decode(errors="ignore") + "..."
            msg = msg.model_copy(update={"gate": msg.gate.model_copy(update={"reason": short})})
        if msg.size() > limit:
            raise ValueError(
                f"termination message for {self.name} needs {msg.size()} bytes "
                f"even without its figures; the limit is {limit}"
            )
        return msg

    @property
    def complete(self) -> bool:
        """Whether it carries every figure (else the manifest has the rest); a search's
        Pareto front counts only for a search's result (one with candidatesTried)."""
        return all(
            getattr(self, field) is not None
            for field in self.DROP_ORDER
            if field != "pareto" or self.candidates_tried is not None
        )

    def text(self) -> str:
        """Compact JSON, as written to the termination-message file."""
        return json.dumps(self.wire(), separators=(",", ":"), ensure_ascii=False)

    def size(self) -> int:
        return len(self.text().encode())

    @classmethod
    def parse(cls, text: str) -> TerminationMessage:
        """Raises ValueError (pydantic's ValidationError) unless `text` is such a message."""
        return cls.model_validate_json(text)
