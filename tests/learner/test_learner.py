"""The plain Learner: updates per stacked batch, and a stop at the first non-finite loss."""

import numpy as np
import pytest
import torch

from softflow.algorithms import make_algorithm
from softflow.algorithms.sac import SACConfig
from softflow.learner.learner import Learner, TrainingDiverged

OBS, ACT = 3, 2


def batches(num_batches: int, n: int = 16, reward: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"obs": rng.standard_normal((num_batches, n, OBS), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (num_batches, n, ACT)).astype(np.float32),
            "rewards": np.full((num_batches, n), reward, dtype=np.float32),
            "next_obs": rng.standard_normal((num_batches, n, OBS), dtype=np.float32),
            "terminated": np.zeros((num_batches, n), dtype=np.float32)}


def learner() -> Learner:
    torch.manual_seed(0)
    algorithm = make_algorithm(SACConfig(batch_size=16, hidden=[8], critic={"hidden": [8]}), OBS,
                               -np.ones(ACT, np.float32), np.ones(ACT, np.float32), "cpu")
    return Learner(algorithm, torch.device("cpu"))


def test_one_update_per_stacked_batch():
    plain = learner()
    metrics = plain.update(batches(3))
    assert plain.num_updates == 3 and plain.algorithm.num_updates == 3
    assert np.isfinite(metrics["losses/q_loss"])


def test_a_non_finite_loss_stops_training_naming_the_loss_and_the_update():
    plain = learner()
    plain.update(batches(2))
    with pytest.raises(TrainingDiverged, match=r"^losses/q_loss became (inf|nan) at update 3; lower algorithm"):
        plain.update(batches(2, reward=np.inf))


def test_cpu_updates_flush_subnormal_floats_to_zero_and_nothing_after_them_does():
    """1e-20 squared is 1e-40, a subnormal float32 that x86 computes in slow microcode: inside an update it is
    flushed to zero (learner/learner.py), outside it is kept."""
    plain, seen = learner(), []
    update = plain.algorithm.update

    def observed(batch):
        tiny = torch.tensor([1e-20])
        seen.append((tiny * tiny).item())
        return update(batch)

    plain.algorithm.update = observed
    plain.update(batches(2))
    tiny = torch.tensor([1e-20])
    assert seen == [0.0, 0.0] and (tiny * tiny).item() > 0
