"""Twin critics, Polyak targets, the soft TD target and the temperature, against hand-computed values."""

import copy
import math

import pytest
import torch

from softflow.algorithms import critics as critics_module
from softflow.algorithms.critics import CriticConfig, StackedQuadraticCritics, Temperature, TwinCritic
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


def test_quadratic_critics_are_the_quadratic_forms():
    critics = StackedQuadraticCritics(2, 2, 1)
    matrices = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 3.0]], [[1.0, 0.0, 0.0]] * 3])
    linears = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    with torch.no_grad():
        critics.matrix.copy_(matrices)
        critics.linear.copy_(linears.unsqueeze(-1))
        critics.constant.copy_(torch.tensor([[0.25], [-1.0]]))
    z = torch.tensor([1.0, -2.0, 0.5])
    values = critics(z.view(1, 1, 3))
    for i, constant in enumerate((0.25, -1.0)):
        sym = 0.5 * (matrices[i] + matrices[i].T)
        assert torch.allclose(values[i, 0], -(z @ sym @ z) + z @ linears[i] + constant)


def mlp_by_hand(critics, i, obs, action):
    """Q_i of a stacked one-hidden-layer critic, layer by layer from its weights."""
    first, last = critics.layers
    hidden = torch.relu(torch.cat([obs, action], -1) @ first.weight[i] + first.bias[i])
    return (hidden @ last.weight[i] + last.bias[i]).squeeze(-1)


def test_soft_td_target_and_loss():
    torch.manual_seed(1)
    critic = TwinCritic(CriticConfig(kind="mlp", hidden=[8]), 2, 1)
    with torch.no_grad():
        for p in critic.target.parameters():
            p.add_(0.1 * torch.randn_like(p))  # targets that differ from the online critics
    batch = {"obs": torch.randn(4, 2), "actions": torch.randn(4, 1), "rewards": torch.tensor([1.0, 0.0, -1.0, 2.0]),
             "next_obs": torch.randn(4, 2), "terminated": torch.tensor([0.0, 1.0, 0.0, 0.0])}
    next_action, next_log_prob = torch.randn(4, 1), torch.tensor([0.1, 0.2, -0.3, 0.0])
    alpha, gamma = 0.2, 0.9
    loss, q_mean = critic.td_loss(batch, next_action, next_log_prob, alpha, gamma)
    with torch.no_grad():
        next_q = torch.minimum(mlp_by_hand(critic.target, 0, batch["next_obs"], next_action),
                               mlp_by_hand(critic.target, 1, batch["next_obs"], next_action))
        y = batch["rewards"] + gamma * (1 - batch["terminated"]) * (next_q - alpha * next_log_prob)
        q1, q2 = (mlp_by_hand(critic.online, i, batch["obs"], batch["actions"]) for i in (0, 1))
    assert torch.allclose(loss, ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
    assert torch.allclose(q_mean, q1.mean())
    assert torch.allclose(torch.stack(critic(batch["obs"], batch["actions"])), torch.stack([q1, q2]))
    assert not torch.allclose(q1, q2), "twin critics start from different weights"


def test_min_q_over_candidates_and_frozen_gradients():
    """min_q takes any leading dimensions; frozen=True passes dQ/da to the action but no gradient to the critics."""
    torch.manual_seed(2)
    critic = TwinCritic(CriticConfig(hidden=[16, 16]), 3, 2)
    obs, action = torch.randn(5, 4, 3), torch.randn(5, 4, 2, requires_grad=True)
    q = critic.min_q(obs, action, frozen=True)
    by_hand = torch.minimum(*critic(obs.reshape(20, 3), action.reshape(20, 2))).reshape(5, 4)
    assert torch.allclose(q, by_hand)
    q.sum().backward()
    assert action.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.online.parameters())


@pytest.mark.parametrize("kind", ["mlp", "quadratic"])
def test_candidates_min_q_is_min_q_at_every_candidate(kind, monkeypatch):
    """K candidates per state: the split first layer (state part once per state) and the pieces of about
    CANDIDATE_CHUNK rows (here 7 rows, so 2 states per piece and a short last piece) give min_q at each pair."""
    monkeypatch.setattr(critics_module, "CANDIDATE_CHUNK", 7)
    torch.manual_seed(3)
    critic = TwinCritic(CriticConfig(kind=kind, hidden=[16, 8]), 3, 2)
    obs, actions = torch.randn(5, 3), torch.randn(5, 3, 2)
    q = critic.candidates_min_q(obs, actions)
    expected = torch.stack([critic.min_q(obs[b].expand(3, -1), actions[b]) for b in range(5)])
    assert q.shape == (5, 3) and not q.requires_grad
    assert torch.allclose(q, expected, atol=1e-6)


def test_temperature_moves_towards_the_target_entropy():
    low = Temperature(0.2, autotune=True, target_entropy=-1.0, lr=0.1)
    low.update(torch.tensor(-3.0))
    assert low.value > 0.2, "entropy below target raises alpha"
    # the loss log(alpha) (H - H*) has gradient H - H* = -2 in log alpha; Adam's first step is lr against its sign
    assert math.isclose(low.log_alpha.item(), math.log(0.2) + 0.1, rel_tol=1e-5)
    high = Temperature(0.2, autotune=True, target_entropy=-1.0, lr=0.1)
    high.update(torch.tensor(2.0))
    assert high.value < 0.2
    fixed = Temperature(0.2, autotune=False, target_entropy=-1.0, lr=0.1)
    fixed.update(torch.tensor(-3.0))
    assert math.isclose(fixed.value, 0.2, rel_tol=1e-6)
