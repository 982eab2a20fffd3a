"""CompressionPolicies on the operator's side, as pure functions over index entries:
which policy selects a model, the model's effective (merged) body, how many of a
policy's models may compress at once, and the policy's status counts.

The side effects (re-reconciling a policy's models, writing its status) live in
`policy_sync`; the merge rule itself in edgeslim/api/merge.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edgeslim.api.errors import format_validation_error
from edgeslim.api.policy import CompressionPolicy, CompressionPolicyStatus, apply_policy
from edgeslim.api.status import Condition, PolicyRef
from edgeslim.operator import status as model_status

Obj = dict[str, Any]
PolicyKey = tuple[str, str]  # (namespace, name)


class PolicyConflict(ValueError):
    """More than one policy selects the model: nothing is merged until one remains."""


@dataclass(frozen=True)
class PolicyEntry:
    """A CompressionPolicy as the policy index holds it."""

    namespace: str
    name: str
    generation: int | None
    policy: CompressionPolicy | None  # None: the object does not parse (see `error`)
    error: str = ""
    status: Obj | None = None  # as last written, to skip writes that change nothing
    uid: str = ""

    @property
    def key(self) -> PolicyKey:
        return (self.namespace, self.name)

    @property
    def max_concurrent(self) -> int:
        return self.policy.spec.max_concurrent if self.policy else 1

    def selects(self, namespace: str, labels: dict[str, str]) -> bool:
        """Same namespace and the selector matches (a broken policy selects nothing)."""
        if namespace != self.namespace or self.policy is None:
            return False
        return self.policy.spec.selector.matches(labels)

    def ref(self) -> PolicyRef:
        return PolicyRef(name=self.name, generation=self.generation)

    def reference(self) -> Obj:
        """Enough of the object for an Event or an ownerReference about it."""
        return {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressionPolicy",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


def policy_entry(body: Obj) -> PolicyEntry:
    """The index entry of a policy object; never raises (an index must not fail)."""
    meta = body.get("metadata") or {}
    try:
        policy: CompressionPolicy | None = CompressionPolicy.model_validate(body)
        error = ""
    except ValidationError as exc:
        policy, error = None, format_validation_error(exc)
    return PolicyEntry(
        namespace=meta.get("namespace") or "",
        name=meta.get("name") or "",
        generation=meta.get("generation"),
        policy=policy,
        error=error,
        status=body.get("status"),
        uid=meta.get("uid") or "",
    )


def flatten(index_items: Iterable[tuple[Any, list[Any]]]) -> list[PolicyEntry]:
    """PolicyEntries out of a kopf index snapshot (key -> entries)."""
    return [e for _key, entries in index_items for e in entries if isinstance(e, PolicyEntry)]


def selecting(policies: Iterable[PolicyEntry], namespace: str, labels: dict[str, str]) -> list:
    """The policies that select a model with `labels` in `namespace`, by name."""
    return sorted((p for p in policies if p.selects(namespace, labels)), key=lambda p: p.name)


def policy_for(policies: Iterable[PolicyEntry], body: Obj) -> PolicyEntry | None:
    """The one policy selecting the model; PolicyConflict naming them when several do."""
    meta = body.get("metadata") or {}
    found = selecting(policies, meta.get("namespace") or "", meta.get("labels") or {})
    if len(found) > 1:
        names = " and ".join(p.name for p in found)
        raise PolicyConflict(
            f"CompressionPolicies {names} both select this object: at most one may "
            "(change a selector or this object's labels)"
        )
    return found[0] if found else None


def effective_body(body: Obj, policy: PolicyEntry | None) -> Obj:
    """The model object with its spec merged over the policy's defaults."""
    if policy is None or policy.policy is None:
        return body
    return apply_policy(body, policy.policy)


def missing_hint(policy: PolicyEntry | None, message: str) -> str:
    """Said after a merged spec's validation error, so a missing field explains itself."""
    if policy is not None:
        return f" (after merging CompressionPolicy {policy.name}'s defaults)"
    if "evaluation" in message or "pipeline and optimize" in message:
        return (
            " (no CompressionPolicy selects this object to supply evaluation, pipeline or optimize)"
        )
    return ""


# ------------------------------------------------------------------ the queue


def groups(
    models: Iterable[tuple[tuple[str, str], dict[str, str]]], policies: list[PolicyEntry]
) -> dict[tuple[str, str], tuple[PolicyKey, int]]:
    """model key -> (its policy, the policy's maxConcurrent), for models one policy selects.

    `models` gives each model's key and labels. A model that two policies select
    is Failed, so it never queues and needs no group.
    """
    out: dict[tuple[str, str], tuple[PolicyKey, int]] = {}
    for key, labels in models:
        found = selecting(policies, key[0], labels)
        if len(found) == 1:
            out[key] = (found[0].key, found[0].max_concurrent)
    return out


# ------------------------------------------------------------------ the status


@dataclass(frozen=True)
class ModelState:
    """What the counts need of one selected model (from the model index)."""

    phase: str | None
    policy: str | None  # status.policy.name
    policy_generation: int | None


def object_state(entries: list[Any]) -> ModelState:
    """One object's state from its model-index entries (one per spec.targets target):
    Failed if any target failed, else on its way while any is, else Rejected if any
    was rejected, else Ready."""
    phases = [e.phase for e in entries]
    if "Failed" in phases:
        phase = "Failed"
    elif any(p not in ("Ready", "Rejected") for p in phases):
        phase = next(p for p in phases if p not in ("Ready", "Rejected"))
    elif "Rejected" in phases:
        phase = "Rejected"
    else:
        phase = "Ready"
    return ModelState(phase, entries[0].policy, entries[0].policy_generation)


def counts(policy: PolicyEntry, models: Iterable[ModelState]) -> dict[str, int]:
    """Selected models by state. Ready and Rejected count only for this generation
    of the policy (an older one's result is about to be replaced: pending); Failed
    counts whatever the generation (a model the policy makes invalid never gets
    further)."""
    out = {"models": 0, "ready": 0, "rejected": 0, "failed": 0, "pending": 0}
    for m in models:
        out["models"] += 1
        current = m.policy == policy.name and m.policy_generation == policy.generation
        if m.phase == "Failed":
            out["failed"] += 1
        elif m.phase == "Ready" and current:
            out["ready"] += 1
        elif m.phase == "Rejected" and current:
            out["rejected"] += 1
        else:
            out["pending"] += 1
    return out


def policy_status(policy: PolicyEntry, models: Iterable[ModelState], at: str) -> Obj:
    """The policy's whole status (wire form), conditions per the API conventions:
    Reconciling while models are on their way, Stalled once every model settled
    with some Rejected or Failed (nothing moves until someone changes a spec),
    Ready when every selected model is Ready for this generation."""
    old = CompressionPolicyStatus.model_validate(policy.status or {})
    gen = policy.generation
    conds: list[Condition] = list(old.conditions)
    if policy.policy is None:
        c = {"models": 0, "ready": 0, "rejected": 0, "failed": 0, "pending": 0}
        ready = ("False", "InvalidSpec", policy.error)
        reconciling = ("False", "InvalidSpec", "")
        stalled = ("True", "InvalidSpec", policy.error)
    else:
        c = counts(policy, models)
        bad = c["failed"] + c["rejected"]
        summary = (
            f"{c['ready']} of {c['models']} models Ready, {c['pending']} pending, "
            f"{c['rejected']} rejected, {c['failed']} failed"
        )
        if c["pending"]:
            ready = ("False", "ModelsPending", summary)
        elif bad:
            ready = ("False", "ModelsFailed" if c["failed"] else "ModelsRejected", summary)
        else:
            ready = ("True", "AllModelsReady" if c["models"] else "NoModels", summary)
        reconciling = (
            ("True", "ModelsPending", summary) if c["pending"] else ("False", "Settled", "")
        )
        stalled = ("True", ready[1], summary) if not c["pending"] and bad else ("False", "Ok", "")
    for type_, (st, reason, message) in (
        ("Ready", ready),
        ("Reconciling", reconciling),
        ("Stalled", stalled),
    ):
        conds = model_status.set_condition(conds, type_, st, reason, message, gen, at)
    new = CompressionPolicyStatus(observed_generation=gen, conditions=conds, **c)
    return new.wire()


def same_status(old: Obj | None, new: Obj) -> bool:
    """True when writing `new` over `old` changes nothing but timestamps."""

    def strip(s: Obj | None) -> Obj:
        s = copy.deepcopy(s or {})
        for cond in s.get("conditions") or []:
            cond.pop("lastTransitionTime", None)
        return s

    return strip(old) == strip(new)
