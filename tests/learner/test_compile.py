"""``learner.compile``: a compiled update equals the eager one numerically on a CPU (same seed, same batch), and an
unknown mode is refused. Compilation takes tens of seconds on 2 cores, so the flows' cases are slow tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config

from softflow.algorithms import make_algorithm
from softflow.algorithms.flame import FLAMEConfig
from softflow.algorithms.fmer import FMERConfig
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.sac import SACConfig
from softflow.algorithms.sacflow import SACFlowConfig
from softflow.learner.compile import compile_algorithm

OBS, ACT = 5, 2
SMALL_FLOW = {"hidden": [32, 32], "steps": 3}
CONFIGS = {
    "sac": SACConfig(hidden=[32, 32], critic={"hidden": [32, 32]}, batch_size=16),
    "isfm": ISFMConfig(flow=SMALL_FLOW, critic={"hidden": [32, 32]}, batch_size=16, num_candidates=4),
    "fmer": FMERConfig(flow=SMALL_FLOW, critic={"hidden": [32, 32]}, batch_size=16, num_candidates=4),
    "flame": FLAMEConfig(hidden=[32, 32], critic={"hidden": [32, 32]}, batch_size=16, num_candidates=8,
                         entropy_steps=3),
    "sacflow": SACFlowConfig(flow={"velocity": "gated", "hidden": [32], "steps": 3}, critic={"hidden": [32, 32]},
                             batch_size=16),
}


def updates(name: str, mode: str, replay_batch, count: int = 3
            ) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """``count`` updates, each on a fresh copy of one fixed batch; their metrics and the policy's state."""
    torch.manual_seed(0)
    algorithm = make_algorithm(CONFIGS[name], OBS, -np.ones(ACT, np.float32), np.ones(ACT, np.float32))
    assert compile_algorithm(algorithm, mode) is None
    torch.manual_seed(1)
    metrics = [{k: float(v) for k, v in algorithm.update(replay_batch(16, OBS, ACT, done=0)).items()}
               for _ in range(count)]
    return metrics, algorithm.state_dict()["policy"]


@pytest.mark.parametrize("name", ["sac", pytest.param("isfm", marks=pytest.mark.slow),
                                  pytest.param("fmer", marks=pytest.mark.slow),
                                  pytest.param("flame", marks=pytest.mark.slow),
                                  pytest.param("sacflow", marks=pytest.mark.slow)])
def test_compiled_update_equals_the_eager_one(name, replay_batch):
    eager, eager_policy = updates(name, "none", replay_batch)
    with inductor_config.patch(fallback_random=True):  # Inductor's own random numbers would differ from eager's
        compiled, compiled_policy = updates(name, "default", replay_batch)
    for want, got in zip(eager, compiled, strict=True):
        assert want.keys() == got.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), key
    for key, value in eager_policy.items():
        assert torch.allclose(compiled_policy[key], value, rtol=1e-3, atol=1e-5), key


def test_unknown_mode_is_refused():
    algorithm = make_algorithm(CONFIGS["sac"], OBS, -np.ones(ACT, np.float32), np.ones(ACT, np.float32))
    with pytest.raises(ValueError, match="learner.compile must be one of none, default, reduce-overhead"):
        compile_algorithm(algorithm, "max-autotune")
