"""Twin soft Q critics with Polyak targets, and the entropy temperature alpha.

Soft policy evaluation (SAC; docs/algorithms.md "Common ground"): for a transition (s, a, r, s', done) and a' ~
pi(.|s'),
    y = r + gamma (1 - done) (min_i Q_target_i(s', a') - alpha log pi(a'|s'))
and each critic minimises (Q_i(s, a) - y)^2. Targets follow theta' <- tau theta + (1 - tau) theta'.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn
from torch.nn import functional as F

from softflow.algorithms.networks import polyak_update

CANDIDATE_CHUNK = 1024  # rows per piece of a candidate evaluation: each layer's activations stay in the CPU's cache


class CriticConfig(BaseModel):
    """The Q-network. ``mlp``: Q(s, a) = MLP([s, a]). ``quadratic``: Q(s, a) = -z^T S z + b^T z + c with z = [s; a]
    and S symmetric, the exact function class of a linear-quadratic problem (the LQR case study)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mlp", "quadratic"] = "mlp"
    hidden: list[PositiveInt] = Field([256, 256], description="MLP widths (mlp only)")


class StackedLinear(nn.Module):
    """``n`` independent linear layers evaluated as one batched matrix product: x (n, N, in) -> (n, N, out).
    Each slice starts as ``nn.Linear`` does (U(-1/sqrt(in), 1/sqrt(in)) for weights and biases)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        weight, bias = (self.weight.detach(), self.bias.detach()) if frozen else (self.weight, self.bias)
        if weight.shape[-1] == 1:  # a batched matrix-vector product is 3-4x faster as multiply-and-sum, both ways
            return (x * weight.transpose(1, 2)).sum(-1, keepdim=True).add_(bias)
        return torch.matmul(x, weight).add_(bias)


class StackedMLPCritics(nn.Module):
    """``n`` Q-networks Q_i(s, a) = MLP_i([s, a]) (ReLU) as one stacked network: every layer of all of them is
    one batched matrix product on stacked weights, so twin critics cost the kernel launches of one."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        widths = [obs_dim + act_dim, *hidden, 1]
        self.layers = nn.ModuleList(StackedLinear(n, a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """z: (n or 1, N, o + d) -> (n, N)."""
        h = z.expand(len(self.layers[0].weight), -1, -1)
        return self._hidden_to_q(torch.relu_(self.layers[0](h, frozen)), frozen)

    def _hidden_to_q(self, h: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The layers after the first, from its activations (n, N, width) to the values (n, N)."""
        for layer in self.layers[1:-1]:
            h = torch.relu_(layer(h, frozen))  # in place: the (n, N, width) activations are the memory traffic
        return self.layers[-1](h, frozen).squeeze(-1)

    def candidates(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Values of K actions at each state: obs (B, o), actions (B, K, d) -> (n, B, K). The first layer splits
        as W [s; a] + b = (W_s s + b) + W_a a, so the state's part is computed once per state, not K times (and
        the narrow [s; a] input, a slow shape for a matrix product, never forms)."""
        first, o = self.layers[0], obs.shape[-1]
        batch, k, d = actions.shape
        state_part = torch.matmul(obs, first.weight[:, :o]).add_(first.bias).unsqueeze(2)  # (n, B, 1, width)
        h = torch.matmul(actions.reshape(1, batch * k, d), first.weight[:, o:])  # (n, B K, width)
        h = h.view(*state_part.shape[:2], k, -1).add_(state_part).relu_()
        return self._hidden_to_q(h.flatten(1, 2)).view(-1, batch, k)


class StackedQuadraticCritics(nn.Module):
    """``n`` critics Q_i(s, a) = -z^T S_i z + b_i^T z + c_i, z = [s; a], S_i = (M_i + M_i^T) / 2 (not
    constrained to be definite)."""

    def __init__(self, n: int, obs_dim: int, act_dim: int):
        super().__init__()
        dim = obs_dim + act_dim
        self.matrix = nn.Parameter(torch.eye(dim).repeat(n, 1, 1) * 0.1)
        self.linear = nn.Parameter(torch.zeros(n, dim, 1))
        self.constant = nn.Parameter(torch.zeros(n, 1))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        params = [p.detach() if frozen else p for p in (self.matrix, self.linear, self.constant)]
        matrix, linear, constant = params
        sym = 0.5 * (matrix + matrix.transpose(1, 2))
        return -((z @ sym) * z).sum(-1) + (z @ linear).squeeze(-1) + constant


class TwinCritic(nn.Module):
    """Two independent Q-networks, stacked (``online``), and their Polyak-averaged targets (``target``).

    Every method takes ``obs`` (..., o) and ``action`` (..., d) with the same leading dimensions and returns
    values of those leading dimensions."""

    def __init__(self, config: CriticConfig, obs_dim: int, act_dim: int):
        super().__init__()
        if config.kind == "quadratic":
            self.online: nn.Module = StackedQuadraticCritics(2, obs_dim, act_dim)
        else:
            self.online = StackedMLPCritics(2, obs_dim, act_dim, config.hidden)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    @staticmethod
    def _evaluate(critics: nn.Module, obs: torch.Tensor, action: torch.Tensor, frozen: bool = False
                  ) -> torch.Tensor:
        """(2, *lead) values."""
        z = torch.cat([obs, action], dim=-1).reshape(1, -1, obs.shape[-1] + action.shape[-1])
        return critics(z, frozen).reshape(2, *obs.shape[:-1])

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q1, q2 = self._evaluate(self.online, obs, action)
        return q1, q2

    def min_q(self, obs: torch.Tensor, action: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """min(Q1, Q2). ``frozen``: gradients flow to ``action`` but not to the critics' parameters (the actor
        step of SAC and SAC Flow needs dQ/da only, which saves the critics' weight gradients)."""
        return self._evaluate(self.online, obs, action, frozen).amin(0)

    def min_target_q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self._evaluate(self.target, obs, action).amin(0)

    @torch.no_grad()
    def candidates_min_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2) of K candidate actions at each state, obs (B, o) and actions (B, K, d) -> (B, K), without
        gradients (importance weights, best-of-N acting). MLP critics take the state's part of the first layer
        once per state (``StackedMLPCritics.candidates``), in pieces of about ``CANDIDATE_CHUNK`` rows."""
        k = actions.shape[1]
        if not isinstance(self.online, StackedMLPCritics):
            return self.min_q(obs.unsqueeze(1).expand(-1, k, -1), actions)
        states = max(1, CANDIDATE_CHUNK // k)
        return torch.cat([self.online.candidates(part_obs, part_actions).amin(0)
                          for part_obs, part_actions in zip(obs.split(states), actions.split(states))])

    def td_loss(
        self, batch: dict[str, torch.Tensor], next_action: torch.Tensor, next_log_prob: torch.Tensor,
        alpha: torch.Tensor | float, gamma: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of both critics' squared soft TD errors (mean over the batch) and the mean Q1 value."""
        with torch.no_grad():
            next_v = self.min_target_q(batch["next_obs"], next_action) - alpha * next_log_prob
            target = batch["rewards"] + gamma * (1.0 - batch["terminated"]) * next_v
        q = self._evaluate(self.online, batch["obs"], batch["actions"])
        return 2 * F.mse_loss(q, target.expand_as(q)), q[0].detach().mean()

    def update_targets(self, tau: float) -> None:
        polyak_update(self.target, self.online, tau)


class Temperature(nn.Module):
    """alpha, fixed or tuned towards a target entropy H*: minimise log(alpha) (H(pi) - H*) (SAC v2)."""

    def __init__(self, alpha: float, autotune: bool, target_entropy: float, lr: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=autotune)
        self.autotune = autotune
        self.target_entropy = target_entropy
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=lr, fused=True) if autotune else None

    @property
    def value(self) -> torch.Tensor:
        """alpha as a 0-d tensor on the learner's device (no host read)."""
        return self.log_alpha.detach().exp()

    def update(self, entropy: torch.Tensor) -> None:
        """One Adam step on a detached entropy estimate H, with the loss's gradient in log alpha, H - H*, set
        directly (no autograd graph for a scalar); a no-op when alpha is fixed."""
        if self.optimizer is None:
            return
        self.log_alpha.grad = (entropy.detach() - self.target_entropy).to(self.log_alpha)
        self.optimizer.step()
