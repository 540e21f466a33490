"""SAC Flow (sacflow.py): the noise-augmented rollout keeps the terminal marginal of the deterministic flow at every
state of a state-dependent sigma(s) (on the straight-path field of a Gaussian target, where every marginal is known),
log p_c is the exact Gaussian density of the path and the sampled log p_c its value on the sampled path, the entropy
term's gradient reaches the noise head (and, unbounded, only it), log sigma stays in [-5, 2], the actor gradient is
the exact derivative through the K steps, and with a fixed quadratic critic Q = -c (a - mu)^2 the policy reaches
the optimum of its path objective (docs/algorithms.md, "SAC Flow's optimum on the LQR"): mean mu, variance
K alpha / (2c) with learned noise (K times the Boltzmann alpha / (2c)), sigma^2 / K with fixed noise; alpha tuned
to a reachable entropy target settles where that optimum meets the target.

Straight path towards N(m, diag(s^2)) from N(0, I): x_t = t m + S_t x_0 with S_t^2 = (1 - t)^2 + t^2 s^2, whose
velocity is v(x, t) = m + (t s^2 - (1 - t)) / S_t^2 (x - t m). Every Euler step of the SDE is then affine,
A' = F A + h + sigma sqrt(dt) eps, so the terminal mean and variance follow an exact recursion, and the whole path
is a linear map of (A_0, eps_0..eps_{K-1}): a Gaussian with a closed-form covariance.
"""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from softflow.algorithms import make_algorithm
from softflow.algorithms.fields import MLPVelocity, VelocityField
from softflow.algorithms.sacflow import LOG_STD_MAX, LOG_STD_MIN, NoiseAugmentedFlow, SACFlowConfig, StateLogStd
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
        return M + path_slope(t, S) * (x - t * M)


def path_slope(t, s):
    return (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2)


class StepLogStd(nn.Module):
    """log sigma(s) = log(0.8) where s_0 < 0.5, log(0.3) elsewhere, the same for every action dimension."""

    def __init__(self, act_dim=2):
        super().__init__()
        self.act_dim = act_dim

    def forward(self, obs):
        wide, narrow = obs.new_tensor(math.log(0.8)), obs.new_tensor(math.log(0.3))
        return torch.where(obs[:, :1] < 0.5, wide, narrow).expand(-1, self.act_dim)


def affine_step(t, sigma, steps, drift_correction=True):
    """(gain, offset) of one Euler step of the drift for the Gaussian path field: A + b dt = gain A + offset."""
    dt, slope = 1.0 / steps, path_slope(t, S.double())
    c1, c2 = ((1 - t + sigma**2 * t / 2) / (1 - t), sigma**2 / (2 * (1 - t))) if drift_correction else (1, 0)
    return 1 + dt * (c1 * slope - c2), dt * c1 * M.double() * (1 - slope * t)


def moment_recursion(steps: int, sigma: float, drift_correction: bool = True):
    """Exact mean and variance of A_K for the Gaussian path field (float64)."""
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for i in range(steps):
        gain, offset = affine_step(i / steps, sigma, steps, drift_correction)
        mean = gain * mean + offset
        var = gain**2 * var + sigma**2 / steps
    return mean, var


class PlainDrift(NoiseAugmentedFlow):
    """The rollout without the drift correction (b = v): the negative control."""

    def drift(self, x, t, obs, var):
        return self.velocity(x, t, obs)


def test_noise_augmented_rollout_keeps_the_terminal_marginal_of_the_deterministic_flow_at_every_state():
    for sigma in (0.8, 0.3):
        (noisy_mean, noisy_var), (_, plain_var) = moment_recursion(400, sigma), moment_recursion(400, 0.0)
        torch.testing.assert_close(noisy_mean, M.double(), atol=1e-6, rtol=0)
        torch.testing.assert_close(noisy_var, S.double() ** 2, rtol=0.01, atol=0)
        torch.testing.assert_close(plain_var, S.double() ** 2, rtol=0.01, atol=0)
    torch.manual_seed(0)
    obs = torch.cat([torch.zeros(40000, 1), torch.ones(40000, 1)])  # sigma(s) = 0.8, then 0.3 (StepLogStd)
    with torch.no_grad():
        latent = NoiseAugmentedFlow(GaussianPathVelocity(), UNBOUNDED, 50, StepLogStd()).sample(obs).latent.double()
        uncorrected = PlainDrift(GaussianPathVelocity(), UNBOUNDED, 50, StepLogStd()).sample(obs).latent.double()
    for rows, sigma in ((slice(0, 40000), 0.8), (slice(40000, None), 0.3)):
        mean, var = moment_recursion(50, sigma)
        torch.testing.assert_close(latent[rows].mean(0), mean, atol=0.03, rtol=0)
        torch.testing.assert_close(latent[rows].var(0), var, rtol=0.05, atol=0)
        torch.testing.assert_close(latent[rows].var(0), S.double() ** 2, rtol=0.06, atol=0)
    assert (uncorrected[:40000].var(0) / S.double() ** 2 - 1).abs().min() > 0.3  # without the correction: far off


def test_path_log_prob_is_the_exact_gaussian_density_of_the_path_with_a_state_dependent_sigma():
    """The path (A_0, A_1, A_2) of the Gaussian path field is L z + c with z = (A_0, eps_0, eps_1) ~ N(0, I): its
    density is N(c, L L') (torch.distributions), at any path, for each state's sigma."""
    steps = 2
    policy = NoiseAugmentedFlow(GaussianPathVelocity(), UNBOUNDED, steps, StepLogStd())
    generator = torch.Generator().manual_seed(4)
    for state, sigma in ((0.0, 0.8), (1.0, 0.3)):
        lin, shift = torch.zeros(steps + 1, 2, steps + 1, dtype=torch.float64), torch.zeros(steps + 1, 2,
                                                                                         dtype=torch.float64)
        lin[0, :, 0] = 1.0
        for i in range(steps):
            gain, offset = affine_step(i / steps, sigma, steps)
            lin[i + 1] = gain.unsqueeze(-1) * lin[i]
            lin[i + 1, :, i + 1] += sigma / math.sqrt(steps)
            shift[i + 1] = gain * shift[i] + offset
        covariance = torch.block_diag(*[lin[:, j] @ lin[:, j].T for j in range(2)])  # ordered (dimension, step)
        exact = torch.distributions.MultivariateNormal(shift.T.reshape(-1), covariance_matrix=covariance)
        paths = 1.3 * torch.randn(steps + 1, 64, 2, generator=generator, dtype=torch.float64)
        obs = torch.full((64, 1), state, dtype=torch.float64)
        with torch.no_grad():
            log_p = policy.double().path_log_prob(obs, paths)
        torch.testing.assert_close(log_p, exact.log_prob(paths.permute(1, 2, 0).reshape(64, -1)), rtol=0, atol=1e-9)
def test_sampled_log_prob_is_the_path_density_of_the_sampled_path():
    torch.manual_seed(1)
    velocity = MLPVelocity(3, 2, [16], time_dim=8)
    nn.init.normal_(velocity.net[-1].weight, std=0.5)
    head = StateLogStd(3, 2, [8])
    nn.init.normal_(head.net[-1].weight, std=1.0)
    policy = NoiseAugmentedFlow(velocity, Squash([-2.0, 0.0], [2.0, 1.0]), steps=3, noise=head)
    obs = torch.randn(64, 3)
    assert head(obs).std() > 0.3  # sigma varies from state to state
    torch.manual_seed(5)
    sample = policy.sample(obs, with_log_prob=True)
    torch.manual_seed(5)
    x0, eps = torch.randn(64, 2), torch.randn(3, 64, 2)
    path = policy.rollout(obs, x0, eps)
    torch.testing.assert_close(sample.latent, path[-1])
    torch.testing.assert_close(sample.log_prob, policy.path_log_prob(obs, path), atol=1e-4, rtol=0)
    with torch.no_grad():  # N candidates per state: each carries its own state's sigma
        many = policy.sample(obs[:4], 5, with_log_prob=True)
    assert many.action.shape == (4, 5, 2) and many.log_prob.shape == (4, 5)


def test_path_density_integrates_to_one_over_paths_and_actions():
    """E_q[p_c / q] = 1 by importance sampling over (A_0, A_1, a) with a = tanh(A_2) in (-1, 1): q draws A_0, A_1
    from N(0, 1.5^2) and a uniformly. Leaving out the tanh correction gives 0.57 here; that the transition variance
    is the sampler's sigma^2 dt is checked by the tests above."""
    torch.manual_seed(2)
    velocity = MLPVelocity(1, 1, [16], time_dim=8)
    for p in velocity.parameters():
        nn.init.normal_(p, std=0.4)
    policy = NoiseAugmentedFlow(velocity, Squash([-1.0], [1.0]), steps=2, noise=0.7)
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


def test_the_entropy_term_reaches_the_noise_head_and_only_it_with_the_closed_form_gradient():
    """Unbounded actions: on a sampled path log p_c = const - K sum_j log sigma_j(s) (sacflow.py, (entropy)), so
    the gradient of alpha log p_c alone is -alpha K d(sum_j log sigma_j)/d theta on the head and 0 on the velocity.
    Checked through SACFlow.policy_loss with a critic that is 0 everywhere."""
    config = SACFlowConfig(flow={"velocity": "gated", "hidden": [16], "steps": 4}, noise_hidden=[16],
                           critic={"kind": "quadratic"}, alpha=0.3, batch_size=32)
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 3, np.full(2, -np.inf), np.full(2, np.inf))
    for critics in (algorithm.critic.online, algorithm.critic.target):
        for p in critics.parameters():
            nn.init.zeros_(p)
    obs = torch.randn(32, 3)
    loss, entropy, extra = algorithm.policy_loss({"obs": obs}, None)
    loss.backward()
    head = algorithm.policy.log_std
    got = [p.grad.clone() for p in head.parameters()]
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in algorithm.policy.velocity.parameters())
    head.zero_grad()
    (-0.3 * 4 * head(obs).sum(-1).mean()).backward()
    for g, want in zip(got, (p.grad for p in head.parameters()), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in got) > 1e-3
    log_std = head(obs).detach()
    const = 5 * math.log(2 * math.pi * math.e) + 4 * math.log(0.25)  # (K + 1)(d/2) log(2 pi e) + (K d/2) log dt
    assert float(entropy) == pytest.approx(const + 4 * float(log_std.sum(-1).mean()), abs=0.3)  # 32 paths
    assert float(extra["learner/log_sigma"]) == pytest.approx(float(log_std.mean()))


def test_log_sigma_stays_in_its_bounds_and_starts_inside_them():
    head = StateLogStd(3, 2, [8])
    obs = torch.randn(256, 3)
    assert bool(((head(obs) > LOG_STD_MIN) & (head(obs) < LOG_STD_MAX)).all())
    nn.init.zeros_(head.net[-1].weight)
    nn.init.zeros_(head.net[-1].bias)
    torch.testing.assert_close(head(obs), torch.full((256, 2), -1.5))  # the middle of [-5, 2]
    with torch.no_grad():
        head.net[-1].bias.copy_(torch.tensor([1e4, -1e4]))
    values = head(100 * obs).detach()
    assert (LOG_STD_MIN, LOG_STD_MAX) == (-5.0, 2.0)
    assert float(values[:, 0].max()) == pytest.approx(2.0) and float(values[:, 1].min()) == pytest.approx(-5.0)
    assert bool(((values >= -5.0) & (values <= 2.0)).all())


def test_actor_gradient_is_the_derivative_through_all_k_steps():
    torch.manual_seed(3)
    velocity = MLPVelocity(2, 1, [8], time_dim=4)
    for p in velocity.parameters():
        nn.init.normal_(p, std=0.5)
    head = StateLogStd(2, 1, [4])
    policy = NoiseAugmentedFlow(velocity, Squash([-1.0], [1.0]), steps=5, noise=head)
    obs, x0, eps = torch.randn(4, 2), torch.randn(4, 1), torch.randn(5, 4, 1)

    def objective():
        path = policy.rollout(obs, x0, eps)
        return (policy.squash(path[-1]).sum() + policy.path_log_prob(obs, path).sum()).double()

    objective().backward()
    for weight in (velocity.net[0].weight, head.net[0].weight):
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
        assert weight.grad.abs().max() > 0.01


def fixed_quadratic_run(steps, alpha=0.2, curvature=2.0, mu=0.7, k=4, **overrides):
    """One state dim, one unbounded action dim; the critic is frozen at Q = -c (a - mu)^2; the policy's learning
    rate falls to 5 % over the run. Returns 20000 actions at s = 0, the last update's metrics and the algorithm."""
    config = SACFlowConfig(**{"flow": {"velocity": "mlp", "hidden": [64, 64], "steps": k}, "noise_hidden": [16],
                              "alpha": alpha, "autotune_alpha": False, "q_lr": 1e-12, "policy_lr": 1e-3,
                              "lr_final_fraction": 0.05, "batch_size": 64, "policy_frequency": 1,
                              "critic": {"kind": "quadratic"}, **overrides})
    torch.manual_seed(3)
    algorithm = make_algorithm(config, 1, np.full(1, -np.inf), np.full(1, np.inf))
    for critics in (algorithm.critic.online, algorithm.critic.target):  # both twins, online and target
        with torch.no_grad():
            critics.matrix.copy_(torch.tensor([[0.0, 0.0], [0.0, curvature]]))
            critics.linear.copy_(torch.tensor([[0.0], [2 * curvature * mu]]))
            critics.constant.fill_(-curvature * mu**2)
    batch = {"obs": torch.zeros(64, 1), "actions": torch.zeros(64, 1), "rewards": torch.zeros(64),
             "next_obs": torch.zeros(64, 1), "terminated": torch.ones(64)}
    for step in range(steps):
        algorithm.set_progress(step / steps)
        metrics = algorithm.update(batch)
    return algorithm.act(np.zeros((20000, 1), dtype=np.float32), explore=True), metrics, algorithm


def test_with_a_fixed_quadratic_q_learned_noise_reaches_the_path_objective_optimum_k_alpha_over_2c():
    """docs/algorithms.md, "SAC Flow's optimum on the LQR": mean mu, variance K alpha / (2c) = 0.2 (four times the
    Boltzmann alpha / (2c) = 0.05), sigma^2 = alpha K^2 / (2c) = 0.8; path_optimum_covariance says the same."""
    actions, metrics, algorithm = fixed_quadratic_run(300, policy_lr=1e-2)
    assert abs(actions.mean() - 0.7) < 0.06
    assert actions.var() == pytest.approx(0.2, rel=0.1)
    assert float(metrics["learner/log_sigma"]) == pytest.approx(0.5 * math.log(0.8), abs=0.05)
    assert algorithm.path_optimum_covariance(np.array([[2.0]]), 0.2) == pytest.approx(np.array([[0.2]]))
    assert metrics["learner/actor_grad_norm"] > 0


def test_the_fixed_noise_variant_collapses_to_sigma2_dt_as_before():
    """Fixed sigma: the path entropy is a constant, so only E[Q] is maximised and the spread left is the last
    step's noise, sigma^2 / K = 0.0025, twenty times below alpha / (2c) = 0.05. alpha is fixed by default."""
    assert SACFlowConfig(noise="fixed").autotune_alpha is False
    assert SACFlowConfig(noise="fixed", autotune_alpha=True).autotune_alpha is True
    actions, metrics, algorithm = fixed_quadratic_run(300, noise="fixed", noise_std=0.1, policy_lr=1e-3,
                                                      lr_final_fraction=1.0)
    assert abs(actions.mean() - 0.7) < 0.03
    assert 0.8 < actions.var() / (0.1**2 / 4) < 1.3, actions.var()
    assert float(metrics["learner/log_sigma"]) == pytest.approx(math.log(0.1))
    assert not any(key.startswith("log_std") for key in algorithm.policy.state_dict())  # no new parameters
    assert algorithm.path_optimum_covariance(np.array([[2.0]]), 0.2) == pytest.approx(np.array([[0.0025]]))


def test_alpha_tunes_to_a_reachable_entropy_target_where_the_path_optimum_meets_it():
    """Target H* = 1.5495 nats = (entropy) at sigma^2 = 0.25 (K = 4, d = 1). The path optimum has
    sigma^2 = alpha K^2 / (2c), so the dual update must settle at alpha = 2 c sigma^2 / K^2 = 0.0625."""
    actions, metrics, algorithm = fixed_quadratic_run(500, policy_lr=1e-2, autotune_alpha=True,
                                                      target_entropy=1.5495, alpha_lr=2e-2)
    assert algorithm.alpha == pytest.approx(0.0625, rel=0.15)
    assert float(metrics["learner/log_sigma"]) == pytest.approx(0.5 * math.log(0.25), abs=0.06)
    assert actions.var() == pytest.approx(4 * 0.0625 / 4, rel=0.15)


def test_defaults_are_the_codes_learned_noise_entropy_target_0_and_one_policy_step_every_3_updates():
    config = SACFlowConfig()
    assert (config.noise, config.noise_hidden, config.autotune_alpha, config.target_entropy, config.alpha) == (
        "learned", [512, 512], True, 0.0, 0.2)
    assert (config.policy_schedule, config.policy_frequency, config.batch_size) == ("delayed", 3, 512)


def test_state_dict_round_trip_gives_the_identical_next_update_and_reports_the_actor_gradient_norm(replay_batch):
    config = SACFlowConfig(flow={"velocity": "gated", "hidden": [16], "steps": 3}, critic={"hidden": [16]},
                           noise_hidden=[16], batch_size=16, policy_frequency=2)
    batch = replay_batch(16, done=0)
    torch.manual_seed(0)
    original = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    first = original.update(batch)
    assert len(original.grad_norms) == 1 and first["learner/actor_grad_norm"] > 0  # delayed: one policy step
    assert "learner/actor_grad_norm" not in original.update(batch)  # no policy step at odd updates
    restored = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    torch.manual_seed(7)
    expected = original.update(batch)
    torch.manual_seed(7)
    assert restored.update(batch) == expected
    assert "learner/alpha" in expected and "learner/log_sigma" in expected
    weights = original.policy_weights()
    assert any(key.startswith("log_std.") for key in weights["policy"])  # actors get the noise head
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
def test_every_shipped_sacflow_experiment_loads_with_the_codes_schedule(path):
    config = load_experiment(path, [])
    assert config.algorithm.name == "sacflow" and config.algorithm.flow.integrator == "euler"
    assert (config.algorithm.policy_schedule, config.algorithm.policy_frequency) == ("delayed", 3)
    assert config.algorithm.noise == "learned"


def test_the_lqr_experiment_keeps_its_alpha():
    config = load_experiment(EXPERIMENTS[0].with_name("lqr-sacflow.yaml"), [])
    assert (config.algorithm.alpha, config.algorithm.autotune_alpha) == (0.05, False)


def test_sacflow_experiments_cover_mujoco_kitchen_the_pendulum_and_the_lqr():
    assert {"inverted-pendulum-sacflow.yaml", "lqr-sacflow.yaml", "kitchen-4task-sacflow.yaml"} <= {
        p.name for p in EXPERIMENTS}
    assert (EXPERIMENTS[0].parent / "mujoco" / "halfcheetah-sacflow.yaml").is_file()
