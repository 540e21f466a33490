"""Smoke test of ``softflow bench learner --quick`` run as a real subprocess: one JSON object on stdout with every
field present and every cost positive. Timings are not compared with thresholds (DESIGN.md, "Performance")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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
