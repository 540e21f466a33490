"""Smoke tests of ``softflow bench learner --quick`` and ``softflow bench runtime`` (a short one on a real Ray)
run as real subprocesses: one JSON object on stdout with every field present, every cost positive and every ratio
equal to its parts; and unit tests of the learner benchmark's CleanRL SAC reference. Timings are not compared with
thresholds (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softflow.algorithms import ALGORITHMS
from softflow.deploy.bench import learner as bench
from softflow.deploy.bench.learner import CleanRLSAC, bench_learner, replay_batch
from softflow.deploy.config import ConfigError


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "softflow.deploy.cli", "bench", "learner", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_bench_learner_quick_prints_ratios_over_cleanrl_and_sac_equal_to_their_parts():
    result = run_bench("--quick", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["benchmark"] == "learner" and report["device"] == "cpu"
    assert report["torch_version"] and report["torch_threads"] == 1
    params = report["params"]
    assert params["quick"] is True and (params["obs_dim"], params["act_dim"]) == (17, 6)
    assert (params["repeats"], params["updates_per_block"], params["warmup_updates"]) == (1, 6, {"none": 1})
    assert (params["batch_sizes"], params["compile"]) == ([256], ["none"])
    own_batch = params["default_batch_sizes"]
    assert own_batch == {"sac": 256, "isfm": 256, "fmer": 256, "flame": 256, "sacflow": 512}
    assert report["acceptance"] == {"sac": 0.8, "fmer": 30, "isfm": 40, "flame": 8, "sacflow": 3}
    cleanrl = report["cleanrl_sac_ms"]
    assert set(cleanrl) == {"256", "512"} and all(positive(ms) for ms in cleanrl.values())

    default = {row["algorithm"]: row for row in report["default"]}
    assert set(default) == set(ALGORITHMS) and len(report["default"]) == 5
    for name, row in default.items():
        assert (row["batch_size"], row["compile"], row["compile_fallback"]) == (own_batch[name], "none", None)
        assert positive(row["ms_per_update"]) and positive(row["over_cleanrl"]), row
        assert positive(row["cleanrl_ms"]), "the CleanRL blocks timed beside this row's"
        assert math.isclose(row["over_cleanrl"], row["ms_per_update"] / row["cleanrl_ms"])
        assert row["meets"] == (row["over_cleanrl"] <= report["acceptance"][name])
        shares = [row[f"share_{part}"] for part in ("critic", "policy", "sample", "log_density")]
        assert all(share is None or 0 <= share <= 1 for share in shares), row
        if row["share_log_density"] is not None:
            assert row["share_log_density"] <= row["share_sample"]

    by_size = {row["algorithm"]: row for row in report["batch_sizes"]}
    assert set(by_size) == set(ALGORITHMS) and len(report["batch_sizes"]) == 5
    for row in by_size.values():
        assert (row["batch_size"], row["compile"], row["compile_fallback"]) == (256, "none", None)
        assert positive(row["ms_per_update"]) and positive(row["over_sac"]), row
        assert math.isclose(row["over_sac"], row["ms_per_update"] / by_size["sac"]["ms_per_update"])
    assert by_size["sac"]["over_sac"] == 1.0


def test_cleanrl_reference_steps_the_critics_polyak_averages_the_targets_and_takes_two_actor_steps_every_two():
    torch.manual_seed(0)
    device = torch.device("cpu")
    reference = CleanRLSAC(17, -np.ones(6, np.float32), np.ones(6, np.float32), device)
    batch = replay_batch(32, device)
    q_nets, targets = (reference.qf1, reference.qf2), (reference.qf1_target, reference.qf2_target)
    q_before = [p.detach().clone() for net in q_nets for p in net.parameters()]
    target_before = [p.detach().clone() for net in targets for p in net.parameters()]
    assert all(torch.equal(q, t) for q, t in zip(q_before, target_before))  # targets start as copies
    actor_steps = []
    reference.actor_optimizer.register_step_post_hook(lambda *_: actor_steps.append(reference.num_updates))

    reference.update(batch)
    q_after = [p.detach() for net in q_nets for p in net.parameters()]
    assert any(not torch.equal(before, after) for before, after in zip(q_before, q_after))
    for before, q, target in zip(target_before, q_after, (p for net in targets for p in net.parameters())):
        torch.testing.assert_close(target, 0.005 * q + 0.995 * before)

    counts = [len(actor_steps)]
    for _ in range(3):
        reference.update(batch)
        counts.append(len(actor_steps))
    assert counts == [2, 2, 4, 4] and actor_steps == [0, 0, 2, 2]
    assert reference.alpha != 1.0  # the alpha steps moved log(alpha) from 0


def test_cleanrl_reference_reads_a_value_only_where_cleanrl_does(monkeypatch):
    reference = CleanRLSAC(17, -np.ones(6, np.float32), np.ones(6, np.float32), torch.device("cpu"))
    batch = replay_batch(16, torch.device("cpu"))
    reads, item = [], torch.Tensor.item

    def counted_item(tensor: torch.Tensor):
        if sys._getframe(1).f_code.co_filename == bench.__file__:  # not torch's own reads (Adam's step count)
            reads.append(sys._getframe(1).f_lineno)
        return item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    for _ in range(4):
        reference.update(batch)
    assert len(reads) == 4 and len(set(reads)) == 1  # alpha after each of the 2 x 2 alpha steps, as in CleanRL


def test_bad_compile_modes_and_batch_sizes_are_usage_errors():
    with pytest.raises(ConfigError, match="^--compile: 'max' is not one of none, default, reduce-overhead"):
        bench_learner(compile_modes="none,max", device="cpu")
    with pytest.raises(ConfigError, match="^--batch-sizes: "):
        bench_learner(batch_sizes="256,0", device="cpu")


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
    learner, actor = report["learner"], report["actor"]
    assert len(learner["round_ratios"]) == 5 and all(positive(r) for r in learner["round_ratios"])
    assert learner["ratio"] == statistics.median(learner["round_ratios"]), "the median of alternating rounds"
    assert math.isclose(actor["ratio"], actor["runtime_env_steps_per_s"] / actor["alone_env_steps_per_s"])
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
    assert report["softflow"]["torch_threads"] == report["rllib"]["torch_threads"], "both get the machine's cores"
    assert math.isclose(report["env_steps_per_s_ratio"],
                        report["softflow"]["env_steps_per_s"] / report["rllib"]["env_steps_per_s"])
