"""Lineage in a CompressedModel's status: which source bytes and toolchain made the
artifact, the re-compression under way when either changed, and the last artifacts.

Written only by the operator (edgeslim/operator/source_watch.py); read by people
auditing what runs on the fleet and by the operator to notice that a source
model was replaced at the same URI.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgeslim.api.base import OpenWireModel

MAX_HISTORY = 50


class SourceIdentity(OpenWireModel):
    """The source model's content as storage names it: what a check compares."""

    uri: str
    """spec.source.uri when the identity was taken."""
    sha256: str | None = None
    """sha256 of the bytes the compressor used (absent when only storage metadata is known)."""
    size_bytes: int | None = None
    """Size of the source file in bytes."""
    etag: str | None = None
    """The S3 ETag of those bytes (s3:// sources)."""
    version_id: str | None = None
    """The S3 object version (versioned buckets)."""
    modified_ns: int | None = None
    """Modification time in ns since the epoch (file:// sources the operator can see):
    while size and this stay the same the file is not read again."""
    checked_at: str | None = None
    """When the operator last compared this with storage (RFC 3339)."""


class Recompression(OpenWireModel):
    """A compression the operator started without a spec change."""

    reason: Literal["SourceChanged", "ToolchainUpgraded"]
    """SourceChanged: the source object was replaced at its URI; ToolchainUpgraded: the
    compressor is another version than the one that made the artifact (recompressOnUpgrade)."""
    revision: str
    """Short digest of what changed; part of the compressor Job's name, so a restarted
    operator finds the Job it started instead of starting another."""
    spec_hash: str
    """The spec hash the re-compression is for; a spec change supersedes it."""
    source: SourceIdentity | None = None
    """The source's identity in storage when the change was seen."""
    toolchain: str | None = None
    """The compressor version that runs it (ToolchainUpgraded)."""
    since: str
    """When it was started (RFC 3339)."""


class HistoryEntry(OpenWireModel):
    """One artifact the object produced: what made it and what the gate said."""

    time: str
    """When the result was recorded (RFC 3339)."""
    job_name: str
    """The compressor Job that produced it."""
    spec_hash: str
    """The spec hash it was produced for."""
    verdict: Literal["Passed", "Rejected"]
    """The gate's verdict: only Passed artifacts are ever served."""
    reason: str = ""
    """The gate's reason in words (the metric drop against maxMetricDrop)."""
    trigger: str = "SpecChanged"
    """Why it was compressed: SpecChanged (created or a spec edit), SourceChanged or
    ToolchainUpgraded."""
    artifact_uri: str | None = None
    """Where the artifact lies."""
    artifact_sha256: str | None = None
    """sha256 of the artifact."""
    source: SourceIdentity | None = None
    """The source bytes it was made from (absent from compressors that did not report it)."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Toolchain versions that made it (manifest.json `versions`: edgeslim, torch, onnx,
    onnxruntime)."""
