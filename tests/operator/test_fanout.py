"""The search fanned out as Jobs, without a cluster: step Job manifests, their
names, the plan size read from a pod, the progress text and the slots a search takes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from edgeslim.api.status import CompressedModelStatus, Phase
from edgeslim.operator import compression, fanout, jobs, kueue, queue
from edgeslim.operator.names import (
    KUEUE_QUEUE_LABEL,
    MODEL_LABEL,
    SPEC_HASH_LABEL,
    STEP_LABEL,
    job_name,
)
from edgeslim.operator.runtime import JobEntry, ModelEntry
from edgeslim.operator.settings import Settings
from tests.operator.test_builders import UID, container, model

OPTIMIZE = {"pipeline": None, "optimize": {"objective": "download", "maxCandidates": 6}}


def test_the_result_job_of_a_search_is_its_pick_step() -> None:
    m = model(**OPTIMIZE)
    job = jobs.build_job(m, Settings(), m.spec.spec_hash())
    assert container(job)["command"][-4:] == ["compress", "--spec-env", "EDGESLIM_SPEC", "--pick"]
    assert STEP_LABEL not in job["metadata"]["labels"]
    plain = jobs.build_job(model(), Settings(), model().spec.spec_hash())
    assert container(plain)["command"][-1] == "EDGESLIM_SPEC"


def test_step_jobs_are_owned_labelled_and_run_their_step() -> None:
    m = model(**OPTIMIZE)
    h = m.spec.spec_hash()
    plan = fanout.build_step_job(m, Settings(), h, fanout.PLAN, ["--plan"])
    cand = fanout.build_step_job(m, Settings(), h, fanout.candidate_step(4), ["--candidate", "4"])
    assert plan["metadata"]["name"] == f"digits-cnn-{h[:10]}-plan"
    assert cand["metadata"]["name"] == f"digits-cnn-{h[:10]}-c4"
    for job, kind in ((plan, "plan"), (cand, "candidate")):
        labels = job["metadata"]["labels"]
        assert labels[STEP_LABEL] == kind and labels[MODEL_LABEL] == "digits-cnn"
        assert labels[SPEC_HASH_LABEL] == h
        assert job["spec"]["template"]["metadata"]["labels"][STEP_LABEL] == kind
        assert job["metadata"]["ownerReferences"][0]["uid"] == UID  # deleted with the object
        assert fanout.is_step(job)
    assert container(plan)["command"][-4:] == ["compress", "--spec-env", "EDGESLIM_SPEC", "--plan"]
    assert container(cand)["command"][-2:] == ["--candidate", "4"]
    # The same resources, deadline and pod security as the object's own Job.
    pick = jobs.build_job(m, Settings(), h)
    assert container(cand)["resources"] == container(pick)["resources"]
    assert cand["spec"]["activeDeadlineSeconds"] == pick["spec"]["activeDeadlineSeconds"]
    assert not fanout.is_step(pick)


def test_step_job_names_fit_a_label_and_never_meet_the_result_job() -> None:
    h = "0123456789abcdef"
    long_a, long_b = "m" * 50 + "-prod-a", "m" * 50 + "-prod-b"
    names = {
        fanout.step_job_name(n, h, s)
        for n in ("x", "a" * 40, long_a, long_b)
        for s in ("plan", "c0", "c999")
    }
    assert len(names) == 12 and all(len(n) <= 63 for n in names)
    assert not names & {job_name(n, h) for n in ("x", "a" * 40, long_a, long_b)}
    assert fanout.step_job_name(long_a, h, "c1") != fanout.step_job_name(long_a, "f" * 16, "c1")


def test_plan_size_is_read_only_from_a_plan_message() -> None:
    ok = {"kind": "OptimizePlan", "candidates": 6, "planUri": "s3://b/p/plan.json"}
    assert fanout.planned_from_message(json.dumps(ok)) == 6
    assert fanout.planned_from_message(json.dumps({**ok, "candidates": 0})) == 0
    for bad in (
        "not json",
        "[]",
        json.dumps({**ok, "kind": "CompressionResult"}),
        json.dumps({**ok, "candidates": 1001}),
        json.dumps({**ok, "candidates": -1}),
        json.dumps({**ok, "candidates": True}),
        json.dumps({**ok, "candidates": "6"}),
    ):
        assert fanout.planned_from_message(bad) is None, bad


def test_progress_is_finished_over_planned() -> None:
    assert fanout.progress_text(3, 6) == "3/6"
    assert fanout.planned_from_status(CompressedModelStatus(candidates="3/6")) == 6
    assert fanout.planned_from_status(CompressedModelStatus()) is None
    assert fanout.planned_from_status(CompressedModelStatus(candidates="x/6")) is None


def test_a_search_takes_only_free_slots_and_counts_them_until_they_run() -> None:
    slots = queue.Slots(limit=3)
    key, other = ("ns", "a"), ("ns", "b")
    running = {other: {"b-job"}}
    assert slots.take_steps(key, ["c0", "c1", "c2", "c3"], running) == ["c0", "c1"]
    # Reserved, not yet running: no further slot, and a queued object waits too.
    assert slots.take_steps(key, ["c2", "c3"], running) == []
    assert slots.take([queue.Waiting("t", "ns", "q", "q-job")], running) == []
    # Asking again for what it holds is no second slot.
    assert slots.take_steps(key, ["c0"], running) == ["c0"]
    # Once running, the index counts them; one ends and frees its slot.
    running = {other: {"b-job"}, key: {"c0", "c1"}}
    assert slots.take_steps(key, ["c2"], running) == []
    slots.release(key, "c0")
    running = {other: {"b-job"}, key: {"c1"}}
    assert slots.take_steps(key, ["c2", "c3"], running) == ["c2"]
    slots.forget(key)
    assert queue.Slots(limit=0).take_steps(key, ["c0", "c1", "c2"], {}) == ["c0", "c1", "c2"]


def test_a_search_between_two_steps_keeps_its_policy_place() -> None:
    # Its plan Job has ended and no candidate is created yet: no Job of it is
    # unfinished, but it still holds the place of its policy (maxConcurrent 1).
    searching, other = ("ns", "a"), ("ns", "b")
    rt = SimpleNamespace(
        models_index={
            searching: [ModelEntry("t0", Phase.compressing, "h", job_name("a", "h"), 1, 1)],
            other: [ModelEntry("t1", Phase.queued, "g", "b-job", 1, 1)],
        },
        jobs_index={
            searching: [JobEntry("a-plan", "h", jobs.JobState.succeeded, UID, fanout.PLAN)]
        },
    )
    held = compression.holding(rt)
    assert held == {searching: set()}
    groups = {searching: ("policy", 1), other: ("policy", 1)}
    waiting = [queue.Waiting("t1", "ns", "b", "b-job")]
    assert queue.Slots(limit=0).take(waiting, held, groups) == []
    # Without the hold, the other model would have started in that gap.
    assert queue.Slots(limit=0).take(waiting, {}, groups) == waiting
    # Once the pick Job exists, the search is no longer "between steps": the Job holds it.
    rt.jobs_index[searching].append(JobEntry(job_name("a", "h"), "h", jobs.JobState.running, UID))
    assert compression.holding(rt) == {searching: {job_name("a", "h")}}


def test_the_admitted_slot_goes_to_the_plan_job() -> None:
    slots = queue.Slots(limit=1)
    key = ("ns", "a")
    assert [w.key for w in slots.take([queue.Waiting("t", "ns", "a", "a-job")], {})] == [key]
    slots.hand_over(key, "a-job", "a-plan")
    assert slots.take_steps(key, ["a-plan"], {}) == ["a-plan"]  # its own, not a second one
    assert slots.take_steps(("ns", "b"), ["b-plan"], {}) == []


def test_search_jobs_go_to_the_deployment_nodes_when_asked() -> None:
    deployment = {
        "nodeSelector": {"node-role.kubernetes.io/edge": ""},
        "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
    }
    placed = {
        "pipeline": None,
        "optimize": {"objective": "latency", "placeOnDeploymentNodes": True},
        "deployment": deployment,
    }
    m = model(**placed)
    h = m.spec.spec_hash()
    for job in (
        jobs.build_job(m, Settings(), h),
        fanout.build_step_job(m, Settings(), h, fanout.candidate_step(0), ["--candidate", "0"]),
    ):
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
        assert pod["tolerations"] == deployment["tolerations"]
    # Not asked: the search runs wherever the scheduler puts it.
    m = model(pipeline=None, optimize={"objective": "latency"}, deployment=deployment)
    pod = jobs.build_job(m, Settings(), m.spec.spec_hash())["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_placing_on_deployment_nodes_needs_a_deployment() -> None:
    with pytest.raises(ValidationError, match=r"placeOnDeploymentNodes: needs spec\.deployment"):
        model(pipeline=None, optimize={"placeOnDeploymentNodes": True})


def test_under_kueue_every_search_job_waits_for_admission() -> None:
    m = model(**OPTIMIZE, resources=None)
    h = m.spec.spec_hash()
    settings = Settings(kueue_queue="edge")
    assert fanout.applies(m)  # the search fans out under Kueue too
    for job in (
        fanout.build_step_job(m, settings, h, fanout.PLAN, ["--plan"]),
        fanout.build_step_job(m, settings, h, fanout.candidate_step(3), ["--candidate", "3"]),
        jobs.build_job(m, settings, h),
    ):
        assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "edge"
        assert job["spec"]["suspend"] is True
        assert container(job)["resources"]["requests"] == {"cpu": kueue.DEFAULT_CPU}


def test_under_kueue_a_queued_search_goes_on_and_its_plan_admission_starts_it() -> None:
    h, pick = "0123456789abcdef", "digits-cnn-0123456789"
    waiting = kueue.waiting(CompressedModelStatus(), h, pick, "edge")
    assert waiting is not None and waiting.phase is Phase.queued
    assert waiting.reason == kueue.WAITING and waiting.job_name == pick
    queued = CompressedModelStatus(phase=Phase.queued, spec_hash=h, job_name=pick)
    # Queued under Kueue: the plan Job is created and waits in Kueue; without
    # Kueue, Queued waits for one of the operator's slots.
    assert fanout.searching(queued, Settings(kueue_queue="edge"))
    assert not fanout.searching(queued, Settings())
    # Kueue admits the plan (a step Job): Compressing, still naming the pick Job.
    started = kueue.admitted(queued, f"{pick}-plan", h, step=True)
    assert started is not None and started.phase is Phase.compressing
    assert started.job_name == pick and "digits-cnn-0123456789-plan" in started.message
    # Some other Job, an old spec's step, or a search already running: nothing.
    assert kueue.admitted(queued, "other", h, step=False) is None
    assert kueue.admitted(queued, f"{pick}-plan", "feedbeef", step=True) is None
    running = CompressedModelStatus(phase=Phase.compressing, spec_hash=h, job_name=pick)
    assert kueue.admitted(running, f"{pick}-c0", h, step=True) is None
    # A resumed operator does not put an admitted search back to Queued.
    assert kueue.waiting(running, h, pick, "edge") is None
    assert kueue.waiting(running, "feedbeef", pick, "edge") is not None
