"""When the driver asks the replay actor again while every rollout actor is held back (pure logic: the Runtime's
methods on a stand-in object; the Ray runtime itself is tested in test_runtime.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from softflow.actors.remote import ReplayStatus
from softflow.deploy.run.processes import LocalProcesses, RayProcesses
from softflow.deploy.run.runtime import Runtime
from softflow.learner.remote import TrainResult


def driver(allowance: int, learner_rate: float | None, updates_per_step: float = 1.0, processes=RayProcesses):
    status = ReplayStatus(size=0, inserts=0, samples=0, inserts_per_s=0.0, samples_per_s=0.0,
                          insert_allowance=allowance)
    config = SimpleNamespace(replay=SimpleNamespace(updates_per_step=updates_per_step))
    return SimpleNamespace(processes=processes, status=status, config=config, learner_rate=learner_rate)


@pytest.mark.parametrize(("allowance", "pending", "rate", "utd", "expected"), [
    (10, 0, 100.0, 1.0, 0.40),  # 40 transitions short, one update each, at 100 updates/s
    (10, 0, 1000.0, 1.0, 0.04),  # a GPU learner frees the room ten times sooner
    (30, 20, 100.0, 1.0, 0.40),  # transitions on their way in count against the allowance
    (10, 0, 100.0, 0.25, 0.10),  # a quarter update per step: a quarter of the wait
    (0, 0, 250.0, 2.0, 0.40),  # 50 transitions short at 2 updates each: 100 updates at 250 updates/s
])
def test_the_next_status_call_waits_for_the_updates_the_rate_limiter_needs(allowance, pending, rate, utd, expected):
    wait = Runtime._next_status_in(driver(allowance, rate, utd), pending, chunk=50)
    assert wait == pytest.approx(expected)


def test_the_wait_stays_between_the_poll_interval_and_its_cap():
    p = RayProcesses
    assert Runtime._next_status_in(driver(49, 1e6), 0, chunk=50) == p.status_poll_s  # 1 update: at once
    assert Runtime._next_status_in(driver(0, 1.0), 0, chunk=50) == p.status_wait_max_s  # a stalled learner
    assert Runtime._next_status_in(driver(60, 100.0), 0, chunk=50) == p.status_poll_s  # room already
    assert Runtime._next_status_in(driver(0, None), 0, chunk=50) == p.status_poll_s  # no rate measured yet
    assert Runtime._next_status_in(driver(0, 100.0, processes=LocalProcesses), 0, chunk=50) == 0.0  # serial


def test_the_learner_rate_leaves_out_its_waits_for_data():
    """50 updates in a 1 s call that waited half of it for batches: 100 updates per second of work. Counting the
    wait would make the driver ask later, hold the actors longer and so make the learner wait more."""
    result = TrainResult(updates=50, seconds=1.0, metrics={"learner/wait_fraction": 0.5}, weights=None)
    runtime = SimpleNamespace(processes=SimpleNamespace(get=lambda task: result, errors=()),
                              counters=SimpleNamespace(updates=0), learner_rate=None)
    assert Runtime._learner_result(runtime, "task") is result
    assert runtime.learner_rate == pytest.approx(100.0) and runtime.counters.updates == 50
    idle = TrainResult(updates=0, seconds=1.0, metrics={"learner/wait_fraction": 1.0}, weights=None)
    runtime.processes.get = lambda task: idle
    Runtime._learner_result(runtime, "task")
    assert runtime.learner_rate == pytest.approx(100.0), "a call without updates keeps the last rate"
