"""Tests of live sweeps: each trial reports to Tune at every log interval with its newest checkpoint set (the
reporting callback alone, then a real two-trial ASHA sweep on a tiny LQR experiment), the scheduler and retry fields
of sweep files checked like the others, and ``softflow sweep --resume`` finishing a sweep whose driver was killed
(SIGKILL) after its first trial, without running that trial again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from softflow import checkpoints
from softflow.deploy.cli import USAGE_ERROR, main
from softflow.deploy.sweep.schedulers import SchedulerConfig, build_scheduler
from softflow.deploy.sweep.trial import TrialReporter

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
LQR = REPO / "cluster" / "experiments" / "lqr-isfm.yaml"
# lqr-isfm in serial mode, 500 env steps in 5 log intervals, a checkpoint every 20 updates, small networks.
TINY = {"total_env_steps": 500, "log_every_steps": 100, "learner.learning_starts": 100,
        "learner.checkpoint_every": 20, "eval": {"every_steps": 200, "episodes": 1}, "wandb.mode": "disabled",
        "actors.fragment_length": 10, "algorithm.flow.hidden": [16], "algorithm.batch_size": 16}


def sweep_file(path: Path, **fields) -> Path:
    tree = {"experiment": str(LQR), "metric": "env_steps", "mode": "max", "max_concurrent_trials": 1,
            "overrides": TINY, "space": {"seed": {"grid": [0, 1]}}, **fields}
    path.write_text(yaml.safe_dump(tree))
    return path


def softflow(args: list[str], cwd: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "softflow.deploy.cli", *args], cwd=cwd, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **kwargs)


def seal(run_dir: Path, env_steps: int) -> Path:
    """A checkpoint set as the run writes one (a learner.pt and a manifest)."""
    staging = checkpoints.staging_path(run_dir / "checkpoints", env_steps)
    staging.mkdir(parents=True)
    (staging / checkpoints.LEARNER_FILE).write_bytes(b"state")
    return checkpoints.commit_set(staging, env_steps, env_steps // 10, keep=2)


# -- the reporting callback --------------------------------------------------------------------------------------

def test_reporter_reports_each_interval_carries_the_metric_and_hands_each_new_checkpoint_once(tmp_path):
    calls = []
    reporter = TrialReporter(tmp_path, "eval/episode_return", "000_seed=0",
                             report=lambda result, checkpoint=None: calls.append((result, checkpoint)))
    reporter(100, {"train/episode_return": -5.0, "learner/device": "cpu", "flag": True})
    seal(tmp_path, 200)
    reporter(200, {"eval/episode_return": -3.0})
    reporter(300, {"train/episode_return": -2.0})
    seal(tmp_path, 400)
    reporter(400, {}, {"wall_s": 1.5})
    assert [result["env_steps"] for result, _ in calls] == [100, 200, 300, 400]
    assert calls[0][0] == {"train/episode_return": -5.0, "env_steps": 100, "trial": "000_seed=0",
                           "run_dir": str(tmp_path)}  # numbers only; no metric before the first evaluation
    assert [result.get("eval/episode_return") for result, _ in calls] == [None, -3.0, -3.0, -3.0]
    assert calls[3][0]["wall_s"] == 1.5 and reporter.reports == 4
    handed = [checkpoint and Path(checkpoint.path).name for _, checkpoint in calls]
    assert handed == [None, "step-000000000200", None, "step-000000000400"]


def test_reporter_skips_a_damaged_newest_set(tmp_path):
    calls = []
    reporter = TrialReporter(tmp_path, "env_steps", "t", report=lambda r, checkpoint=None: calls.append(checkpoint))
    (seal(tmp_path, 100) / checkpoints.LEARNER_FILE).write_bytes(b"changed")
    reporter(100, {})
    assert calls == [None]


# -- the scheduler and retry fields ------------------------------------------------------------------------------

def test_schedulers_are_built_with_env_step_or_interval_times():
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining

    assert isinstance(build_scheduler(SchedulerConfig(), "env_steps", "max", 500, 100), FIFOScheduler)
    asha = build_scheduler(SchedulerConfig(name="asha"), "eval/episode_return", "max", 500, 100)
    assert isinstance(asha, AsyncHyperBandScheduler) and asha._time_attr == "env_steps"
    assert asha._max_t == 500 and [m for m, _ in asha._brackets[0]._rungs][-1] == 100  # grace: one interval
    asha = build_scheduler(SchedulerConfig(name="asha", time_attr="training_iteration", grace_period=2),
                           "eval/episode_return", "max", 500, 100)
    assert asha._max_t == 5 and [m for m, _ in asha._brackets[0]._rungs] == [2]
    pbt = build_scheduler(SchedulerConfig(name="pbt", perturbation_interval=1000, hyperparam_mutations={
        "algorithm.q_lr": {"loguniform": [1e-4, 1e-2]}, "actors.candidates": {"choice": [1, 8]}}),
        "eval/episode_return", "max", 500, 100)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._perturbation_interval == 1000
    assert pbt._hyperparam_mutations["actors.candidates"] == [1, 8]


S = "sweep file {file}: "
BAD = [
    ("unknown-scheduler", {"scheduler": {"name": "hyperband"}}, S + "scheduler.name: Input should be 'fifo', 'asha'"),
    ("unknown-scheduler-key", {"scheduler": {"name": "asha", "grace": 2}},
     S + "scheduler.grace: unknown key (a scheduler takes name, time_attr, grace_period"),
    ("zero-grace", {"scheduler": {"name": "asha", "grace_period": 0}},
     S + "scheduler.grace_period: Input should be greater than or equal to 1"),
    ("asha-field-on-fifo", {"scheduler": {"grace_period": 2}},
     S + "scheduler: grace_period applies to scheduler asha only (this one is fifo)"),
    ("pbt-without-interval", {"scheduler": {"name": "pbt", "hyperparam_mutations": {
        "algorithm.q_lr": {"choice": [0.001]}}}}, S + "scheduler: pbt needs perturbation_interval"),
    ("pbt-pinned-key", {"scheduler": {"name": "pbt", "perturbation_interval": 100, "hyperparam_mutations": {
        "algorithm.gamma": {"choice": [0.9]}}}},
     S + "scheduler: hyperparam_mutations: PBT cannot perturb algorithm.gamma"),
    ("pbt-swept-pinned-key", {"scheduler": {"name": "pbt", "perturbation_interval": 100, "hyperparam_mutations": {
        "algorithm.q_lr": {"choice": [0.001]}}}, "space": {"algorithm.gamma": {"grid": [0.9, 0.99]}}},
     S + "scheduler pbt restores one trial's checkpoint into another, so the space may only hold seed and"),
    ("pbt-bad-value", {"scheduler": {"name": "pbt", "perturbation_interval": 100, "hyperparam_mutations": {
        "algorithm.q_lr": {"choice": [-1.0]}}}}, "scheduler.hyperparam_mutations algorithm.q_lr=-1: algorithm.q_lr: "),
    ("retries-below-minus-one", {"max_failures": -2}, S + "max_failures: Input should be greater than or equal to -1"),
]


@pytest.mark.parametrize("fields, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_scheduler_fields_are_one_line_and_exit_code_2(fields, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = sweep_file(tmp_path / "bad.yaml", **fields)
    assert main(["sweep", str(file)]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("softflow: error: " + expected.format(file=file)), err


def test_resume_needs_a_sweep_directory(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path / "nope")]) == USAGE_ERROR
    assert capsys.readouterr().err.startswith("softflow: error: --resume: must be an existing directory")
    assert main(["sweep", "--resume", str(tmp_path)]) == USAGE_ERROR
    assert f"--resume {tmp_path}: no sweep there" in capsys.readouterr().err


# -- real sweeps -------------------------------------------------------------------------------------------------

def tune_results(sweep_dir: Path, trial: str) -> list[dict]:
    lines = (sweep_dir / "tune" / trial / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_asha_sweep_reports_every_log_interval_with_checkpoints(tmp_path):
    """Two trials of 5 log intervals each under ASHA (grace period 2 intervals); about 40 s on 2 cores."""
    file = sweep_file(tmp_path / "asha.yaml", scheduler={"name": "asha", "grace_period": 2,
                                                         "time_attr": "training_iteration"})
    process = softflow(["sweep", str(file), "--sweep-dir", str(tmp_path / "sweep")], tmp_path,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, out + err
    for trial in ("000_seed=0", "001_seed=1"):
        results = tune_results(tmp_path / "sweep", trial)
        assert len(results) >= 5  # one per log interval, then the summary
        assert [r["env_steps"] for r in results[:5]] == [100, 200, 300, 400, 500]
        assert "wall_s" in results[-1] and "wall_s" not in results[0]
        assert [r["training_iteration"] for r in results] == list(range(1, len(results) + 1))
        assert any((tmp_path / "sweep" / "tune" / trial).glob("checkpoint_*/manifest.json"))
    assert "AsyncHyperBand" in out or "ASHA" in out or (tmp_path / "sweep" / "results.csv").is_file()


@pytest.mark.slow
def test_resume_finishes_a_killed_sweep_without_rerunning_finished_trials(tmp_path):
    """The driver is killed (SIGKILL) once the first of two trials has finished; ``--resume`` runs the second to
    the end and leaves the first alone. About 90 s on 2 cores."""
    file = sweep_file(tmp_path / "resume.yaml", max_failures=1)
    sweep_dir = tmp_path / "sweep"
    log = open(tmp_path / "first.log", "w")
    process = softflow(["sweep", str(file), "--sweep-dir", str(sweep_dir)], tmp_path, stdout=subprocess.PIPE,
                       stderr=log, start_new_session=True)
    try:
        for line in process.stdout:
            if "trial 000_seed=0 finished" in line:
                break
        time.sleep(2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        process.wait(timeout=30)
    first = sweep_dir / "000_seed=0"
    finished = (first / "metrics.jsonl").read_text(), (first / "summary.json").stat().st_mtime
    assert not (sweep_dir / "results.csv").exists()

    resumed = subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "sweep", "--resume", str(sweep_dir)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=400,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ((first / "metrics.jsonl").read_text(), (first / "summary.json").stat().st_mtime) == finished
    rows = json.loads((sweep_dir / "results.json").read_text())["trials"]
    assert [(r["trial"], r["status"], r["env_steps"]) for r in rows] == [("000_seed=0", "ok", 500),
                                                                      ("001_seed=1", "ok", 500)]
    assert json.loads((sweep_dir / "001_seed=1" / "summary.json").read_text())["env_steps"] == 500


def test_a_pbt_restore_may_change_the_perturbed_keys_and_loads_the_new_alpha(tmp_path):
    from softflow.algorithms import make_algorithm
    from softflow.deploy.config import ConfigError, dump_config, load_experiment
    from softflow.deploy.run import resumes
    from softflow.deploy.sweep.schedulers import PBT_RESUMABLE

    config = load_experiment(LQR, ["algorithm.flow.hidden=[8]"])
    (tmp_path / "config.yaml").write_text(dump_config(config))
    perturbed = load_experiment(LQR, ["algorithm.flow.hidden=[8]", "algorithm.q_lr=0.01", "algorithm.alpha=0.5",
                                      "seed=3"])
    assert resumes.changes(tmp_path, perturbed, PBT_RESUMABLE) == {
        "algorithm.alpha": [0.05, 0.5], "algorithm.q_lr": [0.03, 0.01], "seed": [0, 3]}
    with pytest.raises(ConfigError, match="algorithm.alpha cannot change when a run is resumed"):
        resumes.changes(tmp_path, perturbed)
    before = make_algorithm(config.algorithm, 2, [-1.0], [1.0])
    after = make_algorithm(perturbed.algorithm, 2, [-1.0], [1.0])
    after.load_state_dict(before.state_dict())  # fixed alpha (lqr-isfm): the config's, not the checkpoint's
    assert float(after.temperature.value) == pytest.approx(0.5)
