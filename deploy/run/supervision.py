"""Rollout actors and the evaluator that die are restarted by the driver, each death counted once.

Ray does not restart these processes (``max_restarts=0``, processes.py); the driver does, so that it knows every
incarnation: a process starts as incarnation 0, and each restart starts the next one, with a fresh seed for a rollout
actor (:func:`actor_seed`). One call per incarnation, ``watch``, blocks for the life of its process in a concurrency
group of its own, so the driver learns of a death the moment it happens, whether the process was busy or idle.

Every signal of a death names the incarnation it came from: the failed ``watch``, and each failed call made to
that incarnation (a rollout run records the incarnation it was handed to). Only a signal from the current
incarnation restarts the process and counts one death; the others belong to a death already handled. So a death is
counted once, however many runs it took with it. After ``actors.max_restarts`` restarts of one process, one more
death stops the run (:class:`TooManyRestarts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from softflow.deploy.config import RunStopped

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b: ")


class TooManyRestarts(RunStopped):
    """A rollout actor or the evaluator died once more after ``actors.max_restarts`` restarts; the message says
    which, and where the run stopped."""


def actor_seed(seed: int, index: int, incarnation: int) -> int:
    """The seed of rollout actor ``index``'s ``incarnation``: ``seed + 1000 * index`` for the first, and for each
    restart a fresh one drawn from (seed, index, incarnation), so a restarted actor never repeats the episodes of an
    earlier one."""
    if incarnation == 0:
        return seed + 1000 * index
    return int(np.random.SeedSequence([seed % 2**32, index, incarnation]).generate_state(1)[0])


def death_cause(exc: BaseException) -> str:
    """One line on how a process died: the exception its constructor raised, or Ray's first line (killed, crashed)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    return raised[-1] if raised else (lines[0] if lines else type(exc).__name__)


@dataclass
class Supervised:
    """One process the driver restarts: its name, how an incarnation is started, its current incarnation and handle,
    and (for a rollout actor) the weight version it holds and its runs in flight."""

    name: str
    start: Callable[[int], Any]  # incarnation -> handle
    rollout: bool = True
    incarnation: int = 0
    handle: Any = None
    watch: Any = None
    version: int = -1
    runs: dict = field(default_factory=dict)  # summary ref -> (fragment ref, incarnation, transitions)


class Supervisor:
    """Starts the supervised processes of a run, watches each incarnation and restarts a process when its current
    incarnation dies, at most ``max_restarts`` times each. ``stopped`` says where the run stands, for the line of
    :class:`TooManyRestarts`."""

    def __init__(self, processes: Any, max_restarts: int, stopped: Callable[[], str]):
        self.processes = processes
        self.max_restarts = max_restarts
        self.stopped = stopped
        self.members: list[Supervised] = []

    def start(self, name: str, start: Callable[[int], Any], rollout: bool = True) -> Supervised:
        member = Supervised(name, start, rollout)
        self._launch(member)
        self.members.append(member)
        return member

    def _launch(self, member: Supervised) -> None:
        member.handle = member.start(member.incarnation)
        member.watch = self.processes.watch(member.handle)
        member.version = -1  # a new process has no weights yet: the next run carries the current ones

    def deaths(self) -> list[tuple[Supervised, int, BaseException]]:
        """(process, incarnation, error) for each watched incarnation that has died since the last look."""
        watches = [m.watch for m in self.members if m.watch is not None]
        ready = set(self.processes.ready(watches)) if watches else set()
        found = []
        for member in self.members:
            if member.watch in ready:
                try:
                    self.processes.get(member.watch)
                    error: BaseException = RuntimeError("the process ended")
                except self.processes.errors as exc:
                    error = exc
                member.watch = None
                found.append((member, member.incarnation, error))
        return found

    def died(self, member: Supervised, incarnation: int, exc: BaseException) -> bool:
        """Handles a signal that ``member``'s ``incarnation`` is dead: restarts the process and returns True when
        that is its current incarnation, False when this death was already handled. Raises :class:`TooManyRestarts`
        when the process has used its ``max_restarts``."""
        if incarnation != member.incarnation:
            return False
        self.processes.kill(member.handle)  # a process Ray only cannot reach (ActorUnavailableError) goes too
        if member.incarnation >= self.max_restarts:
            raise TooManyRestarts(
                f"{member.name} died {member.incarnation + 1} times, more than actors.max_restarts="
                f"{self.max_restarts} allows (last: {death_cause(exc)}); {self.stopped()}")
        member.incarnation += 1
        self._launch(member)
        return True
