"""Failures at run time end ``softflow train`` with one line and no traceback: an env that cannot be built (exit 2,
nothing written), an env that returns NaN or infinite observations or rewards (exit 1, the checkpoints written
before kept; serial and on Ray), and a run directory that cannot be written (at the start: exit 2, nothing written;
during the run: exit 1, the checkpoints kept). A rollout actor that keeps dying is tests/deploy/test_actor_deaths.py's.
"""

from __future__ import annotations

import errno
import os

import gymnasium
import numpy as np
import pytest
from helpers import tiny_experiment

from softflow import checkpoints
from softflow.deploy.cli import main
from softflow.deploy.config import dump_config
from softflow.deploy.run.metrics import MetricsLogger

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
NAN_AFTER = 250  # env steps before the injected NaN: after the first checkpoint (50 updates from step 100)
NAN_ENV = "softflow-test/NaNPendulum-v0"


class NonFiniteAfter(gymnasium.Wrapper):
    """Returns a NaN observation (or an infinite reward) from its ``after``-th step on, counted across episodes."""

    def __init__(self, env: gymnasium.Env, after: int = NAN_AFTER, what: str = "observation"):
        super().__init__(env)
        self.after, self.what, self.steps = after, what, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps >= self.after:
            obs, reward = (obs * np.nan, reward) if self.what == "observation" else (obs, np.inf)
        return obs, reward, terminated, truncated, info


def _nan_pendulum(what: str = "observation", **kwargs) -> gymnasium.Env:
    return NonFiniteAfter(gymnasium.make("InvertedPendulum-v5", **kwargs), what=what)


gymnasium.register(NAN_ENV, entry_point=_nan_pendulum)


def softflow_train(tmp_path, capsys, *overrides: str, run_dir=None, **sections) -> tuple[int, list[str], str]:
    """``softflow train`` in this process on a tiny serial experiment (a checkpoint every 50 updates), with
    ``sections`` replacing top-level keys: (exit code, the stderr lines, the run directory)."""
    sections = {"learner": {"learning_starts": 100, "num_gpus": 0, "checkpoint_every": 50}} | sections
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(dump_config(tiny_experiment(**sections)))
    run_dir = str(run_dir or tmp_path / "run")
    code = main(["train", str(experiment), *overrides, "--run-dir", run_dir, "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines(), run_dir


def one_line(lines: list[str], prefix: str) -> str:
    """The one ``softflow:`` line of stderr, which starts with ``prefix``."""
    ours = [line for line in lines if line.startswith("softflow:")]
    assert len(ours) == 1 and ours[0].startswith(prefix), lines
    return ours[0]


@pytest.mark.parametrize("actors", [0, 2])
@pytest.mark.parametrize("kwargs, cause", [("{no_such_keyword: 1}", "has no argument 'no_such_keyword'"),
                                           ("{reset_noise_scale: abc}", "TypeError: bad operand type")])
def test_an_env_that_cannot_be_built_is_refused_before_anything_is_written(tmp_path, capsys, actors, kwargs, cause):
    code, lines, run_dir = softflow_train(tmp_path, capsys, f"env.kwargs={kwargs}", f"actors.count={actors}")
    line = one_line(lines, "softflow: error: env InvertedPendulum-v5 could not be built")
    assert code == 2 and cause in line and line.endswith("check env.id and env.kwargs")
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize("what", ["observation", "reward"])
def test_a_non_finite_env_stops_the_run_with_its_checkpoint_kept(tmp_path, capsys, what):
    code, lines, run_dir = softflow_train(tmp_path, capsys, env={"id": NAN_ENV, "kwargs": {"what": what}})
    line = one_line(lines, f"softflow: stopped: env {NAN_ENV} returned a non-finite {what} at step ")
    assert code == 1 and "(unstable physics?)" in line and f"softflow train --resume {run_dir}" in line
    newest, skipped = checkpoints.newest_set(tmp_path / "run" / "checkpoints")
    assert newest is not None and not skipped and f"its last checkpoint ({newest.name}) is kept" in line


@pytest.mark.ray
@pytest.mark.usefixtures("ray_runtime")
def test_a_diverging_lqr_system_stops_a_run_on_ray(tmp_path, capsys):
    """x' = 5x: the random actions of the first episode let the state overflow float32 within 60 steps; the
    rollout actor's error reaches the driver through Ray and ends the run with the same one line."""
    lqr = {"id": "LQR", "A": [[5.0]], "B": [[1.0]], "Q": [[1.0]], "R": [[1.0]], "W": [[0.01]], "horizon": 100}
    code, lines, _ = softflow_train(
        tmp_path, capsys, env=lqr, algorithm={"name": "sac", "gamma": 0.9, "batch_size": 32, "hidden": [16, 16],
                                              "critic": {"hidden": [16, 16]}},
        actors={"count": 1, "num_cpus": 0.5, "fragment_length": 10}, learner={"learning_starts": 500, "num_gpus": 0,
                                                                              "num_cpus": 0.5})
    line = one_line(lines, "softflow: stopped: env LQR returned a non-finite")
    assert code == 1 and line.endswith("before its first checkpoint. Check the env settings (env.kwargs, an LQR "
                                       "system), then start it afresh")


def test_a_run_directory_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    code, lines, _ = softflow_train(tmp_path, capsys, run_dir=tmp_path / "a-file" / "run")
    line = one_line(lines, f"softflow: error: the run directory {tmp_path / 'a-file' / 'run'} cannot be created")
    assert code == 2 and "is a file, not a directory" in line
    assert (tmp_path / "a-file").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the file case covers this")
def test_a_run_directory_in_a_read_only_parent_is_refused(tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    code, lines, _ = softflow_train(tmp_path, capsys, run_dir=parent / "run")
    assert code == 2 and "cannot be written" in one_line(lines, "softflow: error: the run directory")
    assert not any(parent.iterdir())


def test_a_run_directory_that_stops_taking_writes_stops_the_run_with_its_checkpoint_kept(tmp_path, capsys,
                                                                                         monkeypatch):
    """The second metrics record (at 200 env steps, after the first checkpoint) meets a read-only file system."""
    log = MetricsLogger.log

    def read_only_after_first(self, env_steps, metrics):
        if env_steps > 100:
            raise OSError(errno.EROFS, "Read-only file system", str(self.metrics_path))
        log(self, env_steps, metrics)

    monkeypatch.setattr(MetricsLogger, "log", read_only_after_first)
    code, lines, run_dir = softflow_train(tmp_path, capsys)
    line = one_line(lines, f"softflow: stopped: could not write to {run_dir}/metrics.jsonl (Read-only file system)")
    assert code == 1 and f"Make {run_dir} writable (or free space), then continue it with" in line
    assert checkpoints.newest_set(tmp_path / "run" / "checkpoints")[0] is not None


def test_evaluating_a_policy_in_an_env_that_turns_non_finite_stops_with_one_line(tmp_path, capsys):
    """``softflow evaluate`` of a trained run whose env returns a NaN observation from its 250th step on (reached
    across the evaluation's episodes): one line, exit 1, nothing printed on stdout."""
    code, _, run_dir = softflow_train(tmp_path, capsys, f"env.id={NAN_ENV}", "eval.episodes=1", total_env_steps=120)
    assert code == 0
    code = main(["evaluate", run_dir, "--episodes", "500"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("softflow: stopped: env ") and "non-finite observation" in line, line
