"""What every policy returns, and the Gaussian policy of SAC.

Both policy kinds map a base draw x_0 ~ N(0, I) to a latent and squash it into the action box, so that
``sample(obs, num_samples, with_log_prob, noise)`` means the same thing for a flow and for a Gaussian; ``noise=0``
gives the deterministic action (the flow's mean path, the Gaussian's mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from softflow.algorithms.networks import mlp
from softflow.algorithms.squash import Squash


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I), summed over the last dimension."""
    return -0.5 * (x.pow(2).sum(-1) + x.shape[-1] * math.log(2 * math.pi))


@dataclass
class PolicySample:
    """Actions, their pre-squash latents, and (optionally) log pi(action | s); leading shape (B,) or (B, N)."""

    action: torch.Tensor
    latent: torch.Tensor
    log_prob: torch.Tensor | None


def draw_base_noise(obs: torch.Tensor, count: int, dim: int, noise: torch.Tensor | None) -> torch.Tensor:
    """x_0 ~ N(0, I) of shape (count, dim), or the given ``noise`` reshaped to it."""
    if noise is None:
        return torch.randn(count, dim, device=obs.device, dtype=obs.dtype)
    return noise.reshape(count, dim).to(obs)


class GaussianPolicy(nn.Module):
    """SAC's policy: x = mu(s) + sigma(s) x_0, log sigma squashed into [log_std_min, log_std_max] (CleanRL)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], squash: Squash,
                 log_std_min: float = -5.0, log_std_max: float = 2.0):
        super().__init__()
        self.act_dim = act_dim
        self.squash = squash
        self.trunk = mlp(obs_dim, hidden[:-1], hidden[-1])
        self.trunk.append(nn.ReLU())
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)
        self.log_std_min = log_std_min
        self.log_std_max = log_std_max

    def sample(self, obs: torch.Tensor, num_samples: int | None = None, with_log_prob: bool = False,
               noise: torch.Tensor | None = None) -> PolicySample:
        batch, n = obs.shape[0], num_samples or 1
        features = self.trunk(obs)
        mean, log_std = self.mean(features), torch.tanh(self.log_std(features))
        if n > 1:
            mean, log_std = mean.repeat_interleave(n, dim=0), log_std.repeat_interleave(n, dim=0)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1)
        eps = draw_base_noise(obs, batch * n, self.act_dim, noise)
        x = mean + log_std.exp() * eps
        log_prob = None
        if with_log_prob:
            log_prob = standard_normal_log_prob(eps) - log_std.sum(-1) - self.squash.log_abs_det_jacobian(x)
        shape = (batch, n) if num_samples is not None else (batch,)
        return PolicySample(
            action=self.squash(x).reshape(*shape, self.act_dim),
            latent=x.reshape(*shape, self.act_dim),
            log_prob=None if log_prob is None else log_prob.reshape(shape),
        )
