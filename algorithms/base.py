"""The interface every algorithm implements, and the soft actor-critic skeleton they share.

``Algorithm`` is what the rest of softflow sees (act, update, state_dict/load_state_dict, policy_weights).
``SoftActorCritic`` holds what SAC and the flow algorithms have in common: twin soft Q critics with Polyak
targets, the temperature alpha, the optimisers, and the update schedule: the critic steps every update and, every
``policy_frequency`` updates, the policy takes ``policy_frequency`` steps in a burst (``policy_schedule: burst``,
CleanRL's SAC: policy and critic see the same number of steps) or one step (``policy_schedule: delayed``, TD3's
and CrossQ's policy delay, the schedule of SAC Flow's and FLAME's code).
Subclasses build the policy and define ``policy_loss``.

Each update draws ``samples_per_next_state`` actions at every next state s' in one flow solve, with their
log-densities: the first serves the soft TD target, and all of them are handed to ``policy_loss``, so an algorithm
that needs candidates (ISFM's importance weights) costs one solve per update, not two.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat
from torch import nn
from torch.profiler import record_function

from softflow.algorithms.critics import CriticConfig, Temperature, TwinCritic
from softflow.algorithms.policy import PolicySample
from softflow.algorithms.squash import Squash


class AlgorithmConfig(BaseModel):
    """Fields every algorithm shares (CleanRL SAC defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    gamma: FiniteFloat = Field(0.99, gt=0, lt=1, description="discount factor")
    tau: FiniteFloat = Field(0.005, gt=0, le=1, description="Polyak rate of the target critics")
    batch_size: int = Field(256, ge=1, description="transitions per update")
    q_lr: FiniteFloat = Field(1e-3, gt=0, description="critic learning rate (Adam)")
    policy_lr: FiniteFloat = Field(3e-4, gt=0, description="policy learning rate (Adam)")
    policy_frequency: int = Field(2, ge=1, description="the policy steps every this many updates")
    policy_schedule: Literal["burst", "delayed"] = Field(
        "burst", description="burst: policy_frequency policy steps each time (CleanRL's SAC); delayed: one step "
                             "(TD3's policy delay)")
    alpha: FiniteFloat = Field(0.2, gt=0, description="entropy temperature (initial value when autotuned)")
    autotune_alpha: bool = Field(True, description="tune alpha towards target_entropy")
    target_entropy: FiniteFloat | None = Field(None, description="entropy target; default -|A|")
    alpha_lr: FiniteFloat = Field(1e-3, gt=0, description="learning rate of log(alpha)")
    lr_final_fraction: FiniteFloat = Field(
        1.0, gt=0, le=1, description="q_lr and policy_lr fall linearly to this fraction of themselves over the run "
                                     "(1 = constant, CleanRL's anneal_lr idea)")
    critic: CriticConfig = CriticConfig()


class Algorithm(abc.ABC):
    """An off-policy learner: acts for actors, updates from replay batches, and (de)serialises itself."""

    config: AlgorithmConfig

    @abc.abstractmethod
    def act(self, obs: np.ndarray, explore: bool, candidates: int = 1) -> np.ndarray:
        """Actions for a batch of observations (B, obs_dim) -> (B, act_dim); best of ``candidates`` by Q."""

    def set_progress(self, fraction: float) -> None:
        """Tells the algorithm how far training is (0 at the start, 1 at the end of the budget), for schedules."""
        return None

    @abc.abstractmethod
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One gradient update on a batch; returns namespaced metrics (``losses/...``, ``learner/...``) as
        detached 0-d tensors on the learner's device."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: networks, optimisers, alpha, counters."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    @abc.abstractmethod
    def alpha(self) -> float:
        """The current entropy temperature."""

    @abc.abstractmethod
    def policy_weights(self) -> dict[str, Any]:
        """What actors need to act (the policy and, for best-of-N, the critic), as CPU tensors."""

    @abc.abstractmethod
    def load_policy_weights(self, weights: dict[str, Any]) -> None: ...


class SoftActorCritic(Algorithm):
    """Shared skeleton: soft policy evaluation with twin critics; subclasses supply the policy improvement."""

    policy: nn.Module
    samples_per_next_state: int = 1

    def __init__(self, config: AlgorithmConfig, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        act_dim = len(action_low)
        # copies: arrays that arrive through Ray are read-only, which torch warns about
        squash = Squash(np.array(action_low, dtype=np.float32), np.array(action_high, dtype=np.float32))
        self.policy = self.build_policy(obs_dim, act_dim, squash).to(self.device)
        self.critic = TwinCritic(config.critic, obs_dim, act_dim).to(self.device)
        target_entropy = -float(act_dim) if config.target_entropy is None else config.target_entropy
        self.temperature = Temperature(config.alpha, config.autotune_alpha, target_entropy, config.alpha_lr)
        self.temperature.to(self.device)
        # fused Adam: one kernel per step, and the step counts stay tensors (the foreach version reads them back)
        self.q_optimizer = torch.optim.Adam(self.critic.online.parameters(), lr=config.q_lr, fused=True)
        self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.policy_lr, fused=True)
        self.num_updates = 0

    def set_progress(self, fraction: float) -> None:
        """Linear learning-rate annealing from the configured rates to ``lr_final_fraction`` of them."""
        scale = 1.0 - min(max(fraction, 0.0), 1.0) * (1.0 - self.config.lr_final_fraction)
        for optimizer, lr in ((self.q_optimizer, self.config.q_lr), (self.policy_optimizer, self.config.policy_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale

    @abc.abstractmethod
    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> nn.Module:
        """The policy network; its ``sample(obs, num_samples, with_log_prob, noise)`` returns a PolicySample."""

    @abc.abstractmethod
    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(loss to minimise, detached entropy estimate for alpha or None without an entropy term, extra metrics).
        ``next_sample`` holds
        ``samples_per_next_state`` draws of the policy at each ``batch["next_obs"]``, shape (B, N, d)."""

    @property
    def entropy_regularised(self) -> bool:
        """False for an ablation without the entropy term: alpha is 0 and no log-densities are computed."""
        return True

    @property
    def alpha(self) -> float:
        """The current temperature as a number (a host read: for reports and acting, not for updates)."""
        return float(self.alpha_tensor)

    @property
    def alpha_tensor(self) -> torch.Tensor:
        """alpha as a 0-d tensor on the device (0 without the entropy term): what updates use."""
        return self.temperature.value if self.entropy_regularised else self.temperature.value.new_zeros(())

    @property
    def policy_steps_per_turn(self) -> int:
        """Policy steps taken every ``policy_frequency`` updates (module docstring, the schedule)."""
        return self.config.policy_frequency if self.config.policy_schedule == "burst" else 1

    def reparameterised_policy_loss(self, batch: dict[str, torch.Tensor]
                                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """SAC's actor loss E_s[alpha log pi(a|s) - min_i Q_i(s, a)] through a reparameterised sample a at the
        batch's states (Gaussian SAC; SAC Flow through its K-step rollout)."""
        obs = batch["obs"]
        sample = self.policy.sample(obs, with_log_prob=True)
        q = self.critic.min_q(obs, sample.action, frozen=True)
        loss = (self.temperature.value * sample.log_prob - q).mean()
        return loss, -sample.log_prob.detach().mean(), {}

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One update. Metrics are detached 0-d tensors: nothing here reads a value back to the host (no
        ``.item()``, no branch on a tensor), so a GPU learner never waits; the learner reads them in one go."""
        alpha = self.alpha_tensor
        with torch.no_grad(), record_function("softflow.sample"):
            next_sample = self.policy.sample(batch["next_obs"], self.samples_per_next_state,
                                             with_log_prob=self.entropy_regularised)
        with record_function("softflow.critic_step"):
            next_log_prob = next_sample.log_prob[:, 0] if self.entropy_regularised else torch.zeros_like(
                next_sample.action[:, 0, 0])
            q_loss, q_mean = self.critic.td_loss(batch, next_sample.action[:, 0], next_log_prob, alpha,
                                                 self.config.gamma)
            self.q_optimizer.zero_grad()
            q_loss.backward()
            self.q_optimizer.step()
        metrics = {"losses/q_loss": q_loss.detach(), "learner/q_mean": q_mean}
        if self.num_updates % self.config.policy_frequency == 0:
            with record_function("softflow.policy_step"):
                for _ in range(self.policy_steps_per_turn):
                    loss, entropy, extra = self.policy_loss(batch, next_sample)
                    self.policy_optimizer.zero_grad()
                    loss.backward()
                    self.policy_optimizer.step()
                    if self.entropy_regularised:
                        self.temperature.update(entropy)
            metrics |= {"losses/policy_loss": loss.detach(), **extra}
            if entropy is not None:
                metrics["learner/entropy"] = entropy.detach()
        self.critic.update_targets(self.config.tau)
        self.num_updates += 1
        metrics["learner/alpha"] = self.alpha_tensor
        return metrics

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool, candidates: int = 1) -> np.ndarray:
        """Best-of-N acting: draw ``candidates`` actions per state, execute the one with the highest min(Q1, Q2).

        With one candidate this is plain sampling (``explore``) or the deterministic action (the flow's path from
        x_0 = 0, the Gaussian's mean); with several, the candidates are random draws in both modes and the critic
        picks, so evaluation, acting and the policy server share this one selection rule.
        """
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if candidates == 1:
            noise = None if explore else torch.zeros(obs_t.shape[0], self.policy.act_dim, device=self.device)
            return self.policy.sample(obs_t, noise=noise).action.cpu().numpy()
        actions = self.policy.sample(obs_t, candidates).action
        q = self.critic.candidates_min_q(obs_t, actions)
        best = q.argmax(dim=1)
        return actions[torch.arange(obs_t.shape[0], device=self.device), best].cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict(),
            "temperature": self.temperature.state_dict(),
            "q_optimizer": self.q_optimizer.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "alpha_optimizer": self.temperature.optimizer.state_dict() if self.temperature.optimizer else None,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.temperature.load_state_dict(state["temperature"])
        self.q_optimizer.load_state_dict(state["q_optimizer"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        if self.temperature.optimizer is not None:
            self.temperature.optimizer.load_state_dict(state["alpha_optimizer"])
            for group in self.temperature.optimizer.param_groups:  # the config's rate (a PBT restore may change it)
                group["lr"] = self.config.alpha_lr
        else:  # a fixed alpha is the config's (the same on resume; a PBT restore may change it)
            with torch.no_grad():
                self.temperature.log_alpha.fill_(math.log(self.config.alpha))
        self.num_updates = state["num_updates"]

    def policy_weights(self) -> dict[str, Any]:
        def to_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

        return {"policy": to_cpu(self.policy), "critic": to_cpu(self.critic.online)}

    def load_policy_weights(self, weights: dict[str, Any]) -> None:
        self.policy.load_state_dict(weights["policy"])
        self.critic.online.load_state_dict(weights["critic"])
