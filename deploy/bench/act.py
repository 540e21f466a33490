"""``softflow bench act``: the cost of one acting call, per algorithm, side by side in one run.

Each algorithm (default configs) acts as the rollout actors do, ``algorithm.act(obs, explore=True, candidates=N)``:
N policy samples per state scored by min(Q1, Q2), the best executed (FLAME adds its exploration noise). The problem
has Ant-v5's sizes (105-dim observations, 8-dim actions in [-1, 1]), the paper's latency benchmark (FLAME,
arXiv 2602.01606: batch 1, 32 particles). Compared: Gaussian SAC, FLAME (one MeanFlow step), the 10-step flow of
FMER (its default: 10 Euler steps) and SAC Flow (Flow-G, K = 4), at batch 1 (one environment) and batch 64, with
``torch.set_num_threads(threads)`` (1, as in the rollout actors).

Figures: median wall time per call over ``repeats`` timed blocks of ``calls`` calls after a warm-up, the blocks of
all algorithms and batches taken in turn within each repeat (round robin, so load changes hit all alike), ms per action
(per state), each algorithm's time over SAC's, and FLAME's over the 10-step flow's (the acceptance ratio: at most
1/3). Absolute times on a shared machine are noisy; the ratios, measured in one run, are the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from softflow.algorithms import make_algorithm
from softflow.algorithms.flame import FLAMEConfig
from softflow.algorithms.fmer import FMERConfig
from softflow.algorithms.sac import SACConfig
from softflow.algorithms.sacflow import SACFlowConfig
from softflow.deploy.bench.timing import ms_per_call
from softflow.deploy.config import ConfigError

OBS_DIM, ACT_DIM = 105, 8
BATCHES = (1, 64)
TEN_STEP_FLOW = "fmer"  # the K-step flow FLAME's one step is compared with


def round_robin_ms(calls_of: dict, repeats: int, calls: int, warmup: int) -> dict:
    """Median ms per call of each function: every repeat times a block of ``calls`` calls of each in turn, so
    that a change of the machine's load falls on all of them alike."""
    for fn in calls_of.values():
        for _ in range(warmup):
            fn()
    samples: dict = {key: [] for key in calls_of}
    for _ in range(repeats):
        for key, fn in calls_of.items():
            samples[key].append(ms_per_call(fn, calls))
    return {key: statistics.median(values) for key, values in samples.items()}


def bench_act(candidates: int = 32, repeats: int = 7, calls: int = 50, threads: int = 1, quick: bool = False) -> dict:
    """Times every algorithm's ``act`` at each batch size; returns one JSON-ready dict. ``quick``: 1 repeat of 2
    calls, no warm-up (for tests)."""
    if quick:
        repeats, calls = 1, 2
    if min(candidates, repeats, calls, threads) < 1:
        raise ConfigError("--candidates, --repeats, --calls and --threads must be positive")
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    low, high = -np.ones(ACT_DIM, dtype=np.float32), np.ones(ACT_DIM, dtype=np.float32)
    configs = {"sac": SACConfig(), "flame": FLAMEConfig(), TEN_STEP_FLOW: FMERConfig(), "sacflow": SACFlowConfig()}
    rng = np.random.default_rng(0)
    calls_of: dict[tuple[str, int], Callable[[], object]] = {}
    steps_of: dict[str, int] = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        algorithm = make_algorithm(config, OBS_DIM, low, high, device)
        steps_of[name] = getattr(algorithm.policy, "steps", 0)
        for batch in BATCHES:
            obs = rng.standard_normal((batch, OBS_DIM)).astype(np.float32)
            calls_of[(name, batch)] = partial(algorithm.act, obs, True, candidates)
    times = round_robin_ms(calls_of, repeats, calls, warmup=0 if quick else 2)
    rows = [{"algorithm": name, "policy_steps": steps_of[name], "batch": batch, "ms_per_call": times[(name, batch)],
             "ms_per_action": times[(name, batch)] / batch} for name, batch in calls_of]
    by_key = {(row["algorithm"], row["batch"]): row for row in rows}
    for row in rows:
        row["over_sac"] = row["ms_per_call"] / by_key[("sac", row["batch"])]["ms_per_call"]
    flame_over_ten_step = {str(batch): by_key[("flame", batch)]["ms_per_call"]
                           / by_key[(TEN_STEP_FLOW, batch)]["ms_per_call"] for batch in BATCHES}
    return {
        "benchmark": "act",
        "device": "cpu",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "params": {"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "candidates": candidates, "batches": list(BATCHES),
                   "repeats": repeats, "calls_per_repeat": calls, "quick": quick, "ten_step_flow": TEN_STEP_FLOW},
        "act": rows,
        "flame_over_ten_step_flow": flame_over_ten_step,
    }


def from_args(args) -> dict:
    """``softflow bench act``'s flags (deploy/cli.py) to :func:`bench_act`."""
    return bench_act(candidates=args.candidates, repeats=args.repeats, quick=args.quick)
