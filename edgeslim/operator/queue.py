"""The cluster-wide limit on running compressor Jobs, first come first served.

State is never the operator's own: the number of running Jobs and the list of
Queued objects come from kopf indexes, which kopf fills from the cluster (a
full list) before any handler runs, so a restarted operator starts from what
the cluster says. The only in-memory part is a short-lived *reservation*: a
slot promised to an object whose Job the API server has not echoed back yet,
so two handlers cannot both take the last slot.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

ModelKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, order=True)
class Waiting:
    """An object waiting for a slot. Field order is the queue order:
    creationTimestamp (RFC 3339 sorts as text), then namespace and name."""

    created: str
    namespace: str
    name: str
    job: str = field(default="", compare=False)
    """The Job the object gets when admitted (not part of the order)."""

    @property
    def key(self) -> ModelKey:
        return (self.namespace, self.name)


def order(waiting: Iterable[Waiting]) -> list[Waiting]:
    return sorted(set(waiting))


def admissible(waiting: Iterable[Waiting], running: int, limit: int) -> list[Waiting]:
    """Who may start now: the oldest `limit - running` (all of them when limit is 0)."""
    queue = order(waiting)
    if limit <= 0:
        return queue
    return queue[: max(0, limit - running)]


def within_groups(
    queue: list[Waiting],
    busy: Iterable[ModelKey],
    groups: dict[ModelKey, tuple[Hashable, int]],
) -> list[Waiting]:
    """The queue (in order) less what would take a group over its limit, counting
    the group's objects already holding a slot (`busy`)."""
    held: dict[Hashable, int] = {}
    for key in busy:
        if key in groups:
            held[groups[key][0]] = held.get(groups[key][0], 0) + 1
    out = []
    for w in queue:
        group = groups.get(w.key)
        if group is not None:
            if held.get(group[0], 0) >= group[1]:
                continue
            held[group[0]] = held.get(group[0], 0) + 1
        out.append(w)
    return out


def position(waiting: Iterable[Waiting], key: ModelKey) -> int | None:
    """1-based place of `key` in the queue."""
    for i, w in enumerate(order(waiting), start=1):
        if w.key == key:
            return i
    return None


class Slots:
    """Reservations on top of what the indexes show; thread-safe (handlers are sync)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reserved: dict[ModelKey, str] = {}  # model -> job name not yet seen
        self._waiting: dict[ModelKey, Waiting] = {}  # asked for a slot, not yet admitted
        # An optimize search's step Jobs (plan, candidates, pick) not yet seen: an
        # object fans out over several slots, each counted like a queued object's.
        self._steps: dict[ModelKey, set[str]] = {}

    @property
    def unlimited(self) -> bool:
        return self.limit <= 0

    def wait(self, entry: Waiting) -> None:
        with self._lock:
            self._waiting[entry.key] = entry

    def forget(self, key: ModelKey) -> None:
        """The object no longer waits (deleted, spec now settled, started)."""
        with self._lock:
            self._waiting.pop(key, None)
            self._reserved.pop(key, None)
            self._steps.pop(key, None)

    def release(self, key: ModelKey, job: str) -> None:
        """The reservation for `job` is over (the index shows it, or it failed)."""
        with self._lock:
            if self._reserved.get(key) == job:
                del self._reserved[key]
            self._steps.get(key, set()).discard(job)

    def take(
        self,
        queued: Iterable[Waiting],
        running: dict[ModelKey, set[str]],
        groups: dict[ModelKey, tuple[Hashable, int]] | None = None,
    ) -> list[Waiting]:
        """Reserves slots for the objects that may start now and returns them.

        `queued`: Queued objects the index knows of; `running`: running Job
        names per object (index). Objects already holding a running Job
        never take a second slot. `groups`: object -> (group, its limit), e.g.
        a CompressionPolicy and its maxConcurrent: at most that many objects of
        a group hold slots at once, on top of the overall limit.
        """
        with self._lock:
            count = self._count(running)
            busy = set(running) | set(self._reserved) | {k for k, v in self._steps.items() if v}
            candidates = [w for w in {*queued, *self._waiting.values()} if w.key not in busy]
            if groups:
                candidates = within_groups(order(candidates), busy, groups)
            chosen = admissible(candidates, count, self.limit)
            for w in chosen:
                self._reserved[w.key] = w.job
                self._waiting.pop(w.key, None)
            return chosen

    def _count(self, running: dict[ModelKey, set[str]]) -> int:
        """Running Jobs plus reservations the index does not show yet (lock held)."""
        # A reservation whose Job the index now shows is counted there.
        for key, job in list(self._reserved.items()):
            if job in running.get(key, set()):
                del self._reserved[key]
        for key, jobs in list(self._steps.items()):
            jobs -= running.get(key, set())
            if not jobs:
                del self._steps[key]
        steps = sum(len(v) for v in self._steps.values())
        return sum(len(jobs) for jobs in running.values()) + len(self._reserved) + steps

    def take_steps(
        self, key: ModelKey, wanted: list[str], running: dict[ModelKey, set[str]]
    ) -> list[str]:
        """Reserves slots for as many of an object's step Jobs `wanted` as the limit
        allows now, in order, and returns those names (all of them when unlimited)."""
        with self._lock:
            held = self._steps.get(key, set())
            new = [w for w in wanted if w not in held]
            free = len(new) if self.unlimited else max(0, self.limit - self._count(running))
            granted = set(new[:free]) | {w for w in wanted if w in held}
            if granted:
                self._steps.setdefault(key, set()).update(granted)
            return [w for w in wanted if w in granted]

    def hand_over(self, key: ModelKey, job: str, step: str) -> None:
        """The slot reserved for `job` goes to the object's first step Job instead."""
        with self._lock:
            if self._reserved.get(key) == job:
                del self._reserved[key]
                self._steps.setdefault(key, set()).add(step)

    def waiting_now(self, queued: Iterable[Waiting]) -> list[Waiting]:
        with self._lock:
            busy = set(self._reserved)
            return [w for w in order({*queued, *self._waiting.values()}) if w.key not in busy]
