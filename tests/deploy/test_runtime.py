"""The Ray runtime end to end: real actors, object store, MuJoCo physics and processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from helpers import ray_experiment as experiment

from softflow import checkpoints
from softflow.deploy.config import load_experiment, parse_experiment
from softflow.deploy.run.driver import train
from softflow.deploy.run.runtime import Runtime

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray, pytest.mark.usefixtures("ray_runtime")]
RAY_NUM_CPUS = 4  # the embedded Ray of the ray_runtime fixture


@pytest.fixture
def make_runtime(tmp_path):
    """Builds Runtimes in ``tmp_path`` and releases their placement groups after the test, pass or fail."""
    made = []

    def make(config):
        made.append(Runtime(config, tmp_path))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_actors_replay_and_learner_train_on_mujoco(tmp_path):
    config = parse_experiment(experiment())
    summary = train(config, tmp_path, progress=False)
    rows = metrics(tmp_path)
    assert summary["env_steps"] == 600 and rows[-1]["env_steps"] == 600
    # both actors delivered, whole fragments of 2 envs x 10 steps, and the learner ran and published weights
    assert rows[-1]["replay/size"] == 600
    assert summary["updates"] > 0 and rows[-1]["weights/version"] > 1
    assert 0 <= rows[-1]["weights/version_lag"] < 10
    assert "eval/episode_return" in summary and "losses/q_loss" in rows[-1]
    newest, _ = checkpoints.newest_set(tmp_path / "checkpoints")
    assert (newest / "learner.pt").is_file() and (newest / "replay.npz").is_file()


@pytest.mark.parametrize("actors", [1, 3])
def test_rate_limiter_holds_the_update_to_data_ratio(tmp_path, actors):
    utd, starts, tolerance = 0.5, 100, 20.0
    config = parse_experiment(experiment(actors={"count": actors}, total_env_steps=1200,
                                         replay={"ratio_tolerance": tolerance}))
    train(config, tmp_path, progress=False)
    for row in metrics(tmp_path):
        inserts, samples = row["replay/inserts"], row["replay/samples"]
        if inserts >= starts:
            assert abs(samples - utd * (inserts - starts)) <= tolerance + 1e-6, row
    last = metrics(tmp_path)[-1]
    assert last["replay/samples"] >= utd * (last["replay/inserts"] - starts) - tolerance


def test_the_driver_waits_quietly_while_the_learner_holds_the_actors_back(tmp_path, make_runtime):
    """A learner far slower than its actor (batch 256, [256, 256] networks, one update per env step) holds the
    actor back nearly all the time. The driver then asks the replay actor again only when the learner will have made
    room (tests/deploy/test_driver_pacing.py), not back to back: polled back to back it used 48 % of a core here,
    every 20 ms 9 %, and the learner got the CPU it took."""
    runtime = make_runtime(parse_experiment(experiment(
        total_env_steps=1200, actors={"count": 1, "candidates": 1}, eval={"episodes": 0},
        algorithm={"batch_size": 256, "hidden": [256, 256], "critic": {"hidden": [256, 256]}},
        replay={"updates_per_step": 1.0},
        learner={"checkpoint_every": 10**6, "publish_every": 50, "batches_per_request": 4})))
    wall, cpu = time.perf_counter(), time.process_time()
    runtime.run(lambda steps, metrics: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu / wall < 0.25, f"the driver used {cpu / wall:.0%} of a core over {wall:.1f} s"


def at_steps(env_steps: int, action, before=None):
    """A report callback that calls ``action`` at the first report at or past ``env_steps`` (mid-run, whatever the
    machine's speed); ``before`` is called at the first report past half of that."""
    done = set()

    def report(steps: int, metrics: dict) -> None:
        if before is not None and steps >= env_steps // 2 and "before" not in done:
            done.add("before")
            before()
        if steps >= env_steps and "action" not in done:
            done.add("action")
            action()

    return report


def kill_at(env_steps: int, pid: int, before=None):
    """:func:`at_steps` with a SIGKILL to ``pid``."""
    return at_steps(env_steps, lambda: os.kill(pid, signal.SIGKILL), before)


def test_killed_rollout_actor_is_restarted_and_the_run_completes(make_runtime):
    runtime = make_runtime(parse_experiment(experiment(total_env_steps=2000)))
    victim = runtime.actor_pids()[0]
    summary = runtime.run(kill_at(600, victim))
    assert summary["env_steps"] == 2000
    assert summary["actors/restarts"] == 1  # one death, counted once however many runs it took
    assert summary["actors/lost_transitions"] % 20 == 0  # whole fragments of 2 envs x 10 steps
    assert victim not in runtime.actor_pids()


def test_killed_replay_actor_restarts_from_its_last_save(make_runtime):
    # no periodic checkpoints: the one save is the explicit checkpoint at 400 steps, the kill comes at 800
    runtime = make_runtime(parse_experiment(experiment(total_env_steps=2000, learner={"checkpoint_every": 10**6})))
    victim = ray.get(runtime.replay.pid.remote())
    summary = runtime.run(kill_at(800, victim, before=runtime.checkpoint))
    assert ray.get(runtime.replay.pid.remote()) != victim
    assert summary["env_steps"] == 2000 and summary["updates"] > 0
    # what was inserted between the save and the kill is gone, and counted; the rest survived the restart
    status = ray.get(runtime.replay.status.remote())
    assert status.inserts + summary["replay/lost_transitions"] == 2000
    assert 300 <= summary["replay/lost_transitions"] <= 600, summary
    assert status.size == status.inserts


def test_a_replay_actor_killed_as_a_checkpoint_starts_leaves_a_whole_set_and_the_run_completes(make_runtime):
    """SIGKILL to the replay actor, then a checkpoint at once: Ray restarts the actor from its last save and retries
    its part of the set, so the set is whole (its manifest checks out) and the run goes on to its budget."""
    runtime = make_runtime(parse_experiment(experiment(total_env_steps=2000, learner={"checkpoint_every": 10**6})))
    victim = ray.get(runtime.replay.pid.remote())
    sets = []

    def kill_then_checkpoint() -> None:
        os.kill(victim, signal.SIGKILL)
        runtime.checkpoint()
        sets.append((runtime.counters.env_steps, checkpoints.newest_set(runtime.checkpoints)))

    summary = runtime.run(at_steps(800, kill_then_checkpoint, before=runtime.checkpoint))
    ((steps, (newest, skipped)),) = sets
    assert not skipped and newest.name == f"step-{steps:012d}"
    assert ray.get(runtime.replay.pid.remote()) != victim
    assert summary["env_steps"] == 2000 and summary["replay/lost_transitions"] > 0


def test_killed_learner_stops_the_run_with_a_resume_hint_and_resume_finishes(tmp_path):
    """The real command in a subprocess: the learner's process is SIGKILLed once a checkpoint exists."""
    import psutil

    (tmp_path / "exp.yaml").write_text(json.dumps(experiment(total_env_steps=4000)))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "softflow.deploy.cli", "train"]
    run = subprocess.Popen([*command, str(tmp_path / "exp.yaml"), "--run-dir", str(run_dir), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while checkpoints.newest_set(run_dir / "checkpoints")[0] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    learner = [p for p in psutil.Process(run.pid).children(recursive=True)
               if "LearnerActor" in " ".join(p.cmdline())]
    assert len(learner) == 1, "the learner's worker process (titled ray::LearnerActor) was not found"
    learner[0].send_signal(signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, out + err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("softflow:")]
    assert line.startswith("softflow: stopped: the learner process died") and line.endswith(
        f"Continue it with: softflow train --resume {run_dir}")

    resumed = subprocess.run([*command, "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run_dir)[-1]["env_steps"] == 4000


def test_resume_continues_counters_and_the_buffer(tmp_path):
    first = parse_experiment(experiment(total_env_steps=600))
    train(first, tmp_path, progress=False)
    saved = np.load(checkpoints.newest_set(tmp_path / "checkpoints")[0] / "replay.npz")
    saved_rewards, saved_updates = saved["rewards"].copy(), metrics(tmp_path)[-1]["learner/updates"]

    second = parse_experiment(experiment(total_env_steps=1200))
    summary = train(second, tmp_path, progress=False, resume=True)
    rows = metrics(tmp_path)
    steps = [row["env_steps"] for row in rows]
    assert steps == sorted(steps) and steps[-1] == 1200 and 600 in steps
    assert rows[-1]["learner/updates"] > saved_updates
    assert summary["env_steps"] == 1200
    resumed = np.load(checkpoints.newest_set(tmp_path / "checkpoints")[0] / "replay.npz")
    np.testing.assert_array_equal(resumed["rewards"][:600], saved_rewards)
    assert len(resumed["rewards"]) == 1200


def test_the_kitchen_fmer_experiment_runs_end_to_end_with_task_metrics(tmp_path):
    """The shipped 4-task FMER kitchen file, shrunk to 300 env steps: updates, a checkpoint, evaluation and the
    task metrics (random and early arm motions open nothing, so they are 0; tests/actors/test_envs.py checks
    that a real completion counts)."""
    experiment_file = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "kitchen-4task-fmer.yaml"
    config = load_experiment(experiment_file, [
        "total_env_steps=300", "log_every_steps=100", "env.kwargs.max_episode_steps=50", "actors.count=1",
        "actors.num_cpus=0.5", "actors.candidates=4", "algorithm.batch_size=16", "algorithm.num_candidates=4",
        "algorithm.flow={hidden: [32, 32], steps: 3}", "algorithm.critic={hidden: [32, 32]}",
        "learner.learning_starts=100", "learner.checkpoint_every=50", "learner.num_cpus=0.5", "learner.num_gpus=0",
        "replay.updates_per_step=0.5", "eval.every_steps=200", "eval.episodes=1", "wandb.mode=disabled"])
    summary = train(config, tmp_path, progress=False)
    rows = metrics(tmp_path)
    assert rows[-1]["env_steps"] == summary["env_steps"] == 300 and summary["updates"] > 0
    assert checkpoints.newest_set(tmp_path / "checkpoints")[0] is not None
    completed = [row["train/tasks_completed"] for row in rows if "train/tasks_completed" in row]
    assert completed and all(value == 0.0 for value in completed)
    assert all(row["train/task_fraction"] == 0.0 for row in rows if "train/tasks_completed" in row)
    assert summary["eval/tasks_completed"] == summary["eval/task_fraction"] == summary["eval/success_rate"] == 0.0
    assert summary["eval/episode_return_single"] == summary["eval/episode_return"] == 0.0
    assert summary["eval/episode_length"] == 50.0 and any("learner/weight_ess" in row for row in rows)


def test_a_config_the_cluster_cannot_place_fails_fast(tmp_path):
    from softflow.deploy.config import ConfigError

    config = parse_experiment(experiment(actors={"count": 8, "num_cpus": 1}))
    with pytest.raises(ConfigError, match=r"needs 8.5 CPUs but the Ray cluster has 4"):
        train(config, tmp_path, progress=False)



def test_a_custom_resource_the_cluster_lacks_fails_fast(tmp_path):
    from softflow.deploy.config import ConfigError

    config = parse_experiment(experiment(actors={"resources": {"rollout": 1}}))
    with pytest.raises(ConfigError, match=r"needs 2 of the custom resource 'rollout' .* the Ray cluster has 0"):
        train(config, tmp_path, progress=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("actors", [2, 0], ids=["ray", "serial"])
def test_sigterm_leaves_a_checkpoint_and_resume_finishes_from_that_step(tmp_path, actors):
    """The real command in a subprocess, periodic checkpoints off: SIGTERM once 400 steps are logged ends it with
    exit 1, one line and a checkpoint at the step where it stopped; ``--resume`` finishes the budget from there,
    with env_steps increasing through metrics.jsonl."""
    (tmp_path / "exp.yaml").write_text(json.dumps(experiment(
        total_env_steps=1500, actors={"count": actors}, learner={"checkpoint_every": 10**9})))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "softflow.deploy.cli", "train"]
    run = subprocess.Popen([*command, str(tmp_path / "exp.yaml"), "--run-dir", str(run_dir), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and any(r["env_steps"] >= 400 for r in metrics(run_dir))):
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("softflow:")]
    assert line.startswith("softflow: stopped: stopped by SIGTERM at ") and line.endswith(
        f"Continue it with: softflow train --resume {run_dir}")
    stopped_at = int(line.split(" at ")[1].split()[0])
    newest, _ = checkpoints.newest_set(run_dir / "checkpoints")
    assert 400 <= stopped_at < 1500 and newest.name == f"step-{stopped_at:012d}"

    resumed = subprocess.run([*command, "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = [row["env_steps"] for row in metrics(run_dir)]
    assert steps == sorted(steps) and steps[-1] == 1500
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 1500


@pytest.mark.timeout(600)
def test_a_driver_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    """The real command in serial mode, SIGKILLed (no handler runs) once a checkpoint set exists past 400 steps:
    ``--resume`` starts from the newest whole set and finishes the budget; metrics.jsonl's env_steps never go back."""
    (tmp_path / "exp.yaml").write_text(json.dumps(experiment(
        total_env_steps=1500, actors={"count": 0}, learner={"checkpoint_every": 200})))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "softflow.deploy.cli", "train"]
    run = subprocess.Popen([*command, str(tmp_path / "exp.yaml"), "--run-dir", str(run_dir), "--no-progress"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        newest, _ = checkpoints.newest_set(run_dir / "checkpoints")
        if newest is not None and int(newest.name.split("-")[1]) >= 400:
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    newest, _ = checkpoints.newest_set(run_dir / "checkpoints")
    killed_at = int(newest.name.split("-")[1])
    assert 400 <= killed_at < 1500

    resumed = subprocess.run([*command, "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    steps = [row["env_steps"] for row in metrics(run_dir)]
    assert steps == sorted(steps) and steps[-1] == 1500
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 1500
