"""``softflow bench learner``: the learner's costs, measured side by side in one run and quoted as ratios.

Two measurements on a MuJoCo-sized problem (17-dim observations, 6-dim actions in [-1, 1], default configs):

1. One ``update`` of Gaussian SAC and of ISFM-SAC on the same replay batch: ms per update and isfm/sac.
2. ``FlowPolicy.sample`` of the ISFM policy at a batch of states with N candidates per state, without and with the
   exact log-density (per-step Jacobian log-dets via torch.func): ms per call, ms per ODE step, and the ratio to
   N = 1 (and of with to without log-density).

Every figure is the median over ``repeats`` timed blocks after one warm-up call (none with ``quick``). SAC takes
its policy steps in bursts of ``policy_frequency`` (2) every other update, so update blocks hold an even number of
updates. Absolute times on a shared machine are noisy; the ratios are the result (DESIGN.md, "Performance").
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from softflow.algorithms import make_algorithm
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.sac import SACConfig
from softflow.deploy.config import ConfigError
from softflow.learner.learner import learner_device

OBS_DIM, ACT_DIM = 17, 6
SAMPLE_STATES = 64
CANDIDATES = (1, 8, 32)
QUICK_UPDATES, QUICK_REPEATS = 2, 1


def median_ms(fn: Callable[[], object], repeats: int, calls: int, device: torch.device, warmup: int) -> float:
    """Median over ``repeats`` blocks of ``calls`` calls of the wall time per call in ms, after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def replay_batch(batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random batch in the replay buffer's format (tests/algorithms ``fixed_batch``)."""
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(batch_size, OBS_DIM, generator=g),
             "actions": torch.rand(batch_size, ACT_DIM, generator=g) * 2 - 1,
             "rewards": torch.randn(batch_size, generator=g),
             "next_obs": torch.randn(batch_size, OBS_DIM, generator=g),
             "terminated": (torch.rand(batch_size, generator=g) < 0.1).float()}
    return {key: value.to(device) for key, value in batch.items()}


def bench_learner(updates: int = 20, batch_size: int = 256, repeats: int = 5, device: str = "auto",
                  quick: bool = False) -> dict:
    """Runs both measurements and returns one JSON-ready dict. ``updates`` timed updates per algorithm are split
    into ``repeats`` blocks of an even size; ``quick`` uses 2 updates, 1 repeat and no warm-up (for tests)."""
    if quick:
        updates, repeats = QUICK_UPDATES, QUICK_REPEATS
    if repeats < 1 or updates < 1 or batch_size < 1:
        raise ConfigError("--updates, --repeats and --batch-size must be positive")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use auto or cpu")
    dev = learner_device({"auto": "auto", "cpu": 0, "cuda": 1}[device])
    warmup = 0 if quick else 1
    per_block = max(2, 2 * round(updates / repeats / 2))
    low, high = -np.ones(ACT_DIM, dtype=np.float32), np.ones(ACT_DIM, dtype=np.float32)
    batch = replay_batch(batch_size, dev)
    torch.manual_seed(0)

    update_ms, algorithms = {}, {}
    for config in (SACConfig(batch_size=batch_size), ISFMConfig(batch_size=batch_size)):
        algorithm = make_algorithm(config, OBS_DIM, low, high, dev)
        update_ms[config.name] = median_ms(lambda: algorithm.update(batch), repeats, per_block, dev, warmup)
        algorithms[config.name] = algorithm

    policy = algorithms["isfm"].policy
    obs = torch.randn(SAMPLE_STATES, OBS_DIM, device=dev)
    sampling = []
    for with_log_prob in (False, True):
        base = None
        for n in CANDIDATES:
            with torch.no_grad():
                ms = median_ms(lambda: policy.sample(obs, num_samples=n, with_log_prob=with_log_prob),
                               repeats, 1, dev, warmup)
            base = ms if base is None else base
            sampling.append({"num_samples": n, "with_log_prob": with_log_prob, "ms_per_call": ms,
                             "ms_per_step": ms / policy.steps, "ratio_to_n1": ms / base})
    plain = {row["num_samples"]: row["ms_per_call"] for row in sampling if not row["with_log_prob"]}
    for row in sampling:
        if row["with_log_prob"]:
            row["ratio_to_no_log_prob"] = row["ms_per_call"] / plain[row["num_samples"]]

    isfm_config = algorithms["isfm"].config
    return {
        "benchmark": "learner",
        "device": str(dev) if dev.type == "cpu" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "params": {"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "action_bounds": [-1.0, 1.0], "batch_size": batch_size,
                   "repeats": repeats, "updates_per_repeat": per_block, "warmup_calls": warmup, "quick": quick,
                   "isfm_num_candidates": isfm_config.num_candidates, "flow_steps": policy.steps,
                   "flow_integrator": policy.integrator, "sample_states": SAMPLE_STATES,
                   "sample_candidates": list(CANDIDATES)},
        "update": {"sac_ms": update_ms["sac"], "isfm_ms": update_ms["isfm"],
                   "isfm_over_sac": update_ms["isfm"] / update_ms["sac"]},
        "sample": sampling,
    }
