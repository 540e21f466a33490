"""Smoke tests of the serial training driver: a tiny real LQR run (ISFM, and SAC through the same registry) and
the contents of its run directory: config.yaml, metrics.jsonl, checkpoints and lqr.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from softflow.actors.envs import make_env
from softflow.actors.evaluate import evaluate
from softflow.actors.lqr import soft_lqr_solution
from softflow.actors.replay import ReplayBuffer
from softflow.algorithms import make_algorithm
from softflow.deploy.config import ExperimentConfig, parse_experiment, read_yaml, set_override
from softflow.deploy.driver import train

EXPERIMENT = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-isfm.yaml"

TOTAL, STARTS, LOG_EVERY, UTD = 600, 200, 200, 0.25
TINY = [
    f"total_env_steps={TOTAL}", f"learner.learning_starts={STARTS}", f"log_every_steps={LOG_EVERY}",
    "eval.every_steps=300", "eval.episodes=1", "learner.checkpoint_every=100", "algorithm.batch_size=32",
    "env.horizon=20", f"replay.updates_per_step={UTD}", "learner.device=cpu",
]
ISFM_ONLY = ["algorithm.num_candidates=4", "algorithm.flow.steps=3"]
EXPECTED_UPDATES = int(UTD * (TOTAL - STARTS))


def tiny_config(name: str) -> ExperimentConfig:
    """The shipped experiment made tiny; for SAC the ISFM-only keys are dropped from the tree."""
    tree = read_yaml(EXPERIMENT)
    for assignment in TINY:
        set_override(tree, assignment)
    if name == "isfm":
        for assignment in ISFM_ONLY:
            set_override(tree, assignment)
    else:
        for key in ("num_candidates", "flow"):
            del tree["algorithm"][key]
        tree["algorithm"]["name"] = name
    return parse_experiment(tree)


@pytest.fixture(scope="module", params=["isfm", "sac"])
def run(request, tmp_path_factory):
    """(config, run_dir, summary) of one tiny training run per algorithm."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(request.param)
        assert config.algorithm.name == request.param
        run_dir = tmp_path_factory.mktemp(request.param) / "run"
        summary = train(config, run_dir, progress=False)
    finally:
        torch.set_num_threads(threads)
    return config, run_dir, summary


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(row, dict) for row in rows)
    return rows


def test_smoke_summary(run):
    config, run_dir, summary = run
    assert summary["env_steps"] == TOTAL and summary["updates"] == EXPECTED_UPDATES
    assert summary["eval/episode_length"] == config.env.horizon
    assert np.isfinite(summary["eval/episode_return"]) and summary["eval/episode_return"] < 0  # LQR rewards < 0
    assert json.loads((run_dir / "summary.json").read_text()) == pytest.approx(summary)


def test_smoke_config_yaml_round_trips(run):
    config, run_dir, _ = run
    assert parse_experiment(yaml.safe_load((run_dir / "config.yaml").read_text())) == config


def test_smoke_metrics_jsonl(run):
    config, run_dir, _ = run
    rows = read_metrics(run_dir)
    steps = [row["env_steps"] for row in rows]
    assert all(type(s) is int for s in steps)
    assert steps == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))  # one report per log_every_steps, increasing
    required = {"train/episode_return", "learner/updates", "losses/q_loss", "actors/env_steps_per_s",
                "replay/size"}
    if config.algorithm.name == "isfm":
        required.add("learner/weight_ess")
    assert required <= set().union(*rows)
    assert required <= set(rows[-1])  # after learning starts every report carries the learner's metrics
    for row in rows:
        s = row["env_steps"]
        assert row["learner/updates"] == max(0, int(UTD * (s - STARTS)))
        assert row["replay/size"] == s  # capacity 100000: nothing is evicted
        assert row["actors/env_steps_per_s"] > 0
        # horizon 20 divides every report interval: each report saw whole episodes of exactly 20 steps
        assert row["train/episode_length"] == config.env.horizon
        assert all(np.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    assert "losses/q_loss" not in rows[0]  # no updates before learning_starts
    if config.algorithm.name == "isfm":
        ess = [row["learner/weight_ess"] for row in rows if "learner/weight_ess" in row]
        assert ess and all(0.0 < e <= 1.0 + 1e-6 for e in ess)  # normalised effective sample size


def test_smoke_checkpoints(run):
    config, run_dir, summary = run
    latest, replay_path = run_dir / "checkpoints" / "latest.pt", run_dir / "checkpoints" / "replay.npz"
    assert latest.is_file() and replay_path.is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    state = torch.load(latest, weights_only=False, map_location="cpu")
    assert {"algorithm", "env_steps", "updates"} <= set(state)
    assert state["env_steps"] == TOTAL and state["updates"] == EXPECTED_UPDATES
    assert state["algorithm"]["num_updates"] == EXPECTED_UPDATES
    assert state["config"] == config.model_dump(mode="json")
    replay = ReplayBuffer.load(replay_path)
    assert len(replay) == TOTAL
    # The checkpoint holds the final policy: a restored algorithm replays the final deterministic evaluation.
    env = make_env(config.env)
    low, high = env.action_space.low.reshape(-1), env.action_space.high.reshape(-1)
    restored = make_algorithm(config.algorithm, env.observation_space.shape[0], low, high, "cpu")
    restored.load_state_dict(state["algorithm"])
    again = evaluate(env, restored.act, config.eval.episodes, seed=config.seed + 20_000)
    assert again["eval/episode_return"] == pytest.approx(summary["eval/episode_return"], rel=1e-5)


def test_smoke_lqr_json(run):
    config, run_dir, summary = run
    report = json.loads((run_dir / "lqr.json").read_text())
    K, Sigma = np.array(report["K"]), np.array(report["Sigma"])
    K_star, Sigma_star = np.array(report["K_star"]), np.array(report["Sigma_star"])
    assert K.shape == (1, 2) and K_star.shape == (1, 2)
    assert Sigma.shape == (1, 1) and Sigma_star.shape == (1, 1)
    assert Sigma[0, 0] > 0 and Sigma_star[0, 0] > 0
    rel_K = np.linalg.norm(K - K_star) / np.linalg.norm(K_star)
    rel_Sigma = np.linalg.norm(Sigma - Sigma_star) / np.linalg.norm(Sigma_star)
    assert report["rel_err_K"] == pytest.approx(rel_K, rel=1e-12)
    assert report["rel_err_Sigma"] == pytest.approx(rel_Sigma, rel=1e-12)
    assert summary["lqr/rel_err_K"] == report["rel_err_K"]
    assert summary["lqr/rel_err_Sigma"] == report["rel_err_Sigma"]
    # The optimum is the closed form for the run's own gamma and its final alpha (fixed: autotune is off).
    assert report["gamma"] == config.algorithm.gamma
    assert report["alpha"] == pytest.approx(config.algorithm.alpha, rel=1e-6)
    e = config.env
    optimum = soft_lqr_solution(e.A, e.B, e.Q, e.R, config.algorithm.gamma, report["alpha"])
    np.testing.assert_allclose(K_star, optimum.K, rtol=1e-12)
    np.testing.assert_allclose(Sigma_star, optimum.Sigma, rtol=1e-12)
