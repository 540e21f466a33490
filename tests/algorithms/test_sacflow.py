"""SAC Flow (sacflow.py): the noise-augmented rollout keeps the terminal marginal of the deterministic flow (on the
straight-path field of a Gaussian target, where every marginal is known), log p_c is a normalised density of the
path, the actor gradient is the exact derivative through the K steps, and with a fixed quadratic critic the policy
reaches the mean of exp(Q/alpha) but the covariance sigma^2 dt the path density implies, not alpha / (2c).

Straight path towards N(m, diag(s^2)) from N(0, I): x_t = t m + S_t x_0 with S_t^2 = (1 - t)^2 + t^2 s^2, whose
velocity is v(x, t) = m + (t s^2 - (1 - t)) / S_t^2 (x - t m). Every Euler step of the SDE is then affine,
A' = F A + h + sigma sqrt(dt) eps, so the terminal mean and variance follow an exact recursion.
"""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from softflow.algorithms import make_algorithm
from softflow.algorithms.flows import MLPVelocity, VelocityField
from softflow.algorithms.sacflow import NoiseAugmentedFlow, SACFlowConfig
from softflow.algorithms.squash import Squash
from softflow.deploy.config import load_experiment

M = torch.tensor([0.8, -0.3])
S = torch.tensor([0.5, 1.5])
UNBOUNDED = Squash([-math.inf] * 2, [math.inf] * 2)


class GaussianPathVelocity(VelocityField):
    """The straight-path (flow-matching) velocity of the target N(M, diag(S^2)) (module docstring)."""

    def __init__(self):
        super().__init__()
        self.act_dim = 2

    def forward(self, x, t, obs):
        slope = (t * S**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * S**2)
        return M + slope * (x - t * M)


def moment_recursion(steps: int, sigma: float, drift_correction: bool = True):
    """Exact mean and variance of A_K for the Gaussian path field (float64)."""
    m, s = M.double(), S.double()
    dt, mean, var = 1.0 / steps, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for i in range(steps):
        t = i / steps
        slope = (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2)
        c1, c2 = ((1 - t + sigma**2 * t / 2) / (1 - t), sigma**2 / (2 * (1 - t))) if drift_correction else (1, 0)
        gain = 1 + dt * (c1 * slope - c2)
        mean = gain * mean + dt * c1 * m * (1 - slope * t)
        var = gain**2 * var + sigma**2 * dt
    return mean, var


class PlainDrift(NoiseAugmentedFlow):
    """The rollout without the drift correction (b = v): the negative control."""

    def drift(self, x, t, obs):
        return self.velocity(x, t, obs)


def test_noise_augmented_rollout_keeps_the_terminal_marginal_of_the_deterministic_flow():
    sigma = 0.8
    (noisy_mean, noisy_var), (_, plain_var) = moment_recursion(400, sigma), moment_recursion(400, 0.0)
    torch.testing.assert_close(noisy_mean, M.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(noisy_var, S.double() ** 2, rtol=0.01, atol=0)
    torch.testing.assert_close(plain_var, S.double() ** 2, rtol=0.01, atol=0)
    torch.manual_seed(0)
    obs = torch.zeros(40000, 1)
    with torch.no_grad():
        latent = NoiseAugmentedFlow(GaussianPathVelocity(), UNBOUNDED, 50, sigma).sample(obs).latent.double()
        uncorrected = PlainDrift(GaussianPathVelocity(), UNBOUNDED, 50, sigma).sample(obs).latent.double()
    mean, var = moment_recursion(50, sigma)
    torch.testing.assert_close(latent.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(latent.var(0), var, rtol=0.05, atol=0)
    torch.testing.assert_close(latent.var(0), S.double() ** 2, rtol=0.06, atol=0)
    assert (uncorrected.var(0) / S.double() ** 2 - 1).abs().min() > 0.3  # without the correction: far off


def test_sampled_log_prob_is_the_path_density_of_the_sampled_path():
    torch.manual_seed(1)
    velocity = MLPVelocity(3, 2, [16], time_dim=8)
    nn.init.normal_(velocity.net[-1].weight, std=0.5)
    policy = NoiseAugmentedFlow(velocity, Squash([-2.0, 0.0], [2.0, 1.0]), steps=3, noise_std=0.3)
    obs = torch.randn(64, 3)
    torch.manual_seed(5)
    sample = policy.sample(obs, with_log_prob=True)
    torch.manual_seed(5)
    x0, eps = torch.randn(64, 2), torch.randn(3, 64, 2)
    path = policy.rollout(obs, x0, eps)
    torch.testing.assert_close(sample.latent, path[-1])
    torch.testing.assert_close(sample.log_prob, policy.path_log_prob(obs, path), atol=1e-4, rtol=0)


def test_path_density_integrates_to_one_over_paths_and_actions():
    """E_q[p_c / q] = 1 by importance sampling over (A_0, A_1, a) with a = tanh(A_2) in (-1, 1): q draws A_0, A_1
    from N(0, 1.5^2) and a uniformly. Leaving out the tanh correction gives 0.57 here; that the transition variance
    is the sampler's sigma^2 dt is checked by the test above."""
    torch.manual_seed(2)
    velocity = MLPVelocity(1, 1, [16], time_dim=8)
    for p in velocity.parameters():
        nn.init.normal_(p, std=0.4)
    policy = NoiseAugmentedFlow(velocity, Squash([-1.0], [1.0]), steps=2, noise_std=0.7)
    n = 400_000
    generator = torch.Generator().manual_seed(3)
    proposal = torch.distributions.Normal(0.0, 1.5)
    hidden = 1.5 * torch.randn(2, n, 1, generator=generator)
    action = torch.rand(n, 1, generator=generator) * 2 - 1
    path = torch.cat([hidden, torch.atanh(action.clamp(-1 + 1e-7, 1 - 1e-7)).unsqueeze(0)])
    with torch.no_grad():
        log_p = policy.path_log_prob(torch.zeros(n, 1), path)
    log_q = proposal.log_prob(hidden).sum((0, 2)) + math.log(0.5)
    ratio = (log_p - log_q).double().exp()
    stderr = float(ratio.std() / math.sqrt(n))
    assert stderr < 0.01
    assert abs(float(ratio.mean()) - 1) < 4 * stderr + 1e-3, (float(ratio.mean()), stderr)


def test_actor_gradient_is_the_derivative_through_all_k_steps():
    torch.manual_seed(3)
    velocity = MLPVelocity(2, 1, [8], time_dim=4)
    for p in velocity.parameters():
        nn.init.normal_(p, std=0.5)
    policy = NoiseAugmentedFlow(velocity, Squash([-1.0], [1.0]), steps=5, noise_std=0.1)
    obs, x0, eps = torch.randn(4, 2), torch.randn(4, 1), torch.randn(5, 4, 1)
    weight = velocity.net[0].weight

    def objective():
        path = policy.rollout(obs, x0, eps)
        return (policy.squash(path[-1]).sum() + policy.path_log_prob(obs, path).sum()).double()

    objective().backward()
    h, numeric = 1e-3, torch.zeros_like(weight)
    with torch.no_grad():
        for index in np.ndindex(*weight.shape):
            weight[index] += h
            up = objective()
            weight[index] -= 2 * h
            down = objective()
            weight[index] += h
            numeric[index] = float((up - down) / (2 * h))
    torch.testing.assert_close(weight.grad, numeric, atol=2e-3, rtol=2e-2)
    assert weight.grad.abs().max() > 0.05


def fixed_quadratic_run(steps, alpha=0.2, curvature=2.0, mu=0.7, sigma=0.1, k=4):
    """One state dim, one unbounded action dim; the critic is frozen at Q = -c (a - mu)^2."""
    config = SACFlowConfig(flow={"velocity": "mlp", "hidden": [64, 64], "steps": k}, noise_std=sigma, alpha=alpha,
                           autotune_alpha=False, q_lr=1e-12, policy_lr=1e-3, batch_size=64, policy_frequency=1,
                           critic={"kind": "quadratic"})
    torch.manual_seed(3)
    algorithm = make_algorithm(config, 1, np.full(1, -np.inf), np.full(1, np.inf))
    for critics in (algorithm.critic.online, algorithm.critic.target):  # both twins, online and target
        with torch.no_grad():
            critics.matrix.copy_(torch.tensor([[0.0, 0.0], [0.0, curvature]]))
            critics.linear.copy_(torch.tensor([[0.0], [2 * curvature * mu]]))
            critics.constant.fill_(-curvature * mu**2)
    batch = {"obs": torch.zeros(64, 1), "actions": torch.zeros(64, 1), "rewards": torch.zeros(64),
             "next_obs": torch.zeros(64, 1), "terminated": torch.ones(64)}
    for _ in range(steps):
        metrics = algorithm.update(batch)
    return algorithm.act(np.zeros((20000, 1), dtype=np.float32), explore=True), metrics


def test_with_a_fixed_quadratic_q_the_mean_is_soft_optimal_but_the_covariance_collapses_to_sigma2_dt():
    """The path entropy is a constant (sacflow.py), so only E[Q] is maximised: the spread left is the last step's
    noise, sigma^2 / K = 0.0025, twenty times below the Boltzmann variance alpha / (2c) = 0.05."""
    actions, metrics = fixed_quadratic_run(300)
    assert abs(actions.mean() - 0.7) < 0.03
    assert 0.8 < actions.var() / (0.1**2 / 4) < 1.3, actions.var()
    assert actions.var() < 0.1 * 0.2 / (2 * 2.0)
    assert metrics["learner/actor_grad_norm"] > 0


def test_state_dict_round_trip_gives_the_identical_next_update_and_reports_the_actor_gradient_norm():
    config = SACFlowConfig(flow={"velocity": "gated", "hidden": [16], "steps": 3}, critic={"hidden": [16]},
                           batch_size=16, policy_frequency=2)
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(16, 3, generator=g), "actions": torch.rand(16, 2, generator=g) * 2 - 1,
             "rewards": torch.randn(16, generator=g), "next_obs": torch.randn(16, 3, generator=g),
             "terminated": torch.zeros(16)}
    torch.manual_seed(0)
    original = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    first = original.update(batch)
    assert len(original.grad_norms) == 2 and first["learner/actor_grad_norm"] > 0
    assert "learner/actor_grad_norm" not in original.update(batch)  # no policy step at odd updates
    restored = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    torch.manual_seed(7)
    expected = original.update(batch)
    torch.manual_seed(7)
    assert restored.update(batch) == expected
    weights = original.policy_weights()
    actor = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    actor.load_policy_weights(weights)
    obs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(actor.act(obs, explore=False), original.act(obs, explore=False))
    assert actor.act(obs, explore=True, candidates=4).shape == (5, 2)


def test_midpoint_is_rejected():
    with pytest.raises(ValueError, match="Euler"):
        SACFlowConfig(flow={"integrator": "midpoint"})


def test_a_base_other_than_the_standard_normal_is_rejected():
    with pytest.raises(ValueError, match="base_std"):
        SACFlowConfig(flow={"base_std": 0.5})


EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "cluster" / "experiments").glob("*sacflow*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_sacflow_experiment_loads(path):
    config = load_experiment(path, [])
    assert config.algorithm.name == "sacflow" and config.algorithm.flow.integrator == "euler"


def test_sacflow_experiments_cover_mujoco_kitchen_the_pendulum_and_the_lqr():
    assert {"halfcheetah-sacflow.yaml", "inverted-pendulum-sacflow.yaml", "lqr-sacflow.yaml",
            "kitchen-4task-sacflow.yaml"} <= {p.name for p in EXPERIMENTS}
