"""SAC Flow: SAC with a flow policy trained end to end through its K-step rollout (arXiv 2509.25756, "Sample-Efficient
RL of Flow-Based Policies via Velocity-Reparameterized Sequential Modeling"; docs/algorithms.md section 4).

The policy is a K-step Euler rollout of a velocity field v (naive MLP, Flow-G or Flow-T: velocities.py), made
stochastic so that it has a tractable density (the paper's noise-augmented rollout):
    A_0 ~ N(0, I),   A_{i+1} = A_i + b(A_i, t_i) dt + sigma sqrt(dt) eps_i,   eps_i ~ N(0, I),   t_i = i / K,
    b(A, t) = ((1 - t + t sigma^2 / 2) / (1 - t)) v(t, A, s) - (sigma^2 / (2 (1 - t))) A,               (drift)
and a = Squash(A_K). For the straight (rectified) path x_t = (1 - t) x_0 + t x_1 the score of the marginal p_t is
(t v - x) / (1 - t), so b = v + (sigma^2 / 2) score: the SDE dA = b dt + sigma dW has the marginals of the ODE
dA = v dt at every t, and in particular the same terminal marginal. Its path density is a product of Gaussians,
    log p_c(A_0..A_K | s) = log N(A_0; 0, I) + sum_i log N(A_{i+1}; A_i + b(A_i, t_i) dt, sigma^2 dt I)
                            - sum_j log(1 - tanh(A_K,j)^2) (+ the rescaling, ``Squash``),               (log p_c)
used in place of log pi in the actor loss and in the soft TD target (critics.py):
    L_actor = E_s E_{eps} [ alpha log p_c - min_i Q_i(s, Squash(A_K)) ],                                (actor)
backpropagated through all K steps (reparameterised: A_K is a differentiable function of the parameters and of
A_0, eps_0..eps_{K-1}). The official code leaves out the drift correction and the sqrt(dt), and its Flow-T
log-prob ignores sigma; this module follows the paper, and tests/algorithms/test_sacflow.py checks that the
terminal marginal of the deterministic flow is preserved and that log p_c is a normalised path density.

What log p_c regularises (and what it does not). Along a sampled path the residual of every transition is exactly
sigma sqrt(dt) eps_i whatever the parameters, so each transition term equals log N(eps_i; 0, I) - (d/2) log(sigma^2
dt): the path entropy H(A_0..A_K) = (d/2) log(2 pi e) + K (d/2) log(2 pi e sigma^2 dt) is a constant. The only
parameter-dependent part of alpha log p_c is the tanh correction, which pulls A_K towards 0. With unbounded
actions (the LQR) the actor loss is therefore -E[Q] plus a constant: nothing rewards spread beyond the noise the
last step injects, and the learned covariance shrinks towards sigma^2 dt I instead of the soft-optimal
Sigma* = (alpha / 2) (R + gamma B'PB)^-1 (README, "SAC Flow"). This is the paper's objective, kept as it is.

Choices the paper leaves open, with the reason:
- sigma is a fixed number (``noise_std``, the paper's 0.1), not learned: the paper's density needs a known sigma.
- Deterministic acting (evaluation with one candidate): the drift path from A_0 = 0 with every eps_i = 0, i.e. the
  noise-free part of the sampler that was trained (not the plain ODE, whose marginals equal the SDE's only when v
  is a flow-matching field, which a velocity trained through the rollout need not be). A given ``noise`` (x_0) in
  ``sample`` means this deterministic path.
- Euler only: the paper's rollout and density are Euler's; ``flow.integrator: midpoint`` is rejected.
- Defaults from the paper's code: K = 4 (``flow.steps``), Flow-G with one hidden layer of 512 (``flow.hidden``),
  batch 512, policy lr 3e-4, q lr 1e-3, policy delay 3 (``policy_frequency``: bursts of 3 policy steps every 3
  updates, the skeleton's schedule).
- alpha is fixed by default (``autotune_alpha: false``), unlike the paper's code (target entropy 0), whose noise
  scale is learned. With a fixed sigma the estimate -E[log p_c] can never exceed the constant path entropy plus
  sum_j log(scale_j) (the tanh term is <= 0): about -4.9 nats per action dimension for sigma = 0.1, K = 4, and
  unit scales. A target above that bound (0, or SAC's -|A|) is unreachable and the dual update would raise alpha
  without end; autotune only with a target below it.
- ``learner/actor_grad_norm``: the L2 norm of the actor gradient (before the optimiser step; no clipping), the
  quantity of the paper's gradient-stability claim, averaged over an update's policy steps; ``grad_norms`` keeps
  each step's after an update (``softflow bench gradients``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.flows import FlowConfig, FlowPolicy, VelocityField, make_velocity
from softflow.algorithms.policy import PolicySample, draw_base_noise, standard_normal_log_prob
from softflow.algorithms.squash import Squash


class NoiseAugmentedFlow(FlowPolicy):
    """A velocity field rolled out with K noise-augmented Euler steps (module docstring, (drift) and (log p_c))."""

    def __init__(self, velocity: VelocityField, squash: Squash, steps: int, noise_std: float):
        super().__init__(velocity, squash, steps, "euler", "exact")
        if noise_std <= 0:
            raise ValueError(f"noise_std must be positive (the path density needs it), got {noise_std}")
        self.noise_std = noise_std

    def drift(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """b(A, t) of (drift): the velocity plus sigma^2 / 2 times the straight path's score (t v - A) / (1 - t)."""
        var = self.noise_std**2
        v = self.velocity(x, t, obs)
        return (1 - t + 0.5 * var * t) / (1 - t) * v - var / (2 * (1 - t)) * x

    def _time(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0], 1), i / self.steps, device=like.device, dtype=like.dtype)

    def rollout(self, obs: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The path A_0..A_K (K + 1, n, d) from A_0 = ``x0`` (n, d) with step noises ``eps`` (K, n, d)."""
        dt = 1.0 / self.steps
        path = [x0]
        for i in range(self.steps):
            x = path[-1]
            path.append(x + dt * self.drift(x, self._time(i, x), obs) + self.noise_std * math.sqrt(dt) * eps[i])
        return torch.stack(path)

    def path_log_prob(self, obs: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """log p_c of any path (K + 1, n, d) with the action Squash(A_K), shape (n,): (log p_c) term by term."""
        dt, var = 1.0 / self.steps, self.noise_std**2
        d = path.shape[-1]
        log_prob = standard_normal_log_prob(path[0]) - self.squash.log_abs_det_jacobian(path[-1])
        for i in range(self.steps):
            mean = path[i] + dt * self.drift(path[i], self._time(i, path[i]), obs)
            log_prob = log_prob - 0.5 * ((path[i + 1] - mean).pow(2).sum(-1) / (var * dt)
                                         + d * math.log(2 * math.pi * var * dt))
        return log_prob

    def sample(self, obs: torch.Tensor, num_samples: int | None = None, with_log_prob: bool = False,
               noise: torch.Tensor | None = None) -> PolicySample:
        """Actions Squash(A_K) and log p_c, leading shape (B, N) with ``num_samples`` else (B,). A given ``noise``
        is A_0 and makes the rollout deterministic (every eps_i = 0). On the sampled path the transition terms of
        log p_c are log N(eps_i; 0, I) - (d/2) log(sigma^2 dt) (the residual is sigma sqrt(dt) eps_i)."""
        batch, n = obs.shape[0], num_samples or 1
        flat_obs = obs.repeat_interleave(n, dim=0) if n > 1 else obs
        x0 = draw_base_noise(obs, batch * n, self.act_dim, noise)
        eps = x0.new_zeros(self.steps, *x0.shape) if noise is not None else torch.randn(self.steps, *x0.shape,
                                                                                           device=x0.device)
        x = self.rollout(flat_obs, x0, eps)[-1]
        log_prob = None
        if with_log_prob:
            dt, d = 1.0 / self.steps, self.act_dim
            transitions = standard_normal_log_prob(eps).sum(0) - self.steps * 0.5 * d * math.log(
                self.noise_std**2 * dt)
            log_prob = standard_normal_log_prob(x0) + transitions - self.squash.log_abs_det_jacobian(x)
        shape = (batch, n) if num_samples is not None else (batch,)
        return PolicySample(action=self.squash(x).reshape(*shape, self.act_dim),
                            latent=x.reshape(*shape, self.act_dim),
                            log_prob=None if log_prob is None else log_prob.reshape(shape))


class SACFlowConfig(AlgorithmConfig):
    name: Literal["sacflow"] = "sacflow"
    flow: FlowConfig = FlowConfig(velocity="gated", hidden=[512], steps=4)
    noise_std: float = Field(0.1, gt=0, description="sigma of the noise-augmented rollout")
    batch_size: int = 512
    policy_frequency: int = 3
    autotune_alpha: bool = False

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
        flow = self.config.flow
        return NoiseAugmentedFlow(make_velocity(flow, obs_dim, act_dim), squash, flow.steps, self.config.noise_std)

    def _record_grad_norm(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).detach())

    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(actor): alpha log p_c - min Q at the batch's states, through the K-step rollout."""
        return self.reparameterised_policy_loss(batch)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.grad_norms.clear()
        metrics = super().update(batch)
        if self.grad_norms:
            metrics["learner/actor_grad_norm"] = torch.stack(self.grad_norms).mean()
        return metrics
