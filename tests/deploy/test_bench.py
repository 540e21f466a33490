"""Smoke tests of ``softflow bench learner --quick`` and ``softflow bench runtime`` (a short one on a real Ray)
run as real subprocesses: one JSON object on stdout with every field present, every cost positive and every ratio
equal to its parts. Timings are not compared with thresholds (DESIGN.md, "Performance")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softflow.deploy.bench import bench_learner
from softflow.deploy.config import ConfigError


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "learner", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_bench_learner_quick_prints_one_json_object_of_positive_costs():
    result = run_bench("--quick", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["device"] == "cpu"
    assert report["torch_version"] and report["torch_threads"] == 1
    params = report["params"]
    assert params["quick"] is True and params["batch_size"] == 256
    assert (params["obs_dim"], params["act_dim"]) == (17, 6)
    assert (params["repeats"], params["updates_per_repeat"], params["warmup_calls"]) == (1, 2, 0)
    update = report["update"]
    assert all(positive(update[key]) for key in ("sac_ms", "isfm_ms", "isfm_over_sac"))
    assert math.isclose(update["isfm_over_sac"], update["isfm_ms"] / update["sac_ms"])

    rows = {(row["num_samples"], row["with_log_prob"]): row for row in report["sample"]}
    assert set(rows) == {(n, lp) for n in (1, 8, 32) for lp in (False, True)}
    for (n, with_log_prob), row in rows.items():
        assert all(positive(row[key]) for key in ("ms_per_call", "ms_per_step", "ratio_to_n1")), row
        assert math.isclose(row["ms_per_step"] * params["flow_steps"], row["ms_per_call"])
        assert math.isclose(row["ratio_to_n1"], row["ms_per_call"] / rows[(1, with_log_prob)]["ms_per_call"])
        if with_log_prob:
            assert positive(row["ratio_to_no_log_prob"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_a_usage_error():
    with pytest.raises(ConfigError, match="^--device cuda: no CUDA device is visible"):
        bench_learner(quick=True, device="cuda")


def test_smoke_bench_runtime_prints_ratios_of_the_runtime_over_the_same_loops_alone():
    experiment = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "inverted-pendulum.yaml"
    result = subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "runtime", str(experiment),
                             "algorithm.batch_size=32", "--seconds", "0.4"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["benchmark"], report["env"], report["algorithm"]) == ("runtime", "InvertedPendulum-v5", "fmer")
    assert report["params"]["batch_size"] == 32
    for part, alone, inside in (("learner", "alone_updates_per_s", "runtime_updates_per_s"),
                                ("actor", "alone_env_steps_per_s", "runtime_env_steps_per_s")):
        figures = report[part]
        assert positive(figures[alone]) and positive(figures[inside]), figures
        assert math.isclose(figures["ratio"], figures[inside] / figures[alone])
    assert all(positive(value) for value in report["replay"].values())
    weights = report["weights"]
    assert 0 < weights["publish_to_pickup_ms_median"] <= weights["publish_to_pickup_ms_max"]
    assert weights["bytes"] > 1000  # at least the policy's and the critic's parameters


def test_bench_runtime_of_a_serial_experiment_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "runtime",
                             str(Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-isfm.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("softflow: error: actors.count is 0 (serial mode)")


@pytest.mark.slow
def test_smoke_bench_rllib_reports_both_libraries_side_by_side():
    result = subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "rllib", "--seconds", "20",
                             "--batch-size", "64"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["params"]["batch_size"] == 64 and report["env"] == "HalfCheetah-v5"
    for library in ("softflow", "rllib"):
        assert report[library]["env_steps"] > 0 and report[library]["seconds"] >= 20, report[library]
    assert math.isclose(report["env_steps_per_s_ratio"],
                        report["softflow"]["env_steps_per_s"] / report["rllib"]["env_steps_per_s"])
