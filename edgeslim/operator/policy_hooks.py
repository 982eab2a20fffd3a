"""Where the compression flow consults CompressionPolicies: the policy a model's
status reflects, and the per-policy limit the queue applies on top of the
operator's own Job limit (a policy edit then re-compresses its models in a
rolling wave of `maxConcurrent`)."""

from __future__ import annotations

from edgeslim.api.status import CompressedModelStatus, Phase, PolicyRef
from edgeslim.operator import policy, status
from edgeslim.operator.queue import ModelKey
from edgeslim.operator.runtime import (
    InvalidSpec,
    Obj,
    Runtime,
    parse_model,
    policies,
    selecting_policy,
    snapshot,
    write_status,
)
from edgeslim.operator.status import Transition, now


def record_policy_ref(rt: Runtime, key: ModelKey, body: Obj) -> Obj:
    """Writes status.policy (the policy and generation merged into the spec) when
    it changed; returns the object to carry on with. Runs before the spec is
    validated, so an object that a policy change leaves invalid still says which
    policy (if any) it reflects.

    When the change also changes the spec hash, the same write moves the object
    to Pending: its old result no longer describes its spec, and the policy must
    not count it Ready for the new generation meanwhile.
    """
    if "/" in key[1]:
        # A spec.targets variant: the reference is the object's, written at its
        # top level (each target's entry has its own phase; no Pending here).
        _record_object_ref(rt, (key[0], key[1].partition("/")[0]), body)
        return body
    ref = _wanted_ref(body)
    if _written(body, ref):
        return body
    try:
        spec_hash: str | None = parse_model(body).spec.spec_hash()
    except InvalidSpec:
        spec_hash = None  # the reconcile records why
    message = (
        f"CompressionPolicy {ref.name} generation {ref.generation} changed the spec"
        if ref is not None
        else "no CompressionPolicy selects this object any more"
    )

    def compute(cur: CompressedModelStatus, b: Obj) -> Obj:
        if spec_hash is not None and cur.spec_hash not in (None, spec_hash):
            generation = b["metadata"].get("generation")
            t = Transition(Phase.pending, "PolicyChanged", message)
            cur = CompressedModelStatus.model_validate(status.apply(cur, generation, t, now()))
        return cur.model_copy(update={"policy": ref}).wire()

    write_status(rt, key, compute, body)
    return rt.kube.get_model(*key) or body


def _wanted_ref(body: Obj) -> PolicyRef | None:
    try:
        chosen = selecting_policy(body)
    except InvalidSpec:
        return None  # two policies: it reflects neither (the reconcile fails it)
    return chosen.ref() if chosen is not None else None


def _written(body: Obj, ref: PolicyRef | None) -> bool:
    return (body.get("status") or {}).get("policy") == (ref.wire() if ref else None)


def _record_object_ref(rt: Runtime, key: ModelKey, body: Obj) -> None:
    ref = _wanted_ref(body)
    if _written(body, ref):
        return  # a variant body's status is its target's entry: read the object's
    obj = rt.kube.get_model(*key)
    if obj is None or _written(obj, ref):
        return
    write_status(rt, key, lambda cur, _b: cur.model_copy(update={"policy": ref}).wire(), obj)


def policy_groups(rt: Runtime) -> dict[ModelKey, tuple[policy.PolicyKey, int]]:
    """Each policy-selected model's policy and that policy's maxConcurrent."""
    known = policies()
    if not known:
        return {}
    models = [(k, dict(es[0].labels)) for k, es in snapshot(rt.models_index) if es]
    return policy.groups(models, known)


def policy_limited(rt: Runtime, key: ModelKey) -> bool:
    """True when a policy's maxConcurrent applies to the model (it must queue)."""
    return key in policy_groups(rt)


def queued_message(rt: Runtime, key: ModelKey, limit: int) -> str:
    """Why a Queued object waits: the operator's Job limit or its policy's."""
    group = policy_groups(rt).get(key)
    if group is not None and (limit <= 0 or group[1] < limit):
        return (
            f"waiting for one of CompressionPolicy {group[0][1]}'s {group[1]} slots "
            "(maxConcurrent; first come, first served)"
        )
    return f"waiting for one of {limit} compressor slots (first come, first served)"
