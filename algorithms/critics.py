"""Twin soft Q critics with Polyak targets, and the entropy temperature alpha.

Soft policy evaluation (SAC; ALGORITHMS.md "Common ground"): for a transition (s, a, r, s', done) and a' ~ pi(.|s'),
    y = r + gamma (1 - done) (min_i Q_target_i(s', a') - alpha log pi(a'|s'))
and each critic minimises (Q_i(s, a) - y)^2. Targets follow theta' <- tau theta + (1 - tau) theta'.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn import functional as F

from softflow.algorithms.networks import mlp, polyak_update


class CriticConfig(BaseModel):
    """The Q-network. ``mlp``: Q(s, a) = MLP([s, a]). ``quadratic``: Q(s, a) = -z^T S z + b^T z + c with z = [s; a]
    and S symmetric, the exact function class of a linear-quadratic problem (the LQR case study)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mlp", "quadratic"] = "mlp"
    hidden: list[int] = [256, 256]


class MLPCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class QuadraticCritic(nn.Module):
    """Q(s, a) = -z^T S z + b^T z + c, z = [s; a], S = (M + M^T) / 2 (not constrained to be definite)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        dim = obs_dim + act_dim
        self.matrix = nn.Parameter(torch.eye(dim) * 0.1)
        self.linear = nn.Parameter(torch.zeros(dim))
        self.constant = nn.Parameter(torch.zeros(()))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        z = torch.cat([obs, action], dim=-1)
        sym = 0.5 * (self.matrix + self.matrix.T)
        return -((z @ sym) * z).sum(-1) + z @ self.linear + self.constant


def make_critic(config: CriticConfig, obs_dim: int, act_dim: int) -> nn.Module:
    if config.kind == "quadratic":
        return QuadraticCritic(obs_dim, act_dim)
    return MLPCritic(obs_dim, act_dim, config.hidden)


class TwinCritic(nn.Module):
    """Two independent Q-networks and their Polyak-averaged targets."""

    def __init__(self, config: CriticConfig, obs_dim: int, act_dim: int):
        super().__init__()
        self.q1 = make_critic(config, obs_dim, act_dim)
        self.q2 = make_critic(config, obs_dim, act_dim)
        self.target = nn.ModuleList([copy.deepcopy(self.q1), copy.deepcopy(self.q2)]).requires_grad_(False)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, action), self.q2(obs, action)

    def min_q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2) over the leading dimensions of ``obs`` and ``action``."""
        return torch.minimum(self.q1(obs, action), self.q2(obs, action))

    def min_target_q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.minimum(self.target[0](obs, action), self.target[1](obs, action))

    def td_loss(
        self, batch: dict[str, torch.Tensor], next_action: torch.Tensor, next_log_prob: torch.Tensor,
        alpha: float, gamma: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of both critics' squared soft TD errors (mean over the batch) and the mean Q1 value."""
        with torch.no_grad():
            next_v = self.min_target_q(batch["next_obs"], next_action) - alpha * next_log_prob
            target = batch["rewards"] + gamma * (1.0 - batch["terminated"]) * next_v
        q1, q2 = self(batch["obs"], batch["actions"])
        return F.mse_loss(q1, target) + F.mse_loss(q2, target), q1.detach().mean()

    def update_targets(self, tau: float) -> None:
        polyak_update(self.target[0], self.q1, tau)
        polyak_update(self.target[1], self.q2, tau)


class Temperature(nn.Module):
    """alpha, fixed or tuned towards a target entropy H*: minimise log(alpha) (H(pi) - H*) (SAC v2)."""

    def __init__(self, alpha: float, autotune: bool, target_entropy: float, lr: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=autotune)
        self.autotune = autotune
        self.target_entropy = target_entropy
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=lr) if autotune else None

    @property
    def value(self) -> float:
        return float(self.log_alpha.detach().exp())

    def update(self, entropy: torch.Tensor) -> None:
        """One step on a detached entropy estimate; a no-op when alpha is fixed."""
        if self.optimizer is None:
            return
        loss = self.log_alpha * (entropy.detach() - self.target_entropy)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
