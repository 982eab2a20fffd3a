"""Kubernetes Events on a CompressedModel: one per phase transition, built here."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from edgeslim.api.status import Phase
from edgeslim.redact import redact

Obj = dict[str, Any]
COMPONENT = "edgeslim-operator"

_WARNING = frozenset({Phase.rejected, Phase.failed})


def for_transition(
    old: Phase | None, new: Phase, reason: str, message: str
) -> tuple[str, str, str] | None:
    """(type, reason, message) for a phase change; None when the phase did not change."""
    if old == new:
        return None
    kind = "Warning" if new in _WARNING else "Normal"
    text = f"{old.value if old else 'New'} -> {new.value}: {message}" if message else new.value
    return kind, reason, text[:1024]


def build(
    model: Obj, kind: str, reason: str, message: str, at: datetime.datetime | None = None
) -> Obj:
    """A core/v1 Event about `model` (as the API returned it)."""
    at = at or datetime.datetime.now(datetime.UTC)
    meta = model["metadata"]
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    micro = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            # Unique like the kubelet's `<name>.<hex>` so two events never collide.
            "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
            "namespace": meta["namespace"],
        },
        "involvedObject": {
            "apiVersion": model.get("apiVersion"),
            "kind": model.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": kind,
        "reason": reason,
        # Messages quote storage errors and log tails; never their credentials.
        "message": redact(message),
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": micro,
        "action": "Reconcile",
        "count": 1,
    }
