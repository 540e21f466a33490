"""Twin critics, Polyak targets, the soft TD target and the temperature, against hand-computed values."""

import copy
import math

import torch

from softflow.algorithms.critics import CriticConfig, QuadraticCritic, Temperature, TwinCritic
from softflow.algorithms.networks import polyak_update


def test_polyak_update_is_exact():
    torch.manual_seed(0)
    source = torch.nn.Linear(3, 2)
    target = copy.deepcopy(source)
    for p in target.parameters():
        torch.nn.init.normal_(p)
    before = [p.clone() for p in target.parameters()]
    polyak_update(target, source, 0.005)
    for new, old, src in zip(target.parameters(), before, source.parameters()):
        assert torch.allclose(new, 0.005 * src + 0.995 * old, atol=1e-7)
    polyak_update(target, source, 1.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), source.parameters()))


def test_quadratic_critic_is_the_quadratic_form():
    critic = QuadraticCritic(2, 1)
    with torch.no_grad():
        critic.matrix.copy_(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 3.0]]))
        critic.linear.copy_(torch.tensor([1.0, 0.0, -1.0]))
        critic.constant.fill_(0.25)
    obs, act = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5]])
    z = torch.tensor([1.0, -2.0, 0.5])
    sym = 0.5 * (critic.matrix + critic.matrix.T)
    assert torch.allclose(critic(obs, act), -(z @ sym @ z) + z @ critic.linear + 0.25)


def test_soft_td_target_and_loss():
    torch.manual_seed(1)
    critic = TwinCritic(CriticConfig(kind="mlp", hidden=[8]), 2, 1)
    batch = {"obs": torch.randn(4, 2), "actions": torch.randn(4, 1), "rewards": torch.tensor([1.0, 0.0, -1.0, 2.0]),
             "next_obs": torch.randn(4, 2), "terminated": torch.tensor([0.0, 1.0, 0.0, 0.0])}
    next_action, next_log_prob = torch.randn(4, 1), torch.tensor([0.1, 0.2, -0.3, 0.0])
    alpha, gamma = 0.2, 0.9
    loss, _ = critic.td_loss(batch, next_action, next_log_prob, alpha, gamma)
    with torch.no_grad():
        next_q = torch.minimum(critic.target[0](batch["next_obs"], next_action),
                               critic.target[1](batch["next_obs"], next_action))
        y = batch["rewards"] + gamma * (1 - batch["terminated"]) * (next_q - alpha * next_log_prob)
        q1, q2 = critic(batch["obs"], batch["actions"])
    assert torch.allclose(loss, ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
    assert not torch.allclose(q1, q2), "twin critics start from different weights"


def test_temperature_moves_towards_the_target_entropy():
    low = Temperature(0.2, autotune=True, target_entropy=-1.0, lr=0.1)
    low.update(torch.tensor(-3.0))
    assert low.value > 0.2, "entropy below target raises alpha"
    high = Temperature(0.2, autotune=True, target_entropy=-1.0, lr=0.1)
    high.update(torch.tensor(2.0))
    assert high.value < 0.2
    fixed = Temperature(0.2, autotune=False, target_entropy=-1.0, lr=0.1)
    fixed.update(torch.tensor(-3.0))
    assert math.isclose(fixed.value, 0.2, rel_tol=1e-6)
