"""No host read inside an update: every algorithm's ``update`` runs without reading a tensor back to Python (no
``.item()``, ``float()``, ``bool()`` of a tensor, ``.tolist()``, ``.numpy()``, ``.cpu()``), so that a GPU learner
never waits on the device; ``Learner.update`` then reads all of a call's metrics in exactly one transfer.

On a CPU these reads cost nothing, so they are counted instead: a ``TorchFunctionMode`` sees every tensor method
call. The GPU counterpart runs the updates under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from softflow.algorithms import make_algorithm
from softflow.algorithms.flame import FLAMEConfig
from softflow.algorithms.fmer import FMERConfig
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.sac import SACConfig
from softflow.algorithms.sacflow import SACFlowConfig
from softflow.learner.learner import Learner

OBS, ACT, BATCH = 5, 2, 16
HOST_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"}
SMALL_FLOW = {"hidden": [16, 16], "steps": 3}
CONFIGS = [
    SACConfig(hidden=[16], critic={"hidden": [16]}, batch_size=BATCH),
    ISFMConfig(flow=SMALL_FLOW, critic={"hidden": [16]}, batch_size=BATCH, num_candidates=4),
    FMERConfig(flow=SMALL_FLOW, critic={"hidden": [16]}, batch_size=BATCH, num_candidates=4),
    FMERConfig(flow={**SMALL_FLOW, "log_prob": "hutchinson"}, critic={"hidden": [16]}, batch_size=BATCH,
               num_candidates=4, improve_at="obs"),
    FLAMEConfig(hidden=[16], critic={"hidden": [16]}, batch_size=BATCH, num_candidates=8, entropy_steps=3),
    SACFlowConfig(flow={"velocity": "gated", "hidden": [16], "steps": 3}, critic={"hidden": [16]}, batch_size=BATCH,
                  autotune_alpha=True, target_entropy=-20.0),
]


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def batches(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"obs": rng.standard_normal((count, BATCH, OBS), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (count, BATCH, ACT)).astype(np.float32),
            "rewards": rng.standard_normal((count, BATCH), dtype=np.float32),
            "next_obs": rng.standard_normal((count, BATCH, OBS), dtype=np.float32),
            "terminated": np.zeros((count, BATCH), np.float32)}


def build(config):
    torch.manual_seed(0)
    return make_algorithm(config, OBS, -np.ones(ACT, np.float32), np.ones(ACT, np.float32))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}")
def test_an_update_reads_nothing_back_to_the_host(config):
    algorithm = build(config)
    data = {k: torch.as_tensor(v[0]) for k, v in batches(1).items()}
    counter = CountHostReads()
    with counter:
        for _ in range(6):  # every policy_frequency's burst included
            metrics = algorithm.update(data)
    assert counter.reads == []
    assert all(isinstance(value, torch.Tensor) and value.ndim == 0 for value in metrics.values())


def test_a_count_that_sees_reads_sees_them():
    counter = CountHostReads()
    with counter:
        x = torch.ones(3).sum()
        x.item(), float(x), bool(x > 0), x.tolist()
    assert counter.reads == ["item", "__float__", "__bool__", "tolist"]


def test_the_learner_reads_all_metrics_of_a_call_at_once():
    learner = Learner(build(CONFIGS[2]), torch.device("cpu"))
    counter = CountHostReads()
    with counter:
        metrics = learner.update(batches(4))
    assert counter.reads == ["tolist"]
    assert learner.num_updates == 4 and all(isinstance(value, float) for value in metrics.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}")
def test_an_update_never_synchronises_a_gpu(config):
    torch.manual_seed(0)
    algorithm = make_algorithm(config, OBS, -np.ones(ACT, np.float32), np.ones(ACT, np.float32), "cuda")
    data = {k: torch.as_tensor(v[0], device="cuda") for k, v in batches(1).items()}
    algorithm.update(data)  # first calls may allocate and synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            algorithm.update(data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
