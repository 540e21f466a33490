"""The MuJoCo experiment matrix (cluster/experiments/mujoco/): every algorithm on every task, as the generator
writes it, accepted by the loader; in the slow suite each cell trains for a few hundred env steps in serial mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from softflow.deploy.config import load_experiment
from softflow.deploy.run.driver import train

MATRIX = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "mujoco"
ALGORITHMS = ["sac", "isfm", "fmer", "sacflow", "flame"]
TASKS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5",
         "humanoid": "Humanoid-v5"}
CELLS = [(task, algorithm) for task in TASKS for algorithm in ALGORITHMS]


def test_the_files_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(MATRIX / "generate.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_algorithm_has_every_task_and_nothing_else():
    assert sorted(p.name for p in MATRIX.glob("*.yaml")) == sorted(f"{t}-{a}.yaml" for t, a in CELLS)


@pytest.mark.parametrize(("task", "algorithm"), CELLS)
def test_each_cell_loads_with_its_task_and_algorithm(task, algorithm):
    config = load_experiment(MATRIX / f"{task}-{algorithm}.yaml")
    assert (config.env.id, config.algorithm.name, config.name) == (TASKS[task], algorithm, f"{task}-{algorithm}")
    assert config.total_env_steps == 1_000_000 and config.eval.every_steps == 10_000


@pytest.mark.slow
@pytest.mark.parametrize(("task", "algorithm"), CELLS)
def test_each_cell_trains_a_few_hundred_steps(task, algorithm, tmp_path):
    """The file's algorithm settings unchanged (batches of up to 512), the budget shrunk to 40 updates after 520
    random steps, in this process (serial mode)."""
    config = load_experiment(MATRIX / f"{task}-{algorithm}.yaml", [
        "total_env_steps=600", "log_every_steps=200", "learner.learning_starts=520", "actors.count=0",
        "replay.capacity=1000", "replay.updates_per_step=0.5", "eval.every_steps=600", "eval.episodes=1",
        "env.kwargs={max_episode_steps: 50}", "wandb.mode=disabled"])
    summary = train(config, tmp_path, progress=False)
    assert summary["env_steps"] == 600 and summary["updates"] == 40
    assert "eval/episode_return" in summary and "eval/episode_return_single" in summary
