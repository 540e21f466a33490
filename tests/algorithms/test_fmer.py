"""FMER's pieces against closed forms: the mirror-descent weights (1) of algorithms/fmer.py, the ESS-tuned trust
region, the ablation weightings, and the run without an entropy term."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from softflow.algorithms import make_algorithm
from softflow.algorithms.fmer import (FMERConfig, candidate_weights, effective_sample_fraction,
                                      ess_temperature)
from softflow.algorithms.isfm import ISFMConfig


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


def batch(n=16, obs=3, act=2):
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(n, obs, generator=g), "actions": torch.rand(n, act, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, obs, generator=g),
            "terminated": torch.zeros(n)}


def test_without_the_entropy_term_alpha_is_zero_and_no_entropy_is_estimated():
    algorithm = make_algorithm(small(entropy_term=False), 3, -np.ones(2), np.ones(2))
    metrics = algorithm.update(batch())
    assert algorithm.alpha == 0.0 and metrics["learner/alpha"] == 0.0
    assert "learner/entropy" not in metrics and math.isfinite(metrics["losses/policy_loss"])


@pytest.mark.parametrize("weighting", ["soft", "top1", "unnormalised"])
def test_each_weighting_updates_and_reports_its_trust_region(weighting):
    algorithm = make_algorithm(small(weighting=weighting, target_ess=0.9), 3, -np.ones(2), np.ones(2))
    metrics = algorithm.update(batch())
    assert metrics["learner/mirror_temperature"] >= 0 and 0 < metrics["learner/weight_ess"] <= 1
    if weighting == "top1":
        assert metrics["learner/weight_ess"] == pytest.approx(0.25)


def test_an_untuned_zero_temperature_without_entropy_is_rejected():
    with pytest.raises(ValidationError, match="mirror_temperature must be > 0"):
        FMERConfig(entropy_term=False, tune_mirror_temperature=False)


@pytest.mark.parametrize("improve_at", ["next_obs", "obs"])
@pytest.mark.parametrize("name", ["fmer", "isfm"])
def test_the_policy_step_is_taken_at_the_configured_states_only(name, improve_at):
    config = small(improve_at=improve_at)
    if name == "isfm":
        config = ISFMConfig(**config.model_dump(include={"flow", "critic", "batch_size", "num_candidates",
                                                         "improve_at"}))
    algorithm = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    unused = "obs" if improve_at == "next_obs" else "next_obs"
    base = batch()
    next_sample = algorithm.policy.sample(base["next_obs"], 4, with_log_prob=True)

    def loss(shifted: str | None) -> float:
        b = base if shifted is None else {**base, shifted: base[shifted] + 3.0}
        torch.manual_seed(1)
        return algorithm.policy_loss(b, next_sample)[0].item()

    assert loss(unused) == loss(None)
    assert abs(loss(improve_at) - loss(None)) > 1e-4
