"""The fast LQR check on a tiny system: each algorithm whose entropy should reach the soft optimum (ISFM, FMER, FLAME),
with the algorithm settings of its shipped `cluster/experiments/lqr-<algorithm>.yaml`, improves its policy against a
frozen exact critic Q(s, a) = -(a + k s)' H (a + k s) of one state and two actions with an ill-conditioned H
(eigenvalues 1 and 5, rotated), at alpha = 0.5 and a policy learning rate of 3e-3 (so that 800 updates reach it from
the initial policy; the shipped files' 0.05 and 1e-3 need the thousands of updates of their full runs); the
estimator settings (candidates, weights, ODE steps, proposal, schedule) are the shipped ones. Its soft-optimal
policy pi ∝ exp(Q / alpha) is N(-k s, (alpha / 2) H^-1) in closed form (docs/algorithms.md, the LQR case study), so
the gain and the covariance are checked against numbers: a policy whose entropy term were inert or wrong by a
factor, or whose covariance ignored the coupling of the two actions, would fail. Measured (one torch thread): K
within 0.006 / 0.002 / 0.066 and Sigma within 0.035 / 0.030 / 0.037 for ISFM / FMER / FLAME, 15 to 40 s each. The
full runs, critic learned, on 1 to 3 action dimensions are the slow tests/deploy/test_lqr_acceptance.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from softflow.algorithms import make_algorithm
from softflow.deploy.config import load_experiment
from softflow.deploy.run.reports import fit_linear_gaussian

EXPERIMENTS = Path(__file__).resolve().parents[2] / "cluster" / "experiments"
ANGLE = 0.4
ROTATION = torch.tensor([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]])
HESSIAN = ROTATION @ torch.diag(torch.tensor([1.0, 5.0])) @ ROTATION.T
GAIN = torch.tensor([[0.8], [-0.5]])  # the optimal mean is -GAIN s
ALPHA = 0.5
POLICY_LR = 3e-3
TOLERANCE_K, TOLERANCE_SIGMA = 0.10, 0.10
UPDATES = 800


def freeze_exact_critic(algorithm) -> None:
    """Q(s, a) = -z' S z with z = [s; a] and S = L' H L, L = [k | I] (so that L z = a + k s), in both critics and
    both targets; the critics' learning rate is held at 0 so that the TD steps leave them exact."""
    lift = torch.cat([GAIN, torch.eye(2)], dim=1)
    with torch.no_grad():
        for critics in (algorithm.critic.online, algorithm.critic.target):
            critics.matrix.copy_((lift.T @ HESSIAN @ lift).expand_as(critics.matrix))
            critics.linear.zero_()
            critics.constant.zero_()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["isfm", "fmer", "flame"])
def test_shipped_lqr_settings_reach_the_soft_optimum_of_a_frozen_2d_critic(name):
    config = load_experiment(EXPERIMENTS / f"lqr-{name}.yaml", []).algorithm
    torch.manual_seed(0)
    settings = {"batch_size": 128, "alpha": ALPHA, "policy_lr": POLICY_LR}
    algorithm = make_algorithm(config.model_copy(update=settings), 1, np.full(2, -np.inf), np.full(2, np.inf))
    freeze_exact_critic(algorithm)
    generator = torch.Generator().manual_seed(1)
    steps = UPDATES
    for i in range(steps):
        algorithm.set_progress(i / steps)
        for group in algorithm.q_optimizer.param_groups:
            group["lr"] = 0.0
        obs = torch.randn(128, 1, generator=generator)
        with torch.no_grad():
            own = algorithm.policy.sample(obs).action
        old = torch.randn(128, 2, generator=generator)
        actions = torch.where(torch.rand(128, 1, generator=generator) < 0.3, old, own)
        algorithm.update({"obs": obs, "actions": actions, "rewards": torch.zeros(128),
                          "next_obs": torch.randn(128, 1, generator=generator), "terminated": torch.zeros(128)})
    states = np.random.default_rng(0).standard_normal((1024, 1)).astype(np.float32)
    with torch.no_grad():
        samples = algorithm.policy.sample(torch.as_tensor(states), 32).action.double().numpy()
    K, _, Sigma = fit_linear_gaussian(states, samples)
    K_star, Sigma_star = GAIN.double().numpy(), (ALPHA / 2 * torch.linalg.inv(HESSIAN)).double().numpy()
    rel_K = np.linalg.norm(K - K_star) / np.linalg.norm(K_star)
    rel_Sigma = np.linalg.norm(Sigma - Sigma_star) / np.linalg.norm(Sigma_star)
    assert rel_K < TOLERANCE_K and rel_Sigma < TOLERANCE_SIGMA, (rel_K, rel_Sigma, Sigma.tolist(), Sigma_star.tolist())
