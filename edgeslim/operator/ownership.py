"""Whose is an object the operator is about to create or change: a pure decision.

The operator writes Jobs, Deployments and Services under names derived from a
CompressedModel's name. Someone else may already have an object of that name
(a hand-made Service `digits` in the namespace where a model `digits` appears):
forcing our manifest onto it would take it over, and the garbage collector
would delete it with the model. So before any create or apply the operator
asks `claim()`, and touches an existing object only when its controller
ownerReference is this very CompressedModel (by uid).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgeslim.operator.kube import Conflict
from edgeslim.operator.names import API_GROUP, KIND

Obj = dict[str, Any]

REASON = "NameConflict"


class Verdict(StrEnum):
    absent = "Absent"  # nothing of that name: create it
    owned = "Owned"  # controlled by this object (same uid): apply to it
    stale = "Stale"  # controlled by a deleted object of the same name, or being deleted: wait
    foreign = "Foreign"  # anyone else's: never touched


@dataclass(frozen=True)
class Claim:
    verdict: Verdict
    kind: str
    name: str
    holder: str = ""  # who controls it, in words, for the conflict message


def _controller(meta: Obj) -> Obj | None:
    return next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)


def claim(existing: Obj | None, kind: str, name: str, model_name: str, model_uid: str) -> Claim:
    """What the object `existing` (as read, or None) is to the CompressedModel
    `model_name` with uid `model_uid`."""
    if existing is None:
        return Claim(Verdict.absent, kind, name)
    meta = existing.get("metadata") or {}
    owner = _controller(meta)
    if owner is not None and owner.get("uid") == model_uid:
        return Claim(Verdict.owned, kind, name)
    ours_by_name = (
        owner is not None
        and owner.get("kind") == KIND
        and str(owner.get("apiVersion", "")).split("/")[0] == API_GROUP
        and owner.get("name") == model_name
    )
    if ours_by_name or meta.get("deletionTimestamp"):
        # An object of this name was deleted and re-created: its children go
        # with the garbage collector in a moment. Or the object is on its way out.
        return Claim(Verdict.stale, kind, name, _holder(owner))
    return Claim(Verdict.foreign, kind, name, _holder(owner))


def _holder(owner: Obj | None) -> str:
    if owner is None:
        return "no controller"
    return f"{owner.get('kind', '?')} {owner.get('name', '?')} (uid {owner.get('uid', '?')})"


class NameConflict(Exception):
    """An object the operator would create exists and is not this model's: Failed, no retry."""

    def __init__(self, found: Claim, namespace: str) -> None:
        self.claim = found
        super().__init__(conflict_message(found, namespace))


class StillOwnedByPredecessor(Conflict):
    """The object belongs to a deleted object of the same name: retried (a
    transient Conflict) until the garbage collector has removed it."""


def conflict_message(found: Claim, namespace: str) -> str:
    return (
        f"{found.kind} {namespace}/{found.name} already exists and is not owned by this "
        f"CompressedModel (controller: {found.holder}); the operator leaves it alone. "
        f"Rename the CompressedModel or remove that {found.kind}, then change the spec "
        "(or re-create the object) to retry"
    )


def require(found: Claim, namespace: str) -> None:
    """Raises unless the operator may create (absent) or change (owned) the object."""
    if found.verdict is Verdict.foreign:
        raise NameConflict(found, namespace)
    if found.verdict is Verdict.stale:
        raise StillOwnedByPredecessor(
            f"{found.kind} {found.name} still belongs to {found.holder}; waiting for its removal"
        )
