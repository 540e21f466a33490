"""SAC Flow: SAC with a flow policy trained end to end through its K-step rollout (arXiv 2509.25756, "Sample-Efficient
RL of Flow-Based Policies via Velocity-Reparameterized Sequential Modeling"; docs/algorithms.md section 4).

The policy is a K-step Euler rollout of a velocity field v (naive MLP, Flow-G or Flow-T: velocities.py), made
stochastic so that it has a tractable density (the paper's noise-augmented rollout), with a noise scale sigma(s)
learned per state and action dimension:
    log sigma(s) = -5 + 3.5 (tanh(h(s)) + 1)   in [-5, 2],   h an MLP on the state,                     (noise)
    A_0 ~ N(0, I),   A_{i+1} = A_i + b(A_i, t_i, s) dt + sigma(s) sqrt(dt) eps_i,   eps_i ~ N(0, I),   t_i = i / K,
    b(A, t, s) = ((1 - t + t sigma^2 / 2) / (1 - t)) v(t, A, s) - (sigma^2 / (2 (1 - t))) A,           (drift)
(elementwise in the action dimensions) and a = Squash(A_K). For the straight (rectified) path
x_t = (1 - t) x_0 + t x_1 the score of the marginal p_t is (t v - x) / (1 - t), so b = v + (sigma^2 / 2) score:
sigma(s) is constant in t and A, so at every state the SDE dA = b dt + sigma dW has the marginals of the ODE
dA = v dt at every t, and in particular the same terminal marginal. Its path density is a product of Gaussians,
    log p_c(A_0..A_K | s) = log N(A_0; 0, I) + sum_i log N(A_{i+1}; A_i + b(A_i, t_i, s) dt, sigma(s)^2 dt)
                            - sum_j log(1 - tanh(A_K,j)^2) (+ the rescaling, ``Squash``),               (log p_c)
used in place of log pi in the actor loss and in the soft TD target (critics.py):
    L_actor = E_s E_{eps} [ alpha log p_c - min_i Q_i(s, Squash(A_K)) ],                                (actor)
backpropagated through all K steps (reparameterised: A_K is a differentiable function of the parameters, of
sigma(s) and of A_0, eps_0..eps_{K-1}). The official code leaves out the drift correction and the sqrt(dt); this
module follows the paper, and tests/algorithms/test_sacflow.py checks that the terminal marginal of the
deterministic flow is preserved and that log p_c is a normalised path density.

What log p_c regularises. Along a sampled path the residual of every transition is exactly sigma(s) sqrt(dt) eps_i,
so each transition term is log N(eps_i; 0, I) - sum_j log sigma_j(s) - (d/2) log dt, and
    -E[log p_c | s] = (K + 1) (d/2) log(2 pi e) + (K d / 2) log dt + K sum_j log sigma_j(s) + E[tanh term]. (entropy)
The entropy bonus reaches the noise head alone (K alpha per unit of log sigma_j); the velocity sees it only
through the tanh term, and otherwise only -E[Q]. So the velocity learns to undo the noise of the first K - 1
steps (they earn entropy but cost nothing once undone) and sigma grows until the last step's noise balances
alpha K log sigma against E[Q]: on the LQR the optimum is N(-K* s, (K alpha / 2) diag(H_uu)^-1), K times the
soft-optimal covariance when H_uu is diagonal (docs/algorithms.md, "SAC Flow's optimum on the LQR";
``SACFlow.path_optimum_covariance``).

Choices the paper leaves open, with the reason:
- sigma(s) depends on the state only (``noise: learned``, the official Flow-G code's log-std MLP on the
  observation, widths 512, 512 with ReLU: ``noise_hidden``), bounded by the tanh rescaling into [-5, 2] as there
  and in SAC: a sigma that varied along the path (the Flow-T code's per-step head) would void the drift
  correction's marginal argument. The bound applies to sigma, whose step noise is sigma sqrt(dt) (the paper's
  convention; the code's per-step std carries no sqrt(dt)).
- ``noise: fixed`` keeps sigma a number (``noise_std``, the paper's 0.1): the path entropy is then a constant, the
  velocity undoes all noise but the last step's and the covariance collapses to sigma^2 dt I (the module's
  behaviour before the learned head). alpha is then fixed by default: -E[log p_c] can never exceed the constant
  of (entropy), so a target above it would raise alpha without end.
- alpha is tuned (``autotune_alpha``, initial 0.2, lr 1e-3, the code's) towards ``target_entropy`` 0 (the code's
  -|A| * 0): with learned noise the estimate (entropy) moves with log sigma, so any target is reachable inside
  the bounds ((K + 1)(d/2) log(2 pi e) + (K d/2) log dt + K d log sigma for unbounded actions).
- Deterministic acting (evaluation with one candidate): the drift path from A_0 = 0 with every eps_i = 0, i.e. the
  noise-free part of the sampler that was trained (not the plain ODE, whose marginals equal the SDE's only when v
  is a flow-matching field, which a velocity trained through the rollout need not be). A given ``noise`` (x_0) in
  ``sample`` means this deterministic path.
- Euler only: the paper's rollout and density are Euler's; ``flow.integrator: midpoint`` is rejected.
- Defaults from the paper's code: K = 4 (``flow.steps``), Flow-G with one hidden layer of 512 (``flow.hidden``),
  batch 512, policy lr 3e-4, q lr 1e-3, one policy step every 3 critic updates (``policy_schedule: delayed``,
  ``policy_frequency: 3``, the code's CrossQ-style ``policy_delay``). Its CrossQ critics (batch renormalisation,
  no target network) and Adam beta1 = 0.5 are not reproduced: the critics are the skeleton's.
- ``learner/actor_grad_norm``: the L2 norm of the actor gradient (before the optimiser step; no clipping), the
  quantity of the paper's gradient-stability claim, averaged over an update's policy steps; ``grad_norms`` keeps
  each step's after an update (``softflow bench gradients``). ``learner/log_sigma``: the batch's mean log sigma.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, FiniteFloat, PositiveInt, field_validator, model_validator
from torch import nn

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.fields import VelocityField
from softflow.algorithms.flows import FlowConfig, FlowPolicy, make_velocity
from softflow.algorithms.networks import mlp
from softflow.algorithms.policy import PolicySample, draw_base_noise, standard_normal_log_prob
from softflow.algorithms.squash import Squash

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class StateLogStd(nn.Module):
    """log sigma(s) of (noise): an MLP on the state (ReLU), tanh-rescaled into [low, high]; shape (n, d)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], low: float = LOG_STD_MIN,
                 high: float = LOG_STD_MAX):
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.low, self.high = low, high

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.low + 0.5 * (self.high - self.low) * (torch.tanh(self.net(obs)) + 1)


class FixedLogStd(nn.Module):
    """log sigma = log ``std`` at every state (``noise: fixed``); not a parameter, not in the state dict."""

    def __init__(self, act_dim: int, std: float):
        super().__init__()
        if std <= 0:
            raise ValueError(f"noise_std must be positive (the path density needs it), got {std}")
        self.register_buffer("value", torch.full((act_dim,), math.log(std)), persistent=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value.expand(obs.shape[0], -1)


class NoiseAugmentedFlow(FlowPolicy):
    """A velocity field rolled out with K noise-augmented Euler steps (module docstring, (noise), (drift) and
    (log p_c)). ``noise``: a module mapping states (n, o) to log sigma (n, d), or a number, the fixed sigma."""

    def __init__(self, velocity: VelocityField, squash: Squash, steps: int, noise: nn.Module | float):
        super().__init__(velocity, squash, steps, "euler", "exact")
        self.log_std = noise if isinstance(noise, nn.Module) else FixedLogStd(velocity.act_dim, float(noise))

    def drift(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """b(A, t, s) of (drift), with ``var`` = sigma(s)^2 (n, d): the velocity plus sigma^2 / 2 times the
        straight path's score (t v - A) / (1 - t)."""
        v = self.velocity(x, t, obs)
        return (1 - t + 0.5 * var * t) / (1 - t) * v - var / (2 * (1 - t)) * x

    def _time(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0], 1), i / self.steps, device=like.device, dtype=like.dtype)

    def rollout(self, obs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                log_std: torch.Tensor | None = None) -> torch.Tensor:
        """The path A_0..A_K (K + 1, n, d) from A_0 = ``x0`` (n, d) with step noises ``eps`` (K, n, d);
        ``log_std`` (n, d) is log sigma(s), computed from ``obs`` when not given."""
        log_std = self.log_std(obs) if log_std is None else log_std
        dt, std = 1.0 / self.steps, log_std.exp()
        var, step_std = std.square(), std * math.sqrt(dt)
        path = [x0]
        for i in range(self.steps):
            x = path[-1]
            path.append(x + dt * self.drift(x, self._time(i, x), obs, var) + step_std * eps[i])
        return torch.stack(path)

    def path_log_prob(self, obs: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """log p_c of any path (K + 1, n, d) with the action Squash(A_K), shape (n,): (log p_c) term by term."""
        dt, log_std = 1.0 / self.steps, self.log_std(obs)
        var = (2 * log_std).exp()
        log_prob = standard_normal_log_prob(path[0]) - self.squash.log_abs_det_jacobian(path[-1])
        for i in range(self.steps):
            mean = path[i] + dt * self.drift(path[i], self._time(i, path[i]), obs, var)
            log_prob = log_prob - 0.5 * ((path[i + 1] - mean).pow(2) / (var * dt)
                                         + math.log(2 * math.pi * dt) + 2 * log_std).sum(-1)
        return log_prob

    def sample(self, obs: torch.Tensor, num_samples: int | None = None, with_log_prob: bool = False,
               noise: torch.Tensor | None = None) -> PolicySample:
        """Actions Squash(A_K) and log p_c, leading shape (B, N) with ``num_samples`` else (B,). A given ``noise``
        is A_0 and makes the rollout deterministic (every eps_i = 0). On the sampled path the transition terms of
        log p_c are log N(eps_i; 0, I) - sum_j log sigma_j(s) - (d/2) log dt ((entropy))."""
        batch, n = obs.shape[0], num_samples or 1
        flat_obs = obs.repeat_interleave(n, dim=0) if n > 1 else obs
        log_std = self.log_std(obs)
        log_std = log_std.repeat_interleave(n, dim=0) if n > 1 else log_std
        x0 = draw_base_noise(obs, batch * n, self.act_dim, noise)
        eps = x0.new_zeros(self.steps, *x0.shape) if noise is not None else torch.randn(self.steps, *x0.shape,
                                                                                           device=x0.device)
        x = self.rollout(flat_obs, x0, eps, log_std)[-1]
        log_prob = None
        if with_log_prob:
            transitions = standard_normal_log_prob(eps).sum(0) - self.steps * (
                log_std.sum(-1) + 0.5 * self.act_dim * math.log(1.0 / self.steps))
            log_prob = standard_normal_log_prob(x0) + transitions - self.squash.log_abs_det_jacobian(x)
        shape = (batch, n) if num_samples is not None else (batch,)
        return PolicySample(action=self.squash(x).reshape(*shape, self.act_dim),
                            latent=x.reshape(*shape, self.act_dim),
                            log_prob=None if log_prob is None else log_prob.reshape(shape))


class SACFlowConfig(AlgorithmConfig):
    name: Literal["sacflow"] = "sacflow"
    flow: FlowConfig = FlowConfig(velocity="gated", hidden=[512], steps=4)
    noise: Literal["learned", "fixed"] = Field(
        "learned", description="learned: sigma(s) from an MLP on the state, log sigma in [-5, 2] (the code's); "
                               "fixed: sigma = noise_std (the path entropy is then a constant)")
    noise_hidden: list[PositiveInt] = Field([512, 512], description="learned noise: widths of the log-sigma MLP (ReLU)")
    noise_std: FiniteFloat = Field(0.1, gt=0, description="fixed noise: sigma of the noise-augmented rollout")
    batch_size: int = Field(512, ge=1, description="transitions per update (the code's 512)")
    policy_frequency: int = Field(3, ge=1, description="the policy steps every this many updates (the code's "
                                                       "policy_delay 3)")
    policy_schedule: Literal["burst", "delayed"] = Field(
        "delayed", description="delayed: one policy step every policy_frequency updates (the code's); burst: "
                               "policy_frequency steps each time")
    autotune_alpha: bool = Field(True, description="tune alpha towards target_entropy (the code's); off by "
                                                   "default with noise: fixed")
    target_entropy: FiniteFloat | None = Field(0.0, description="entropy target for -E[log p_c] (the code's 0); None: "
                                                                "-|A|")

    @model_validator(mode="before")
    @classmethod
    def _fixed_noise_fixes_alpha(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("noise") == "fixed" and "autotune_alpha" not in data:
            return {**data, "autotune_alpha": False}
        return data

    @field_validator("flow")
    @classmethod
    def _euler_from_standard_noise(cls, flow: FlowConfig) -> FlowConfig:
        if flow.integrator != "euler":
            raise ValueError("SAC Flow's noise-augmented rollout is an Euler scheme; use integrator: euler")
        if flow.base_std != 1.0:
            raise ValueError("SAC Flow's path density starts from N(0, I); leave flow.base_std at 1")
        return flow


class SACFlow(SoftActorCritic):
    Config = SACFlowConfig
    config: SACFlowConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_norms: list[torch.Tensor] = []
        self.policy_optimizer.register_step_pre_hook(self._record_grad_norm)

    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> NoiseAugmentedFlow:
        c = self.config
        noise = StateLogStd(obs_dim, act_dim, c.noise_hidden) if c.noise == "learned" else c.noise_std
        return NoiseAugmentedFlow(make_velocity(c.flow, obs_dim, act_dim), squash, c.flow.steps, noise)

    def _record_grad_norm(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).detach())

    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(actor): alpha log p_c - min Q at the batch's states, through the K-step rollout."""
        loss, entropy, extra = self.reparameterised_policy_loss(batch)
        with torch.no_grad():
            extra["learner/log_sigma"] = self.policy.log_std(batch["obs"]).mean()
        return loss, entropy, extra

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.grad_norms.clear()
        metrics = super().update(batch)
        if self.grad_norms:
            metrics["learner/actor_grad_norm"] = torch.stack(self.grad_norms).mean()
        return metrics

    def path_optimum_covariance(self, hessian: np.ndarray, alpha: float) -> np.ndarray:
        """The covariance of A_K that minimises (actor) at a state where Q(s, a) = q(s) - (a - mu)' H (a - mu),
        unbounded actions (docs/algorithms.md, "SAC Flow's optimum on the LQR"): (K alpha / 2) diag(H)^-1 with
        learned noise, sigma^2 / K I with fixed noise (then alpha does not enter)."""
        h = np.atleast_2d(np.asarray(hessian, dtype=float))
        if self.config.noise == "fixed":
            return self.config.noise_std**2 / self.config.flow.steps * np.eye(len(h))
        return np.diag(self.config.flow.steps * alpha / (2 * np.diag(h)))
