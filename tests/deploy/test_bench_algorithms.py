"""Smoke tests of ``softflow bench act --quick`` (a real subprocess: one JSON object, every algorithm at both
batch sizes, positive costs, ratios equal to their parts) and of ``bench_gradients`` on a tiny budget (one K, two
velocities: every policy step's norm recorded and summarised, the figure written). Timings are not compared with
thresholds (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from softflow.deploy.bench.gradients import bench_gradients


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_bench_act_quick_times_every_algorithm_at_both_batch_sizes():
    result = subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "act", "--quick"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ten_step = "fmer"
    assert report["params"]["ten_step_flow"] == ten_step and report["torch_threads"] == 1
    rows = {(row["algorithm"], row["batch"]): row for row in report["act"]}
    assert set(rows) == {(name, b) for name in ("sac", "flame", ten_step, "sacflow") for b in (1, 64)}
    assert {rows[(name, 1)]["policy_steps"] for name in ("flame", ten_step, "sacflow")} == {1, 10, 4}
    for (_, batch), row in rows.items():
        assert positive(row["ms_per_call"]) and math.isclose(row["ms_per_action"] * batch, row["ms_per_call"])
        assert math.isclose(row["over_sac"], row["ms_per_call"] / rows[("sac", batch)]["ms_per_call"])
    for batch in (1, 64):
        assert math.isclose(report["flame_over_ten_step_flow"][str(batch)],
                            rows[("flame", batch)]["ms_per_call"] / rows[(ten_step, batch)]["ms_per_call"])


def test_smoke_bench_gradients_records_every_policy_step_and_draws_the_figure(tmp_path):
    plot = tmp_path / "norms.png"
    report = bench_gradients("InvertedPendulum-v5", env_steps=1029, batch_size=16, hidden=16, window=5,
                             plot=str(plot), steps=(4,), velocities=("mlp", "gated"))
    assert [(run["steps"], run["velocity"]) for run in report["runs"]] == [(4, "mlp"), (4, "gated")]
    for run in report["runs"]:
        assert run["policy_steps"] == 10  # 30 updates (env steps 1000..1029), one policy step every 3 (the delay)
        assert 0 < run["first_window_median"] and 0 < run["median"] <= run["max"]
        assert math.isclose(run["growth"], run["last_window_median"] / run["first_window_median"])
        assert len(run["series"]) == 10 // 5
    assert plot.stat().st_size > 10_000
