"""SAC Flow's velocity fields (velocities.py): Flow-G's gated update and its affine closed form, Flow-T's attention
against torch's reference, per-sample independence (no attention across samples or flow steps), Jacobians, and
both fields as the velocity of another flow algorithm (ISFM-SAC) through ``flow.velocity``."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from softflow.algorithms import make_algorithm
from softflow.algorithms.flows import FlowConfig, FlowPolicy, make_flow_policy
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.squash import Squash
from softflow.algorithms.velocities import CrossAttention, DecodedVelocity, GatedVelocity

OBS, D = 3, 2


def randomise(module: nn.Module, std: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=std)
    return module


def test_gated_euler_step_is_the_papers_blend_and_the_gate_starts_near_one():
    torch.manual_seed(0)
    velocity = GatedVelocity(OBS, D, [16], time_dim=8)
    x, t, obs = torch.randn(6, D), torch.rand(6, 1), torch.randn(6, OBS)
    h = torch.cat([x, velocity.time(t), obs], -1)
    gate = torch.sigmoid(velocity.gate(h))
    torch.testing.assert_close(gate, torch.full_like(gate, 1 / (1 + math.exp(-5.0))))
    randomise(velocity)
    policy = FlowPolicy(velocity, Squash([-math.inf] * D, [math.inf] * D), steps=4)
    gate, candidate = torch.sigmoid(velocity.gate(h)), velocity.candidate(h)
    torch.testing.assert_close(policy.step(x, t, obs), x + 0.25 * gate * (candidate - x))


def test_gated_flow_with_a_constant_gate_and_candidate_is_the_gaussian_of_its_affine_recursion():
    """g = sigmoid(b), v_hat = c: A_{k+1} = rho A_k + (1 - rho) c with rho = 1 - dt g, so A_K ~ N(c (1 - rho^K),
    rho^{2K} I) and the exact log-density of FlowPolicy (generic Jacobians) must be that Gaussian's."""
    velocity = GatedVelocity(OBS, D, [8], time_dim=8, gate_bias=0.7)
    c = torch.tensor([1.5, -0.5])
    with torch.no_grad():
        velocity.candidate[-1].weight.zero_()
        velocity.candidate[-1].bias.copy_(c)
    steps = 5
    policy = FlowPolicy(velocity, Squash([-math.inf] * D, [math.inf] * D), steps=steps)
    torch.manual_seed(1)
    with torch.no_grad():
        sample = policy.sample(torch.randn(20000, OBS), with_log_prob=True)
    rho = 1 - torch.sigmoid(torch.tensor(0.7)) / steps
    mean, std = c * (1 - rho**steps), rho**steps
    expected = torch.distributions.Normal(mean, std).log_prob(sample.latent).sum(-1)
    torch.testing.assert_close(sample.log_prob, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(sample.latent.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(sample.latent.std(0), std.expand(D), atol=0.01, rtol=0)


def test_cross_attention_matches_torch_multi_head_attention_and_one_token_gives_weights_one():
    torch.manual_seed(2)
    attention = CrossAttention(16, 4)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attention.query.weight, attention.key.weight,
                                                  attention.value.weight]))
        reference.in_proj_bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
        reference.out_proj.weight.copy_(attention.out.weight)
        reference.out_proj.bias.copy_(attention.out.bias)
    tokens, context = torch.randn(5, 1, 16), torch.randn(5, 3, 16)
    torch.testing.assert_close(attention(tokens, context), reference(tokens, context, context)[0])
    one = context[:, :1]
    value_only = attention.out(attention.value(one))
    torch.testing.assert_close(attention(tokens, one), value_only)
    torch.testing.assert_close(attention(torch.randn(5, 1, 16), one), value_only)


@pytest.mark.parametrize("kind", ["gated", "decoded"])
def test_each_sample_is_decoded_on_its_own_and_the_generic_jacobian_matches_autograd(kind):
    velocity = randomise(GatedVelocity(OBS, D, [16], 8) if kind == "gated" else DecodedVelocity(OBS, D, 16, 4, 2, 8))
    x, t, obs = torch.randn(4, D), torch.rand(4, 1), torch.randn(4, OBS)
    full = torch.autograd.functional.jacobian(lambda xx: velocity(xx, t, obs), x)  # (4, D, 4, D)
    cross = full.clone()
    for i in range(4):
        cross[i, :, i] = 0
    assert cross.abs().max() < 1e-6
    v, jac = velocity.forward_and_jacobian(x, t, obs)
    torch.testing.assert_close(v, velocity(x, t, obs))
    torch.testing.assert_close(jac, torch.stack([full[i, :, i] for i in range(4)]))
    assert jac.abs().max() > 0.05


def test_decoded_velocity_starts_at_zero_so_the_initial_policy_is_the_base_distribution():
    torch.manual_seed(3)
    policy = make_flow_policy(FlowConfig(velocity="decoded", d_model=16, heads=2, layers=1, steps=3), OBS, D,
                              Squash([-math.inf] * D, [math.inf] * D))
    noise = torch.randn(7, D)
    sample = policy.sample(torch.randn(7, OBS), noise=noise, with_log_prob=True)
    torch.testing.assert_close(sample.latent, noise)
    torch.testing.assert_close(sample.log_prob, torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum(-1))


@pytest.mark.parametrize("kind", ["gated", "decoded"])
def test_isfm_trains_with_either_velocity_and_round_trips_its_state(kind, replay_batch):
    config = ISFMConfig(flow={"velocity": kind, "hidden": [16], "d_model": 16, "heads": 2, "layers": 1, "steps": 3},
                        critic={"hidden": [16]}, batch_size=16, num_candidates=4)
    torch.manual_seed(4)
    algorithm = make_algorithm(config, OBS, -np.ones(D), np.ones(D))
    assert isinstance(algorithm.policy.velocity, GatedVelocity if kind == "gated" else DecodedVelocity)
    batch = replay_batch(16, OBS, D, done=0)
    before = copy.deepcopy(algorithm.policy.state_dict())
    for _ in range(3):
        metrics = algorithm.update(batch)
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in algorithm.policy.state_dict().items())
    restored = make_algorithm(config, OBS, -np.ones(D), np.ones(D))
    restored.load_state_dict(copy.deepcopy(algorithm.state_dict()))
    obs = np.zeros((2, OBS), dtype=np.float32)
    np.testing.assert_array_equal(restored.act(obs, explore=False), algorithm.act(obs, explore=False))


def test_an_unknown_velocity_is_a_config_error():
    with pytest.raises(ValueError, match="velocity"):
        FlowConfig(velocity="lstm")
