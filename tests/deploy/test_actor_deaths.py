"""Rollout actors and the evaluator SIGKILLed on a real Ray runtime: each death is counted once, the transitions of
the runs it took are counted exactly, the run completes, and a process that keeps dying stops the run."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from helpers import ray_experiment

from softflow.deploy.config import parse_experiment
from softflow.deploy.run.driver import train
from softflow.deploy.run.runtime import Runtime
from softflow.deploy.run.supervision import TooManyRestarts, actor_seed, death_cause

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray, pytest.mark.usefixtures("ray_runtime")]
RAY_NUM_CPUS = 4  # the embedded Ray of the ray_runtime fixture
CHUNK = 20  # transitions per run: 2 envs x 10 steps


@pytest.fixture
def make_runtime(tmp_path):
    """Builds Runtimes in ``tmp_path`` and releases their placement groups after the test, pass or fail."""
    made = []

    def make(**sections):
        made.append(Runtime(parse_experiment(ray_experiment(**sections)), tmp_path))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


def count_submitted(runtime: Runtime, after=lambda slot: None) -> list[tuple[str, int]]:
    """Records the runs the driver hands out, (actor, incarnation) each, by wrapping its ``_submit``; ``after(slot)``
    is called once each run is on its way."""
    submitted: list[tuple[str, int]] = []
    submit = runtime._submit

    def counted(slot, random_actions):
        submitted.append((slot.name, slot.incarnation))
        submit(slot, random_actions)
        after(slot)

    runtime._submit = counted
    return submitted


def wait_until_dead(runtime: Runtime, member) -> None:
    """Waits until Ray has told the driver that ``member``'s process is gone."""
    ready, _ = ray.wait([member.watch], timeout=60)
    assert ready, f"Ray did not report the death of {member.name}"


def test_restarted_actors_get_fresh_seeds_and_deaths_name_their_cause():
    seeds = {actor_seed(0, index, incarnation) for index in range(8) for incarnation in range(20)}
    assert len(seeds) == 160 and actor_seed(0, 3, 0) == 3000 and actor_seed(7, 3, 2) != actor_seed(7, 3, 1)
    raised = RuntimeError("The actor died because of an error raised in its creation task, \x1b[36mray::A\x1b[39m\n"
                          "  File \"x.py\", line 1\nTypeError: f() got an unexpected keyword argument 'bad'")
    assert death_cause(raised) == "TypeError: f() got an unexpected keyword argument 'bad'"
    assert death_cause(RuntimeError("The actor died unexpectedly before finishing this task.")).startswith(
        "The actor died unexpectedly")


def test_an_idle_rollout_actor_killed_counts_one_restart_and_loses_nothing(make_runtime):
    """Killed before the run starts (no run in flight): one restart, no transitions lost, the run completes, and
    the restarted actor is incarnation 1."""
    runtime = make_runtime()
    submitted = count_submitted(runtime)
    victim = runtime.actor_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until_dead(runtime, runtime.slots[0])
    summary = runtime.run(lambda steps, metrics: None)
    assert summary["env_steps"] == 600
    assert summary["actors/restarts"] == 1 and summary["actors/lost_transitions"] == 0
    assert [slot.incarnation for slot in runtime.slots] == [1, 0] and ("rollout actor 0", 0) not in submitted
    assert len(submitted) * CHUNK == 600 and victim not in runtime.actor_pids()


@pytest.mark.slow
def test_a_rollout_actor_killed_with_runs_in_flight_counts_one_restart_and_its_runs(make_runtime):
    """Killed while the driver has runs in flight on it: one restart, and every transition handed out is either in
    the replay buffer or counted lost (a whole run each, at most the two runs in flight)."""
    runtime = make_runtime(total_env_steps=1200)
    victim = runtime.actor_pids()[0]
    killed = []

    def kill_after_a_run_is_handed_out(slot) -> None:
        if slot is runtime.slots[0] and runtime.counters.env_steps >= 300 and not killed:
            killed.append(len(slot.runs))
            os.kill(victim, signal.SIGKILL)

    submitted = count_submitted(runtime, kill_after_a_run_is_handed_out)
    summary = runtime.run(lambda steps, metrics: None)
    assert killed and summary["env_steps"] == 1200 and summary["actors/restarts"] == 1
    lost = summary["actors/lost_transitions"]
    assert lost % CHUNK == 0 and CHUNK <= lost <= killed[0] * CHUNK
    assert len(submitted) * CHUNK == summary["env_steps"] + lost
    assert ray.get(runtime.replay.status.remote()).inserts == 1200
    assert runtime.slots[0].incarnation == 1 and victim not in runtime.actor_pids()


@pytest.mark.slow
def test_a_killed_evaluator_is_restarted_and_the_run_completes(make_runtime):
    """The evaluator killed (busy or idle): one restart in eval/restarts, evaluations go on, the run completes."""
    runtime = make_runtime(total_env_steps=1200, eval={"every_steps": 100})
    victim = runtime.evaluator_pid()
    killed = []

    def report(steps: int, metrics: dict) -> None:
        if steps >= 300 and not killed:
            killed.append(steps)
            os.kill(victim, signal.SIGKILL)

    summary = runtime.run(report)
    assert summary["env_steps"] == 1200 and summary["eval/restarts"] == 1 and summary["actors/restarts"] == 0
    assert "eval/episode_return" in summary and runtime.evaluator_pid() != victim


def test_an_actor_that_dies_at_start_up_stops_the_run_after_max_restarts(tmp_path):
    """An env the actors cannot build (a keyword the env does not take): the rollout actor dies in its constructor
    every time; after actors.max_restarts restarts the run stops with one line naming the actor and the setting,
    and the placement group is released (the next test's run can be placed)."""
    config = parse_experiment(ray_experiment(env={"id": "InvertedPendulum-v5", "kwargs": {"no_such_keyword": 1}},
                                             actors={"count": 1, "max_restarts": 2}))
    with pytest.raises(TooManyRestarts) as stopped:
        train(config, tmp_path, progress=False)
    line = str(stopped.value)
    assert "\n" not in line and line.startswith("rollout actor 0 died 3 times, more than actors.max_restarts=2")
    assert "no_such_keyword" in line and line.endswith("before its first checkpoint")
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < RAY_NUM_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == RAY_NUM_CPUS
