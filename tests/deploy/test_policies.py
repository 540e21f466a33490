"""softflow.load_policy and `softflow evaluate` on a real (short, serial) training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import softflow
from softflow import checkpoints
from softflow.deploy.config import ConfigError
from softflow.deploy.run.driver import train

SCRIPT = Path(sys.executable).with_name("softflow")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_experiment) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_experiment(name="policy-io"), run_dir, progress=False)
    return run_dir


def test_load_policy_restores_the_trained_networks(run_dir):
    state = checkpoints.load(checkpoints.newest_set(run_dir / "checkpoints")[0] / "learner.pt")
    policy = softflow.load_policy(run_dir)
    assert policy.candidates == 4
    for name, value in policy.algorithm.policy.state_dict().items():
        torch.testing.assert_close(value, state["algorithm"]["policy"][name], rtol=0, atol=0)
    obs = np.array([0.01, -0.02, 0.0, 0.1], dtype=np.float32)
    assert policy.sample(obs, 5).shape == (5, 1) and policy.sample(np.stack([obs] * 3), 5).shape == (3, 5, 1)
    action = policy.act(obs)
    assert action.shape == (1,) and -3.0 <= float(action[0]) <= 3.0
    # best-of-N: under the same seed, act returns the candidate with the highest min(Q1, Q2)
    torch.manual_seed(7)
    candidates = torch.as_tensor(policy.sample(obs, 4))
    torch.manual_seed(7)
    chosen = policy.act(obs)
    q = policy.algorithm.critic.min_q(torch.as_tensor(obs).expand(4, -1), candidates)
    np.testing.assert_allclose(chosen, candidates[q.argmax()].numpy())


def test_a_checkpoint_file_loads_like_its_run_directory(run_dir):
    obs = np.zeros((2, 4), dtype=np.float32)
    torch.manual_seed(0)
    from_dir = softflow.load_policy(run_dir).act(obs)
    torch.manual_seed(0)
    from_file = softflow.load_policy(checkpoints.newest_set(run_dir / "checkpoints")[0] / "learner.pt").act(obs)
    np.testing.assert_array_equal(from_dir, from_file)


def test_evaluate_command_prints_a_json_summary(run_dir):
    result = subprocess.run([str(SCRIPT), "evaluate", str(run_dir), "--episodes", "2"], capture_output=True,
                            text=True, check=True, timeout=120)
    summary = json.loads(result.stdout)
    assert summary["episodes"] == 2 and summary["env"] == "InvertedPendulum-v5" and summary["candidates"] == 4
    # InvertedPendulum pays 1 per step before the pole falls, 0 on the step it falls
    assert summary["eval/episode_return"] in (summary["eval/episode_length"], summary["eval/episode_length"] - 1)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "no/such/run"], "softflow: error: no checkpoint at no/such/run: give a run directory"),
    (["evaluate", "RUN", "--episodes", "0"], "softflow: error: --episodes: must be an integer >= 1 (got '0')"),
])
def test_evaluate_bad_input_is_one_line(run_dir, args, message):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0] and result.stderr.startswith(message)


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "learner.pt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a softflow checkpoint"):
        softflow.load_policy(bogus)
