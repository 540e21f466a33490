"""Tests of ``softflow report`` on run directories written by hand: groups by (algorithm, task), the IQM against a
hand computation, the bootstrap interval against the same draws made directly with numpy, the task fraction of
FrankaKitchen runs, the files written, and bad input ending with one line and exit code 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from softflow.deploy.cli import USAGE_ERROR, main
from softflow.deploy.sweep import stats


def make_run(path: Path, algorithm: str, env: dict, evals: list[float], final: float | None = None,
             rate: float = 100.0, fractions: list[float] | None = None) -> Path:
    """A run directory: config.yaml, one metrics record per 100 env steps (an evaluation in each), summary.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"name": path.name, "env": env,
                                                      "algorithm": {"name": algorithm}}))
    records = []
    for i, value in enumerate(evals):
        record = {"env_steps": 100 * (i + 1), "eval/episode_return": value, "actors/env_steps_per_s": rate}
        if fractions:
            record["eval/task_fraction"] = fractions[i]
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final is not None:
        (path / "summary.json").write_text(json.dumps({"env_steps": 100 * len(evals), "eval/episode_return": final}))
        (path / "trial.json").write_text(json.dumps({"wall_s": 60.0}))
    return path


HOPPER = {"id": "Hopper-v5"}
KITCHEN = {"id": "FrankaKitchen-v1", "kwargs": {"tasks_to_complete": ["microwave", "kettle"]}}
SAC_FINALS = [1.0, 2.0, 3.0, 10.0]  # IQM: cut one from each end of 4 -> mean(2, 3) = 2.5
FMER_FINALS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]  # cut two from each end of 8 -> mean(2, 3, 4, 5) = 3.5


@pytest.fixture
def runs(tmp_path):
    sweep = tmp_path / "sweep"
    for i, final in enumerate(SAC_FINALS):
        make_run(sweep / f"00{i}_sac", "sac", HOPPER, [0.0, 20.0 + i, final - 1], final, rate=100.0 + i)
    single = tmp_path / "fmer-alone"
    for i, final in enumerate(FMER_FINALS):
        make_run(single if i == 0 else sweep / f"1{i}_fmer", "fmer", HOPPER, [final], final)
    for i in range(3):
        make_run(sweep / f"2{i}_kitchen", "sac", KITCHEN, [1.0 + i, 2.0 + i], None, fractions=[0.0, 0.5 * (i % 2)])
    return tmp_path, sweep, single


def direct_interval(values: list[float], keep: slice, reps: int, seed: int) -> tuple[float, float]:
    """The percentile interval of the IQM, drawn directly: ``keep`` is the middle half of a sorted resample."""
    a = np.asarray(values)
    rng = np.random.default_rng(seed)
    draws = [np.sort(a[rng.integers(0, len(a), len(a))])[keep].mean() for _ in range(reps)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def test_report_groups_runs_and_gives_iqm_and_intervals(runs, capsys):
    tmp_path, sweep, single = runs
    out = tmp_path / "out"
    assert main(["report", str(sweep), str(single), "--out", str(out), "--reps", "500", "--seed", "7"]) == 0
    with open(out / "report.csv") as f:
        rows = {(r["algorithm"], r["task"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("sac", "Hopper-v5"), ("fmer", "Hopper-v5"), ("sac", "FrankaKitchen-v1:2task")}
    sac, fmer = rows[("sac", "Hopper-v5")], rows[("fmer", "Hopper-v5")]
    assert int(sac["runs"]) == 4 and int(fmer["runs"]) == 8
    assert float(sac["final_iqm"]) == pytest.approx(2.5) and float(fmer["final_iqm"]) == pytest.approx(3.5)
    assert float(sac["best_iqm"]) == pytest.approx((21.0 + 22.0) / 2)  # bests 20, 21, 22, 23: the middle two
    # the runs of a group in the order found (the paths as given, runs below one sorted): fmer-alone comes last
    for row, values, keep in ((sac, SAC_FINALS, slice(1, 3)), (fmer, FMER_FINALS[1:] + FMER_FINALS[:1], slice(2, 6))):
        low, high = float(row["final_ci_low"]), float(row["final_ci_high"])
        assert low <= float(row["final_iqm"]) <= high
        assert (low, high) == pytest.approx(direct_interval(values, keep, 500, 7))
    assert float(sac["wall_s"]) == 60.0 and float(sac["env_steps_per_s"]) == pytest.approx(300 / 60.0)  # steps / wall
    kitchen = rows[("sac", "FrankaKitchen-v1:2task")]
    assert float(kitchen["final_iqm"]) == pytest.approx(3.0)  # no summary: the last evaluations 2, 3, 4
    assert float(kitchen["task_fraction_final_iqm"]) == pytest.approx(0.5 / 3)  # 0, 0.5, 0: 3 runs, none cut
    table = (out / "report.md").read_text()
    assert "| algorithm | task | runs | final return IQM [95% CI] |" in table
    assert f"| sac | Hopper-v5 | 4 | 2.5 [{float(sac['final_ci_low']):.4g}, " in table
    for name in ("curves.png", "final.png", "profile.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fmer | Hopper-v5 | 8 | 3.5 [" in capsys.readouterr().out


def test_stats_known_properties():
    assert stats.iqm([5.0, 5.0, 5.0, 5.0]) == 5.0
    point, low, high = stats.interval([[5.0, 5.0, 5.0]])
    assert point == low == high == 5.0  # no spread, no interval
    # stratified: a resample keeps each task's run count, so the mean of two constant tasks never moves
    assert set(stats.stratified_bootstrap([[0.0, 0.0], [1.0]], np.mean, reps=50)) == {1 / 3}
    assert [list(v) for v in stats.normalise({"a": np.array([2.0, 4.0, 3.0]), "b": np.array([7.0])}).values()] == [
        [0.0, 1.0, 0.5], [1.0]]
    point, _, _ = stats.profile([[0.0, 1.0], [0.5]], np.array([0.0, 0.4, 0.6]))
    assert list(point) == pytest.approx([2 / 3, 2 / 3, 1 / 3])


def test_report_bad_input_is_one_line_and_exit_code_2(runs, tmp_path, capsys):
    _, sweep, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": "sac"}, "env": HOPPER}))
    nope = tmp_path / "nope"
    for args, expected in (([str(nope)], f"RUN_OR_SWEEP_DIR: must be an existing directory (got '{nope}'"),
                           ([str(empty)], f"{empty}: no runs found"),
                           ([str(sweep), str(bare)], f"{bare}: a run without metrics"),
                           ([str(sweep), "--reps", "5"], "--reps: must be an integer >= 100")):
        assert main(["report", *args]) == USAGE_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"softflow: error: {expected}"), err
