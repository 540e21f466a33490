"""Tests of a sweep in W&B, offline (no key, no network): a trial's run keeps the maximum of eval/episode_return as
its summary (the final evaluation beside it as ``eval/episode_return_final``), and the sweep's results table goes
into one more run of the sweep's group."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from softflow.deploy.run.metrics import MetricsLogger, WandbConfig, offline_run_dirs
from softflow.deploy.sweep.board import log_sweep_table, table_data
from softflow.deploy.sweep.spec import base_tree, load_sweep

REPO = Path(__file__).resolve().parents[2]
LQR = REPO / "cluster" / "experiments" / "lqr-isfm.yaml"


def test_eval_return_summary_is_its_maximum(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(tmp_path / "run", "run", {}, WandbConfig(mode="offline", group="sweep-20260101-000000"))
    for steps, value in [(100, 1.0), (200, 5.0), (300, 2.0)]:
        logger.log(steps, {"eval/episode_return": value})
    time.sleep(0.5)
    assert dict(logger._run.summary["eval/episode_return"]) == {"max": 5}
    assert logger._run.group == "sweep-20260101-000000"
    logger.finish({"env_steps": 300, "eval/episode_return": 2.5})
    assert len(offline_run_dirs(tmp_path / "run", logger.run_id)) == 1


def test_table_data_keeps_numbers_and_shortens_the_rest():
    columns, data = table_data([{"trial": "000_a", "seed": 0, "hidden": [64, 64], "eval/episode_return": 1.5},
                                {"trial": "001_b", "seed": 1, "status": "error"}])
    assert columns == ["trial", "eval/episode_return", "hidden", "seed", "status"]
    assert data == [["000_a", 1.5, "[64,64]", 0, None], ["001_b", None, None, 1, "error"]]


def test_the_results_table_is_a_run_of_the_sweeps_group(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no key: auto is offline
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump({"experiment": str(LQR), "space": {"seed": {"grid": [0, 1]}}}))
    sweep, experiment = load_sweep(file)
    base = base_tree(sweep, experiment)
    sweep_dir = tmp_path / "s-20260101-000000"
    sweep_dir.mkdir()
    rows = [{"trial": "000_seed=0", "seed": 0, "status": "ok", "eval/episode_return": -3.0}]
    assert log_sweep_table(rows, sweep, {"lqr-isfm": base}, sweep_dir) == "offline"
    assert "group s-20260101-000000: the results table is in run s-20260101-000000-results" in capsys.readouterr().out
    assert len(list((sweep_dir / "wandb").glob("offline-run-*"))) == 1
    base["wandb"] = {"mode": "disabled"}
    assert log_sweep_table(rows, sweep, {"lqr-isfm": base}, sweep_dir) is None
