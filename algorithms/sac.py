"""Gaussian SAC, the baseline (Haarnoja et al. 2018, with CleanRL's defaults).

Policy improvement minimises E_s E_{a~pi}[alpha log pi(a|s) - min_i Q_i(s, a)] through the reparameterised
sample a = Squash(mu(s) + sigma(s) x_0). Defaults: batch 256, q lr 1e-3, policy lr 3e-4, policy_frequency 2,
log-std in [-5, 2], target entropy -|A|, and alpha autotuned from 1.0 (CleanRL and Stable-Baselines3 start
log alpha at 0; docs/algorithms.md section 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, FiniteFloat, PositiveInt

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.policy import GaussianPolicy, PolicySample
from softflow.algorithms.squash import Squash


class SACConfig(AlgorithmConfig):
    name: Literal["sac"] = "sac"
    hidden: list[PositiveInt] = Field([256, 256], min_length=1, description="policy MLP widths")
    log_std_min: FiniteFloat = Field(-5.0, description="lower bound of log sigma")
    log_std_max: FiniteFloat = Field(2.0, description="upper bound of log sigma")
    alpha: FiniteFloat = Field(1.0, gt=0, description="entropy temperature (initial value when autotuned: CleanRL's "
                                                      "1.0)")


class SAC(SoftActorCritic):
    Config = SACConfig
    config: SACConfig

    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> GaussianPolicy:
        c = self.config
        return GaussianPolicy(obs_dim, act_dim, c.hidden, squash, c.log_std_min, c.log_std_max)

    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.reparameterised_policy_loss(batch)
