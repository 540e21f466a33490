"""Smoke tests of ``softflow train``: a tiny real LQR run through the installed command in a subprocess (ISFM, and
SAC by replacing the algorithm section in an override) and the contents of its run directory: config.yaml,
metrics.jsonl, checkpoints, summary.json and lqr.json. Each run takes about 7 s, half of it importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from softflow import checkpoints
from softflow.actors.envs import make_env
from softflow.actors.evaluate import evaluate
from softflow.actors.lqr import soft_lqr_solution
from softflow.actors.replay import ReplayBuffer
from softflow.algorithms import make_algorithm
from softflow.deploy.config import dump_config, load_experiment, parse_experiment

EXPERIMENT = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-isfm.yaml"
SCRIPT = Path(sys.executable).with_name("softflow")

TOTAL, STARTS, LOG_EVERY, UTD, EVAL_EVERY, CHECKPOINT_EVERY = 300, 100, 100, 0.5, 150, 40
TINY = [
    f"total_env_steps={TOTAL}", f"learner.learning_starts={STARTS}", f"log_every_steps={LOG_EVERY}",
    f"eval.every_steps={EVAL_EVERY}", "eval.episodes=1", f"learner.checkpoint_every={CHECKPOINT_EVERY}",
    "algorithm.batch_size=32", "env.horizon=20", f"replay.updates_per_step={UTD}", "learner.num_gpus=0",
]
# Before TINY: the whole algorithm section is replaced (SAC has no flow or num_candidates), then TINY applies on top.
ALGORITHM_OVERRIDES = {
    "isfm": ["algorithm.num_candidates=4", "algorithm.flow.steps=3", "algorithm.flow.hidden=[32,32]"],
    "sac": ["algorithm={name: sac, gamma: 0.9, alpha: 0.05, autotune_alpha: false, hidden: [32, 32]}"],
}
EXPECTED_UPDATES = int(UTD * (TOTAL - STARTS))


@pytest.fixture(scope="module", params=["isfm", "sac"])
def run(request, tmp_path_factory):
    """(config, run_dir, summary) of one tiny ``softflow train`` run per algorithm."""
    overrides = [*ALGORITHM_OVERRIDES[request.param], *TINY]
    config = load_experiment(EXPERIMENT, overrides)
    assert config.algorithm.name == request.param
    cwd = tmp_path_factory.mktemp(request.param)
    run_dir = cwd / "run"
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    result = subprocess.run(
        [*command, "train", str(EXPERIMENT), *overrides, "--run-dir", str(run_dir), "--no-progress"],
        cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert first == f"softflow: training 'lqr-isfm' ({request.param} on LQR); run directory {run_dir}"
    summary = json.loads(rest)  # the final report, printed as JSON after the first line
    assert not (cwd / "runs").exists()  # --run-dir replaces the default runs/<name>-<time>
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
    assert json.loads((run_dir / "summary.json").read_text()) == summary  # what the command printed


def test_smoke_config_yaml_has_the_overrides_and_reloads(run):
    config, run_dir, _ = run
    text = (run_dir / "config.yaml").read_text()
    assert text == dump_config(config)
    assert parse_experiment(yaml.safe_load(text)) == config
    again = load_experiment(run_dir / "config.yaml")  # an experiment file in its own right
    assert again == config
    assert (again.total_env_steps, again.learner.learning_starts, again.log_every_steps) == (TOTAL, STARTS, LOG_EVERY)
    assert (again.algorithm.batch_size, again.env.horizon, again.replay.updates_per_step) == (32, 20, UTD)
    assert again.learner.num_gpus == 0 and again.eval.episodes == 1
    assert again.env.A == [[1.0, 0.1], [0.0, 0.9]] and again.algorithm.gamma == 0.9  # the file's own values
    if config.algorithm.name == "isfm":
        assert again.algorithm.flow.steps == 3 and again.algorithm.flow.hidden == [32, 32]
        file_q_lr = yaml.safe_load(EXPERIMENT.read_text())["algorithm"]["q_lr"]
        assert again.algorithm.num_candidates == 4 and again.algorithm.q_lr == file_q_lr  # the file's own value
    else:
        assert again.algorithm.hidden == [32, 32] and again.algorithm.q_lr == 1e-3  # SAC's default


def test_smoke_metrics_jsonl(run):
    config, run_dir, _ = run
    rows = read_metrics(run_dir)
    steps = [row["env_steps"] for row in rows]
    assert all(type(s) is int for s in steps)
    assert steps == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))  # one report per log_every_steps, increasing
    always = {"env_steps", "train/episode_return", "train/episode_length", "learner/updates",
              "learner/updates_per_s", "actors/env_steps_per_s", "replay/size"}
    learner = {"losses/q_loss", "learner/q_mean", "learner/alpha"}
    if config.algorithm.name == "isfm":  # policy_frequency 1: every update also steps the policy
        learner |= {"losses/policy_loss", "learner/entropy", "learner/weight_ess"}
    evaluation = {"eval/episode_return", "eval/episode_length"}
    # No updates before learning_starts and no evaluation before eval.every_steps (eval/restarts, the evaluator's
    # deaths, is counted from the start); evaluations at 150 and 300.
    assert always <= set(rows[0]) and rows[0]["eval/restarts"] == 0, rows[0]
    assert not [k for k in rows[0] if k.startswith(("losses/", "eval/")) and k != "eval/restarts"], rows[0]
    assert not learner & set(rows[0])
    assert always | learner | evaluation <= set(rows[1]) and always | learner | evaluation <= set(rows[2])
    for row in rows:
        s = row["env_steps"]
        assert row["learner/updates"] == max(0, int(UTD * (s - STARTS)))
        assert row["replay/size"] == s  # capacity 100000: nothing is evicted
        assert row["actors/env_steps_per_s"] > 0
        assert (row["learner/updates_per_s"] > 0) == (s > STARTS)
        # horizon 20 divides every report interval: each report saw whole episodes of exactly 20 steps
        assert row["train/episode_length"] == config.env.horizon
        assert row["train/episode_return"] < 0  # LQR rewards are negative
        assert all(np.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    for row in rows[1:]:
        assert row["learner/alpha"] == pytest.approx(config.algorithm.alpha)  # autotune_alpha is off
        assert row["eval/episode_length"] == config.env.horizon and row["eval/episode_return"] < 0
    if config.algorithm.name == "isfm":
        ess = [row["learner/weight_ess"] for row in rows if "learner/weight_ess" in row]
        assert ess and all(0.0 < e <= 1.0 + 1e-6 for e in ess)  # normalised effective sample size


def test_smoke_checkpoints(run):
    config, run_dir, summary = run
    newest, skipped = checkpoints.newest_set(run_dir / "checkpoints")
    assert newest is not None and newest.name == f"step-{TOTAL:012d}" and not skipped
    sets = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(sets) == config.learner.keep_checkpoints and all(s.startswith("step-") for s in sets)
    latest, replay_path = newest / "learner.pt", newest / "replay.npz"
    state = checkpoints.load(latest)
    assert {"algorithm", "driver", "updates", "config", "spaces"} <= set(state)
    assert state["driver"]["env_steps"] == TOTAL and state["updates"] == EXPECTED_UPDATES
    assert state["algorithm"]["num_updates"] == EXPECTED_UPDATES
    assert state["config"] == config.model_dump(mode="json")
    replay = ReplayBuffer.load(replay_path)
    assert len(replay) == TOTAL
    # The checkpoint holds the final policy: a restored algorithm replays the final deterministic evaluation.
    env = make_env(config.env)
    low, high = env.action_space.low.reshape(-1), env.action_space.high.reshape(-1)
    restored = make_algorithm(config.algorithm, env.observation_space.shape[0], low, high, "cpu")
    restored.load_state_dict(state["algorithm"])
    again = evaluate(env, restored.act, config.eval.episodes, seed=config.seed + 10_000)  # the evaluator's seeds
    assert again["eval/episode_return"] == pytest.approx(summary["eval/episode_return"], rel=1e-5)


def test_smoke_lqr_json(run):
    config, run_dir, summary = run
    report = json.loads((run_dir / "lqr.json").read_text())
    assert set(report) == {"alpha", "gamma", "K", "Sigma", "bias", "K_star", "Sigma_star", "P", "target",
                           "Sigma_target", "rel_err_K", "rel_err_Sigma", "rel_err_Sigma_soft", "num_states",
                           "samples_per_state"}
    assert report["target"] == "soft_optimum"
    assert (report["num_states"], report["samples_per_state"]) == (2048, 32) and len(report["bias"]) == 1
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
    np.testing.assert_allclose(report["P"], optimum.P, rtol=1e-12)


def test_a_serial_run_resumes_to_a_larger_budget(run, tmp_path):
    """``softflow train --resume RUN_DIR total_env_steps=...`` on a serial run (a copy of the fixture's): the
    counters, the buffer and the update-to-data ratio carry on, the metrics continue in order, and the LQR
    report is rewritten at the new end."""
    import shutil

    config, run_dir, _ = run
    resumed_dir = tmp_path / "run"
    shutil.copytree(run_dir, resumed_dir)
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    result = subprocess.run([*command, "train", "--resume", str(resumed_dir), f"total_env_steps={TOTAL + 200}",
                             "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.partition("\n")[2])
    assert summary["env_steps"] == TOTAL + 200 and summary["updates"] == int(UTD * (TOTAL + 200 - STARTS))
    rows = read_metrics(resumed_dir)
    assert [row["env_steps"] for row in rows] == list(range(LOG_EVERY, TOTAL + 200 + 1, LOG_EVERY))
    assert [row["learner/updates"] for row in rows] == [max(0, int(UTD * (r["env_steps"] - STARTS))) for r in rows]
    newest, _ = checkpoints.newest_set(resumed_dir / "checkpoints")
    assert len(ReplayBuffer.load(newest / "replay.npz")) == TOTAL + 200
    assert json.loads((resumed_dir / "lqr.json").read_text())["rel_err_K"] == summary["lqr/rel_err_K"]
    # the resume is recorded, and config.yaml holds the new budget for a later --resume
    (record,) = [json.loads(line) for line in (resumed_dir / "resumes.jsonl").read_text().splitlines()]
    assert record["env_steps"] == TOTAL and record["changed"] == {"total_env_steps": [TOTAL, TOTAL + 200]}
    assert load_experiment(resumed_dir / "config.yaml").total_env_steps == TOTAL + 200


@pytest.mark.parametrize("override", ["algorithm.gamma=0.5", "replay.capacity=1000", "seed=0",
                                      "learner={checkpoint_every: 5, publish_every: 3}"])
def test_a_resume_that_would_change_the_experiment_is_refused_and_touches_nothing(run, override):
    """Only the keys of deploy/run/resumes.py's RESUMABLE may change on resume: any other (even to the value it
    has) ends with one line naming it and the allowed set, exit 2, every file of the run unchanged."""
    _, run_dir, _ = run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    result = subprocess.run([*command, "train", "--resume", str(run_dir), "total_env_steps=400", override,
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    key = override.split("=")[0].replace("learner", "learner.publish_every")
    assert result.stderr.startswith(f"softflow: error: --resume {run_dir}: {key} cannot change when a run is resumed")
    assert "total_env_steps, log_every_steps, eval.*, wandb.*, actors.count" in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("actors", [0, 1])
def test_a_fresh_run_into_a_run_directory_is_refused_and_touches_nothing(run, actors):
    """Serial mode and the Ray runtime alike: exit 2, one line naming --resume and a free directory; every file of
    the old run unchanged."""
    _, run_dir, _ = run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    result = subprocess.run([*command, "train", str(EXPERIMENT), f"actors.count={actors}", "--run-dir",
                             str(run_dir), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"--resume {run_dir}" in result.stderr and f"--run-dir {run_dir}-2" in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_default_run_directories_of_runs_started_together_differ():
    from softflow.deploy.run.driver import default_run_dir

    config = load_experiment(EXPERIMENT)
    assert len({default_run_dir(config) for _ in range(50)}) == 50


def test_resuming_through_the_python_api_refuses_a_changed_experiment_too(run):
    from softflow.deploy.config import ConfigError
    from softflow.deploy.run.driver import train

    config, run_dir, _ = run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changed = parse_experiment(config.model_dump(mode="json") | {"seed": config.seed + 1})
    with pytest.raises(ConfigError, match=r"seed cannot change when a run is resumed \(only total_env_steps, "):
        train(changed, run_dir, progress=False, resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
