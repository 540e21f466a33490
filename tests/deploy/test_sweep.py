"""Tests of ``softflow sweep``: a tiny real sweep (2 trials of cluster/sweeps/actor-scaling.yaml, shrunk on the
command line, on Ray Tune started by the command) and its results, table and plot; bad sweep files and command lines
ending with one ``softflow: error: ...`` line and exit code 2 before any trial; and the pieces (metrics condensed
per trial, scaling efficiency, command-line routing, the resource check) against hand-computed values."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from softflow.deploy.cli import USAGE_ERROR, main
from softflow.deploy.config import ConfigError, RunStopped
from softflow.deploy.sweep.results import (
    condense_metrics,
    plot_sweep,
    report,
    scaling_by_envs,
    scaling_efficiency,
)
from softflow.deploy.sweep.spec import (
    SCALING,
    THROUGHPUT,
    base_tree,
    check_resources,
    check_space,
    load_sweep,
    trial_experiment,
    trial_name,
)

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "cluster" / "sweeps"
ACTOR_SCALING = SWEEPS / "actor-scaling.yaml"
EXPERIMENT = REPO / "cluster" / "experiments" / "inverted-pendulum.yaml"

# The actor-scaling sweep shrunk to 1 and 2 actors, 300 env steps of SAC on InvertedPendulum-v5, W&B off.
TINY = ["space.actors.count={grid: [1, 2]}", "actors.envs_per_actor=1",
        "env={id: InvertedPendulum-v5}", "total_env_steps=300",
        "log_every_steps=100", "learner.learning_starts=100", "eval={every_steps: 300, episodes: 1}",
        "algorithm.batch_size=32", "replay.updates_per_step=0.1", "actors.fragment_length=50", "wandb.mode=disabled"]


def softflow_sweep(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "sweep", *args], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# -- the real sweep ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """(sweep dir, stdout) of the actor-scaling sweep with 2 trials; about 1 minute on 2 cores."""
    cwd = tmp_path_factory.mktemp("sweep")
    sweep_dir = cwd / "scaling"
    result = softflow_sweep([str(ACTOR_SCALING), *TINY, "--sweep-dir", str(sweep_dir)], cwd, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in without_ray_teardown_noise(result.stderr), result.stderr
    return sweep_dir, result.stdout


def without_ray_teardown_noise(stderr: str) -> str:
    """``stderr`` less the one traceback Ray itself prints now and then when Tune stops a finished trial's actor:
    its SIGTERM handler raises SystemExit inside a garbage-collection callback ("Exception ignored in: ...
    sigterm_handler ... SystemExit: 1", forwarded with the actor's "(run_trial pid=N)" prefix). Any other
    traceback still fails the test."""
    return re.sub(r"[^\n]*Exception ignored in: <function WeakSet[^\n]*\n(?:[^\n]*\(run_trial pid=\d+\)[^\n]*\n)*?"
                  r"[^\n]*SystemExit: 1\n", "", stderr)


def test_tiny_sweep_results_have_one_row_per_trial_with_the_swept_values(tiny_sweep):
    sweep_dir, _ = tiny_sweep
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["trial"] for row in rows] == ["000_actors.count=1", "001_actors.count=2"]
    assert [int(row["actors.count"]) for row in rows] == [1, 2]
    assert all(row["status"] == "ok" and int(row["env_steps"]) >= 300 for row in rows)
    assert all(float(row[THROUGHPUT]) > 0 for row in rows)
    assert float(rows[0][SCALING]) == pytest.approx(1.0)  # one actor is the baseline
    assert float(rows[1][SCALING]) == pytest.approx(float(rows[1][THROUGHPUT]) / (2 * float(rows[0][THROUGHPUT])))
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["metric"] == THROUGHPUT and len(results["trials"]) == 2
    assert results["best_trial"] == max(rows, key=lambda row: float(row[THROUGHPUT]))["trial"]


def test_tiny_sweep_trials_are_ordinary_runs_grouped_for_wandb(tiny_sweep):
    sweep_dir, _ = tiny_sweep
    for count in (1, 2):
        run_dir = sweep_dir / f"{count - 1:03d}_actors.count={count}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["actors"]["count"] == count and config["env"]["id"] == "InvertedPendulum-v5"
        assert config["algorithm"]["name"] == "sac" and config["total_env_steps"] == 300
        assert config["wandb"]["group"] == sweep_dir.name  # one W&B group per sweep
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["env_steps"] >= 300
        assert (run_dir / "summary.json").is_file()


def test_tiny_sweep_writes_a_plot_and_prints_the_table_and_efficiency(tiny_sweep):
    sweep_dir, stdout = tiny_sweep
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "000_actors.count=1" in stdout and "001_actors.count=2" in stdout
    assert "scaling efficiency (env steps/s with n actors over n x with 1): 1: 1.00, 2: " in stdout
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["space"] == {"actors.count": {"grid": [1, 2]}}


# -- bad input ---------------------------------------------------------------------------------------------------

# (id, sweep file tree or None for actor-scaling.yaml, command-line overrides, start of the error after the prefix)
BAD = [
    ("unknown-sweep-key", {"experiment": str(EXPERIMENT), "metrc": "eval/episode_return",
                           "space": {"seed": {"grid": [0, 1]}}}, [],
     "sweep file {file}: metrc: unknown key (a sweep file takes experiment, name, metric, mode"),
    ("space-over-missing-key", {"experiment": str(EXPERIMENT), "space": {"actors.cout": {"grid": [1, 2]}}}, [],
     "space actors.cout=1: actors.cout: unknown key"),
    ("unknown-distribution", {"experiment": str(EXPERIMENT), "space": {"seed": {"normal": [0, 1]}}}, [],
     "sweep file {file}: space.seed.normal: unknown key (a distribution is one of grid, choice, uniform, loguniform)"),
    ("empty-range", None, ["space.algorithm.q_lr={uniform: [1.0e-3, 1.0e-4]}"],
     "sweep file {file}: space.algorithm.q_lr: uniform: [low, high] needs low < high"),
    ("two-distributions", None, ["space.seed={grid: [0], choice: [1]}"],
     "sweep file {file}: space.seed: give exactly one of grid, choice, uniform, loguniform (got grid, choice)"),
    ("loguniform-at-zero", None, ["space.algorithm.q_lr={loguniform: [0, 1]}"],
     "sweep file {file}: space.algorithm.q_lr: loguniform: low must be > 0"),
    ("bad-swept-value", None, ["space.actors.count={grid: [1, -1]}"],
     "space actors.count=-1: actors.count: must be >= 0 (got -1)"),
    ("infinite-range", None, ["space.algorithm.q_lr={uniform: [1.0e-4, .inf]}"],
     "sweep file {file}: space.algorithm.q_lr.uniform.1: Input should be a finite number"),
    ("command-line-space-over-missing-key", None, ["space.algorithm.lrr={grid: [1]}"],
     "space algorithm.lrr=1: algorithm.lrr: unknown key for algorithm 'sac'"),
    ("bad-fixed-override", None, ["total_env_steps=abc"],
     "the experiment with the sweep's overrides: total_env_steps: Input should be a valid integer"),
    ("swept-and-fixed", {"experiment": str(EXPERIMENT), "overrides": {"seed": 1}, "space": {"seed": {"grid": [0]}}},
     [], "sweep file {file}: seed is both swept (space) and fixed (overrides); keep one"),
    ("nothing-left-to-sweep", None, ["actors.count=3", "actors.envs_per_actor=1"],
     "sweep file {file}: space: Dictionary should have at least 1"),
    ("not-a-metric", None, ["metric=actor/env_steps_per_s"], "sweep file {file}: metric 'actor/env_steps_per_s' is "
                                                             "not a softflow metric"),
    ("no-space", {"experiment": str(EXPERIMENT)}, [], "sweep file {file}: space: required key is missing"),
    ("missing-experiment", {"experiment": "nope.yaml", "space": {"seed": {"grid": [0]}}}, [],
     "sweep file {file}: experiment 'nope.yaml' not found"),
    ("override-without-equals", None, ["seed"], "override 'seed' must look like key=value"),
]


def _bad_input(tmp_path: Path, tree: dict | None) -> Path:
    return write(tmp_path / "bad.yaml", tree) if tree is not None else ACTOR_SCALING


@pytest.mark.parametrize("tree, overrides, expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_and_exit_code_2_before_any_trial(tree, overrides, expected, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = _bad_input(tmp_path, tree)
    assert main(["sweep", str(file), *overrides]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("softflow: error: " + expected.format(file=file)), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["unknown-sweep-key", "space-over-missing-key", "unknown-distribution"])
def test_bad_input_through_the_command_in_a_subprocess(case, tmp_path):
    """End to end: nothing but the one line on stderr (no traceback, no Ray or Tune output), about 4 s each."""
    _, tree, overrides, expected = next(c for c in BAD if c[0] == case)
    file = _bad_input(tmp_path, tree)
    result = softflow_sweep([str(file), *overrides], tmp_path, timeout=120)
    assert result.returncode == USAGE_ERROR
    assert result.stderr.startswith("softflow: error: " + expected.format(file=file)), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_missing_sweep_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == USAGE_ERROR
    assert capsys.readouterr().err == (f"softflow: error: sweep file '{tmp_path / 'nope.yaml'}' not found (give the "
                                       f"path to a YAML file, e.g. cluster/sweeps/actor-scaling.yaml)\n")


def test_a_trial_the_cluster_cannot_hold_is_refused_before_the_sweep(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    sweep, experiment = load_sweep(ACTOR_SCALING)
    checked, probed = check_space(sweep, base_tree(sweep, experiment))
    assert [values["actors.count"] for values in probed] == [1, 2, 4, 8, 16, 1]  # then 8 envs per actor
    check_resources(checked[:2], probed[:2])  # driver 0.25 + learner 0.5 + 2 x 0.5 = 1.75 CPUs fit in 2
    with pytest.raises(ConfigError, match=r"^a trial with actors.count=4, actors.envs_per_actor=1 needs 2.75 CPU "
                                          r"\(its driver, the learner and "
                                          r"4 x actors.num_cpus=0.5\) but the Ray cluster has 2; sweep fewer actors"):
        check_resources(checked, probed)


# -- the pieces --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_each_value_of_its_space_validates(path):
    sweep, experiment = load_sweep(path)
    checked, probed = check_space(sweep, base_tree(sweep, experiment))
    assert len(checked) == len(probed) == 1 + sum(len(d.probes()) - 1 for d in sweep.space.values())
    for config, values in zip(checked, probed):
        assert config.actors.count == values.get("actors.count", config.actors.count)


def test_actor_scaling_measures_sac_on_halfcheetah_with_one_seed_and_one_trial_at_a_time():
    sweep, experiment = load_sweep(ACTOR_SCALING)
    assert sweep.space["actors.count"].grid == [1, 2, 4, 8, 16] and sweep.space["actors.envs_per_actor"].grid == [1, 8]
    assert list(sweep.space) == ["actors.count", "actors.envs_per_actor"]
    assert sweep.metric == THROUGHPUT and sweep.max_concurrent_trials == 1 and sweep.num_samples == 1
    config = trial_experiment(base_tree(sweep, experiment), {"actors.count": 16})
    assert config.env.id == "HalfCheetah-v5" and config.algorithm.name == "sac" and config.actors.count == 16


def test_command_line_routes_space_fields_and_experiment_overrides():
    sweep, _ = load_sweep(ACTOR_SCALING, ["space.actors.count={grid: [1, 2]}", "num_samples=3", "name=mine",
                                          "total_env_steps=500", "overrides.log_every_steps=50",
                                          "space.seed={choice: [0, 1]}"])
    assert sweep.space["actors.count"].grid == [1, 2] and sweep.space["seed"].choice == [0, 1]
    assert sweep.num_samples == 3 and sweep.name == "mine"
    assert sweep.overrides["total_env_steps"] == 500 and sweep.overrides["log_every_steps"] == 50
    assert load_sweep(ACTOR_SCALING)[0].name == "actor-scaling"
    # the command line has the last word: sweeping a fixed key unfixes it, fixing a swept key takes it off the space
    assert "seed" not in sweep.overrides  # actor-scaling.yaml fixes seed: 0
    sweep, _ = load_sweep(ACTOR_SCALING, ["space.seed={grid: [0, 1]}", "actors.count=4"])
    assert list(sweep.space) == ["actors.envs_per_actor", "seed"] and sweep.overrides["actors.count"] == 4


def test_distributions_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    sweep, _ = load_sweep(ACTOR_SCALING, ["space.algorithm.q_lr={loguniform: [1.0e-4, 1.0e-2]}",
                                          "space.algorithm.tau={uniform: [0.001, 0.01]}",
                                          "space.seed={choice: [0, 1]}"])
    domains = {key: dist.domain() for key, dist in sweep.space.items()}
    assert domains["actors.count"] == {"grid_search": [1, 2, 4, 8, 16]}
    q_lr, tau = domains["algorithm.q_lr"], domains["algorithm.tau"]
    assert isinstance(q_lr, Float) and (q_lr.lower, q_lr.upper) == (1e-4, 1e-2)
    assert type(q_lr.sampler).__name__ == "_LogUniform" and type(tau.sampler).__name__ == "_Uniform"
    assert isinstance(tau, Float) and (tau.lower, tau.upper) == (0.001, 0.01)
    assert isinstance(domains["seed"], Categorical) and domains["seed"].categories == [0, 1]
    assert sweep.space["algorithm.q_lr"].probes() == [1e-4, 1e-2]


def test_condense_metrics_averages_rates_after_learning_starts_and_keeps_last_values():
    records = [{"env_steps": 100, "actors/env_steps_per_s": 1000.0, "train/episode_return": 1.0},
               {"env_steps": 200, "actors/env_steps_per_s": 300.0, "eval/episode_return": 5.0},
               {"env_steps": 300, "actors/env_steps_per_s": 500.0, "train/episode_return": 3.0}]
    # learning_starts=100: the windows (100, 200] and (200, 300] began after it; (0, 100] did not
    assert condense_metrics(records, 100) == {THROUGHPUT: 400.0, "train/episode_return": 3.0,
                                              "eval/episode_return": 5.0}
    assert condense_metrics(records, 10_000)[THROUGHPUT] == pytest.approx(600.0)  # none after: all reports


def test_scaling_efficiency_over_the_mean_of_each_count():
    rows = [{"actors.count": 1, THROUGHPUT: 100.0}, {"actors.count": 1, THROUGHPUT: 120.0},
            {"actors.count": 4, THROUGHPUT: 330.0}, {"actors.count": 2, "status": "error"}]
    assert scaling_efficiency(rows) == {1: pytest.approx(1.0), 4: pytest.approx(330 / (4 * 110))}
    assert rows[0][SCALING] == pytest.approx(100 / 110) and SCALING not in rows[3]
    rows = [{"actors.count": 2, THROUGHPUT: 200.0}, {"actors.count": 4, THROUGHPUT: 300.0}]
    assert scaling_efficiency(rows) == {2: 1.0, 4: pytest.approx(0.75)}  # against the fewest actors swept


def test_scaling_efficiency_within_each_envs_per_actor():
    rows = [{"actors.count": 1, "actors.envs_per_actor": 1, THROUGHPUT: 100.0},
            {"actors.count": 4, "actors.envs_per_actor": 1, THROUGHPUT: 360.0},
            {"actors.count": 1, "actors.envs_per_actor": 8, THROUGHPUT: 500.0},
            {"actors.count": 4, "actors.envs_per_actor": 8, THROUGHPUT: 1900.0}]
    assert scaling_by_envs(rows) == {1: {1: 1.0, 4: pytest.approx(0.9)}, 8: {1: 1.0, 4: pytest.approx(0.95)}}
    assert rows[3][SCALING] == pytest.approx(0.95)
    assert scaling_by_envs(rows[:2]) == {1: {1: 1.0, 4: pytest.approx(0.9)}}
    assert scaling_by_envs([{"actors.count": 2, THROUGHPUT: 50.0}]) == {None: {2: 1.0}}


def test_trial_names_are_indexed_and_safe_as_directory_names():
    assert trial_name(3, {"actors.count": 4, "seed": 1}) == "003_actors.count=4_seed=1"
    assert trial_name(0, {"algorithm.q_lr": 0.000123456, "algorithm.flow.hidden": [64, 64]}) == \
        "000_algorithm.q_lr=0.0001235_algorithm.flow.hidden=64-64"


def test_report_writes_results_and_a_categorical_plot_and_stops_on_a_failed_trial(tmp_path, capsys):
    sweep, _ = load_sweep(ACTOR_SCALING, ["space={algorithm.critic.hidden: {grid: [[64], [64, 64]]}}"])
    rows = [{"trial": "000_a", "algorithm.critic.hidden": [64], "status": "ok", "error": None, THROUGHPUT: 10.0},
            {"trial": "001_b", "algorithm.critic.hidden": [64, 64], "status": "error", "error": "boom"}]
    with pytest.raises(RunStopped, match=r"^1 of 2 trials failed \(first: 001_b: boom\)"):
        report(rows, sweep, ["algorithm.critic.hidden"], tmp_path)
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [(r["trial"], r["algorithm.critic.hidden"], r["status"]) for r in written] == [
        ("000_a", "[64]", "ok"), ("001_b", "[64,64]", "error")]
    assert json.loads((tmp_path / "results.json").read_text())["best_trial"] == "000_a"
    assert (tmp_path / "sweep.png").is_file()
    assert "best trial by actors/env_steps_per_s (max): 000_a = 10" in capsys.readouterr().out
    assert plot_sweep([{"x": 1, "status": "error"}], THROUGHPUT, "x", tmp_path / "none.png") is None
