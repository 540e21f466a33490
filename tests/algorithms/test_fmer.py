"""FMER's pieces against closed forms: the mirror-descent weights (1) of algorithms/fmer.py, the ESS-tuned trust
region, the ablation weightings, the run without an entropy term, v1's advantage weights (2), the entropy loss (3)
and its switch, and the Hutchinson default (its estimator's unbiasedness is in test_flows.py)."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from softflow.algorithms import make_algorithm
from softflow.algorithms.fields import VelocityField
from softflow.algorithms.flows import FlowPolicy
from softflow.algorithms.fmer import (
    FMERConfig,
    candidate_weights,
    effective_sample_fraction,
    entropy_loss,
    ess_temperature,
)
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.squash import Squash


def test_effective_sample_fraction_is_one_for_uniform_and_one_over_m_for_one_hot():
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    assert torch.allclose(effective_sample_fraction(weights), torch.tensor([1.0, 0.25, 0.5]))


def test_ess_temperature_is_the_smallest_temperature_meeting_the_target():
    advantages = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 5.0
    tau = ess_temperature(advantages, 0.1, target=0.5)

    def ess(t):
        return float(effective_sample_fraction(torch.softmax(advantages / t, -1)).mean())

    assert ess(tau) >= 0.5 and ess(0.99 * tau) < 0.5
    assert abs(ess(tau) - 0.5) < 1e-3


def test_ess_temperature_stays_at_alpha_when_the_full_step_already_keeps_the_target():
    flat = torch.zeros(8, 16) + 0.01 * torch.randn(8, 16)
    assert float(ess_temperature(flat, 0.2, target=0.5)) == pytest.approx(0.2, rel=1e-6)


def test_ess_temperature_without_entropy_term_starts_from_zero():
    advantages = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    tau = ess_temperature(advantages, 0.0, target=0.3)
    assert 0 < tau < 10 and abs(float(effective_sample_fraction(torch.softmax(advantages / tau, -1)).mean())
                                - 0.3) < 1e-3


def test_soft_weights_are_the_mirror_step_importance_weights():
    """softmax(A/(T + alpha)) with A = Q - alpha log pi_k equals pi_k^{T/(T+alpha)} exp(Q/(T+alpha)) / pi_k,
    normalised: the importance weights of candidates from pi_k towards the mirror-descent target."""
    g = torch.Generator().manual_seed(2)
    q, log_pi = torch.randn(4, 8, generator=g) * 3, torch.randn(4, 8, generator=g)
    alpha, temperature = 0.3, 0.7
    got = candidate_weights(q - alpha * log_pi, temperature + alpha, "soft")
    target_log = temperature / (temperature + alpha) * log_pi + q / (temperature + alpha)
    expected = torch.softmax(target_log - log_pi, -1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_top1_and_unnormalised_weightings():
    advantages = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, -2.0]])
    assert torch.equal(candidate_weights(advantages, 1.0, "top1"), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    unnormalised = candidate_weights(advantages, 2.0, "unnormalised")
    assert torch.allclose(unnormalised[0], torch.tensor([math.exp(-0.5), math.exp(0.5), 1.0]))
    assert torch.allclose(unnormalised[1], torch.tensor([math.exp(0.5), 1.0, math.exp(-0.5)]))


def small(**overrides):
    config = dict(flow={"hidden": [32, 32], "steps": 3}, critic={"hidden": [32, 32]}, batch_size=16,
                  num_candidates=4)
    return FMERConfig(**config | overrides)


def test_without_the_entropy_term_alpha_is_zero_and_no_entropy_is_estimated(replay_batch):
    algorithm = make_algorithm(small(entropy_term=False), 3, -np.ones(2), np.ones(2))
    metrics = algorithm.update(replay_batch(16, done=0))
    assert algorithm.alpha == 0.0 and metrics["learner/alpha"] == 0.0
    assert "learner/entropy" not in metrics and math.isfinite(metrics["losses/policy_loss"])


@pytest.mark.parametrize("weighting", ["soft", "top1", "unnormalised"])
def test_each_weighting_updates_and_reports_its_trust_region(weighting, replay_batch):
    algorithm = make_algorithm(small(weighting=weighting, target_ess=0.9), 3, -np.ones(2), np.ones(2))
    metrics = algorithm.update(replay_batch(16, done=0))
    assert metrics["learner/mirror_temperature"] >= 0 and 0 < metrics["learner/weight_ess"] <= 1
    if weighting == "top1":
        assert metrics["learner/weight_ess"] == pytest.approx(0.25)


def test_an_untuned_zero_temperature_without_entropy_is_rejected():
    with pytest.raises(ValidationError, match="mirror_temperature must be > 0"):
        FMERConfig(entropy_term=False, tune_mirror_temperature=False)


@pytest.mark.parametrize("improve_at", ["next_obs", "obs"])
@pytest.mark.parametrize("name", ["fmer", "isfm"])
def test_the_policy_step_is_taken_at_the_configured_states_only(name, improve_at, replay_batch):
    config = small(improve_at=improve_at)
    if name == "isfm":
        config = ISFMConfig(**config.model_dump(include={"flow", "critic", "batch_size", "num_candidates",
                                                         "improve_at"}))
    algorithm = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    unused = "obs" if improve_at == "next_obs" else "next_obs"
    base = replay_batch(16, done=0)
    next_sample = algorithm.policy.sample(base["next_obs"], 4, with_log_prob=True)

    def loss(shifted: str | None) -> float:
        b = base if shifted is None else {**base, shifted: base[shifted] + 3.0}
        torch.manual_seed(1)
        return algorithm.policy_loss(b, next_sample)[0].item()

    assert loss(unused) == loss(None)
    assert abs(loss(improve_at) - loss(None)) > 1e-4


def test_hutchinson_is_the_default_estimator_unless_the_flow_names_one():
    assert FMERConfig().flow.log_prob == "hutchinson"
    assert FMERConfig(flow={"steps": 3}).flow.log_prob == "hutchinson"
    assert FMERConfig(flow={"log_prob": "exact"}).flow.log_prob == "exact"
    algorithm = make_algorithm(small(), 3, -np.ones(2), np.ones(2))
    assert algorithm.policy.log_prob_method == "hutchinson" and algorithm.policy.steps == 3


def test_advantage_weights_are_the_v1_formula():
    """(2): w_j = exp((Q_j - mean_i Q_i) / T), from Q alone (no log pi term) and without a normaliser."""
    q = torch.tensor([[1.0, 3.0, 2.0, -2.0], [0.5, 0.5, 0.5, 4.5]])
    got = candidate_weights(q, 0.5, "advantage")
    expected = torch.tensor([[math.exp((v - sum(row) / 4) / 0.5) for v in row] for row in q.tolist()])
    assert torch.allclose(got, expected, rtol=1e-6)


def test_the_policy_step_uses_the_v1_weights_of_the_candidates_q(replay_batch):
    algorithm = make_algorithm(small(weighting="advantage", tune_mirror_temperature=False, mirror_temperature=0.7),
                               3, -np.ones(2), np.ones(2))
    base = replay_batch(16, done=0)
    candidates = algorithm.policy.sample(base["next_obs"], 4, with_log_prob=True)
    seen = {}
    fm_loss = algorithm.policy.flow_matching_loss

    def spy(obs, targets, weights):
        seen["weights"] = weights
        return fm_loss(obs, targets, weights)

    algorithm.policy.flow_matching_loss = spy
    _, _, metrics = algorithm.policy_loss(base, candidates)
    with torch.no_grad():
        q = algorithm.candidate_q(base["next_obs"], candidates)
    assert torch.allclose(seen["weights"], torch.exp((q - q.mean(-1, keepdim=True)) / 0.7), rtol=1e-5)
    assert float(metrics["learner/mirror_temperature"]) == pytest.approx(0.7)


def test_advantage_weights_with_a_zero_untuned_temperature_are_rejected():
    with pytest.raises(ValidationError, match="weighting advantage"):
        FMERConfig(weighting="advantage", tune_mirror_temperature=False)


class LinearVelocity(VelocityField):
    """v = M x + c: every Euler step is x -> F x + dt c with F = I + dt M, so pi = N(., F^K F^K^T) and
    H(pi) = H(N(0, I)) + K log|det F|, whatever the state."""

    def __init__(self):
        super().__init__()
        self.act_dim = 2
        self.M = nn.Parameter(torch.tensor([[0.3, -0.4], [0.2, -0.5]]))
        self.c = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x, t, obs):
        return x @ self.M.T + self.c


@pytest.fixture
def float64():
    """Tensors made in the test are float64: a float32 mean over 20,000 rows is off by up to 1e-4 depending on the
    BLAS code path (4e-5 on an AMD EPYC), which would hide the closed form behind rounding."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_the_entropy_loss_gradient_is_the_closed_form(method, float64):
    """(3) is lambda E[log pi] = -lambda H + const, so its gradient in M is -lambda K dt F^{-T} with the exact
    log-det (for every sample). With Hutchinson's estimate it is -lambda dt sum_k mean_n eps eps^T, whose mean is
    -lambda K dt I: the diagonal is exact (eps_i^2 = 1) and each off-diagonal entry has standard error
    lambda dt sqrt(K / N), matched within 4 of them. The mean c does not enter the entropy: no gradient reaches it."""
    torch.manual_seed(5)
    steps, n, weight = 5, 20000, 0.3
    velocity = LinearVelocity()
    policy = FlowPolicy(velocity, Squash([-math.inf] * 2, [math.inf] * 2), steps=steps, log_prob_method=method)
    entropy_loss(policy, torch.randn(n, 3), weight).backward()
    dt = 1.0 / steps
    if method == "exact":
        F = torch.eye(2) + dt * velocity.M.detach()
        assert torch.allclose(velocity.M.grad, -weight * steps * dt * torch.linalg.inv(F).T, rtol=0, atol=1e-10)
    else:
        assert torch.allclose(velocity.M.grad.diagonal(), torch.full((2,), -weight * steps * dt), rtol=0, atol=1e-10)
        off = velocity.M.grad - torch.diag(velocity.M.grad.diagonal())
        assert off.abs().max() < 4 * weight * dt * math.sqrt(steps / n)
    assert velocity.c.grad is None or torch.all(velocity.c.grad == 0)


def test_the_entropy_loss_turns_off_exactly_at_update_n(replay_batch):
    algorithm = make_algorithm(small(weighting="advantage", entropy_loss_weight=0.2, entropy_loss_until=3),
                               3, -np.ones(2), np.ones(2))
    losses = [float(algorithm.update(replay_batch(16, done=0))["losses/entropy_loss"]) for _ in range(5)]
    assert all(v != 0 for v in losses[:3]) and losses[3:] == [0.0, 0.0]
    fresh = make_algorithm(small(), 3, -np.ones(2), np.ones(2))
    assert "losses/entropy_loss" not in fresh.update(replay_batch(16, done=0))

