"""Flow policies: a velocity field integrated from Gaussian noise to an action, with log-densities.

Conventions (docs/algorithms.md, "Common ground"): time t runs from noise (t=0) to action (t=1);
x_0 ~ N(0, sigma_0^2 I) in R^d (sigma_0 = ``base_std``, 1 by default); dx/dt = v_theta(x, t, s) is solved with K
fixed steps (Euler or midpoint); the action is ``Squash(x_1)`` (tanh rescaled to the bounds, or the identity for an
unbounded Box).

Log-density of the map actually sampled. Each integrator step is a map x_{k+1} = f_k(x_k), so
    log p(x_K | s) = log N(x_0; 0, sigma_0^2 I) - sum_k log |det df_k/dx (x_k)|                        (exact)
For Euler, df_k/dx = I + dt J_v(x_k, t_k, s). With d = 1..17 the per-step Jacobian is affordable: each velocity
field gives J_v with its forward pass (``VelocityField.forward_and_jacobian``: generically d batched vector-Jacobian
products with ``torch.func``; the MLP in closed form, forward-mode).

Hutchinson (``log_prob: hutchinson``, FMER's estimator, docs/algorithms.md section 3): the instantaneous change of
variables, log p(x_1) = log N(x_0) - int_0^1 tr(dv/dx) dt, integrated with the solver's own quadrature, each trace
estimated with a fresh Rademacher probe eps (FFJORD's estimator): the step's term is dt eps^T J_v eps at the
point where the step evaluates its velocity (x_k for Euler, the midpoint y_k for midpoint), one Jacobian-vector
product. Its mean is the quadrature of the ODE's exact log-det (for an affine field, exactly tr(M) over the path);
its variance per step, dt^2 sum_{i<j} (J_ij + J_ji)^2, grows with the off-diagonal mass of J (as d^2 for a dense
J) and falls as 1/K over K steps with independent probes. Against the exact log-det of the sampled step map it is
off by -dt^2 tr(J^2) / 2 per Euler step and by O(dt^3) per midpoint step. The squashing correction is added by
``Squash``.

Base width. A target much narrower than the noise (four lobes of std 0.1 in the multi-goal task against N(0, I)) is
slow to fit by flow matching: the velocity field must contract space tenfold and split it four ways. With
sigma_0 = 0.5, plain flow matching on exact samples of those lobes reaches 0.81 of samples heading for a goal
(exact: 0.92) in 400 steps at lr 1e-2, where sigma_0 = 1 is still at 0.49 (docs/results/fmer.md, "The
multi-goal task").

Guard. A learned Euler step can fold space: det(I + dt J) crosses zero, most often at the last step of a narrow
policy, whose step maps x_t to the predicted endpoint and legitimately contracts almost to a point. At a fold the
change of variables no longer holds and log|det| runs to -inf, which makes log pi +inf and the soft TD target -inf.
Each step's exact log|det| is therefore floored at ``d * STEP_LOG_DET_FLOOR`` (a step may shrink volume by at most
1e-3 per dimension), the flow's counterpart of SAC's log-std floor. Densities of the affine (Gaussian) flows in the
tests are far from the floor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, PositiveInt
from torch import nn
from torch.func import jvp

from softflow.algorithms.fields import MLPVelocity, VelocityField
from softflow.algorithms.policy import PolicySample, draw_base_noise, standard_normal_log_prob
from softflow.algorithms.squash import Squash
from softflow.algorithms.velocities import DecodedVelocity, GatedVelocity

Integrator = Literal["euler", "midpoint"]
LogProbMethod = Literal["exact", "hutchinson"]
STEP_LOG_DET_FLOOR = math.log(1e-3)


class FlowPolicy(nn.Module):
    """A velocity field, a fixed-step ODE solver and a squashing map: pi(a|s) as a pushforward of N(0, base_std^2 I)."""

    def __init__(
        self,
        velocity: VelocityField,
        squash: Squash,
        steps: int = 10,
        integrator: Integrator = "euler",
        log_prob_method: LogProbMethod = "exact",
        base_std: float = 1.0,
    ):
        super().__init__()
        if base_std <= 0:
            raise ValueError(f"base_std must be positive, got {base_std}")
        self.velocity = velocity
        self.squash = squash
        self.steps = steps
        self.integrator = integrator
        self.log_prob_method = log_prob_method
        self.base_std = base_std
        self.act_dim = velocity.act_dim

    def draw_base(self, obs: torch.Tensor, count: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 ~ N(0, base_std^2 I) of shape (count, d), or the given ``noise`` (not rescaled) reshaped to it."""
        x = draw_base_noise(obs, count, self.act_dim, noise)
        return self.base_std * x if noise is None else x

    def base_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log N(x_0; 0, base_std^2 I), summed over the last dimension."""
        return standard_normal_log_prob(x0 / self.base_std) - x0.shape[-1] * math.log(self.base_std)

    def step(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """One solver step from time t (shape (B, 1)) to t + 1/K."""
        dt = 1.0 / self.steps
        v = self.velocity(x, t, obs)
        if self.integrator == "euler":
            return x + dt * v
        return x + dt * self.velocity(x + 0.5 * dt * v, t + 0.5 * dt, obs)

    def _step_with_log_det(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor):
        """One step and log|det d step / dx| (exact) or its Hutchinson estimate, per sample.

        Exact, by the chain rule on the velocity Jacobians J: Euler I + dt J(x); midpoint, with
        y = x + dt/2 v(x), I + dt J(y) (I + dt/2 J(x)); floored as the module docstring says. Hutchinson:
        dt eps^T J eps at the step's evaluation point (x, or y for midpoint), the module docstring's quadrature."""
        dt = 1.0 / self.steps
        if self.log_prob_method == "exact":
            d = x.shape[-1]
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            v, jac = self.velocity.forward_and_jacobian(x, t, obs)
            if self.integrator == "euler":
                x_next, step_jac = x + dt * v, eye + dt * jac
            else:
                v_mid, jac_mid = self.velocity.forward_and_jacobian(x + 0.5 * dt * v, t + 0.5 * dt, obs)
                x_next, step_jac = x + dt * v_mid, eye + dt * jac_mid @ (eye + 0.5 * dt * jac)
            return x_next, torch.linalg.slogdet(step_jac).logabsdet.clamp(min=d * STEP_LOG_DET_FLOOR)
        point, t_point = x, t
        if self.integrator == "midpoint":
            point, t_point = x + 0.5 * dt * self.velocity(x, t, obs), t + 0.5 * dt
        probe = torch.randint_like(x, 2) * 2 - 1
        v, jac_probe = jvp(lambda xx: self.velocity(xx, t_point, obs), (point,), (probe,))
        return x + dt * v, dt * (probe * jac_probe).sum(-1)

    def sample(
        self,
        obs: torch.Tensor,
        num_samples: int | None = None,
        with_log_prob: bool = False,
        noise: torch.Tensor | None = None,
    ) -> PolicySample:
        """Samples actions for a batch of states.

        obs: (B, o). With ``num_samples=N`` the result has leading shape (B, N), else (B,). ``noise`` replaces the
        draw of x_0 (same shape as the latent, not rescaled by ``base_std``), e.g. zeros for deterministic acting.
        """
        batch = obs.shape[0]
        n = num_samples or 1
        flat_obs = obs.repeat_interleave(n, dim=0) if n > 1 else obs
        x = self.draw_base(obs, batch * n, noise)
        log_prob = self.base_log_prob(x) if with_log_prob else None
        for k in range(self.steps):
            t = torch.full((batch * n, 1), k / self.steps, device=obs.device, dtype=obs.dtype)
            if with_log_prob:
                x, log_det = self._step_with_log_det(x, t, flat_obs)
                log_prob = log_prob - log_det
            else:
                x = self.step(x, t, flat_obs)
        action = self.squash(x)
        if with_log_prob:
            log_prob = log_prob - self.squash.log_abs_det_jacobian(x)
        shape = (batch, n) if num_samples is not None else (batch,)
        return PolicySample(
            action=action.reshape(*shape, self.act_dim),
            latent=x.reshape(*shape, self.act_dim),
            log_prob=None if log_prob is None else log_prob.reshape(shape),
        )

    def entropy(self, obs: torch.Tensor, num_samples: int = 16) -> torch.Tensor:
        """Monte-Carlo entropy per state, -E[log pi(a|s)], shape (B,)."""
        return -self.sample(obs, num_samples, with_log_prob=True).log_prob.mean(-1)

    def flow_matching_loss(self, obs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted conditional flow matching on the straight path, towards latents ``targets`` x_1^j (B, M, d)
        with weights w_j (B, M) at states ``obs`` (B, o):
            L = mean_s sum_j w_j || v(x_t, t, s) - (x_1^j - x_0) ||^2,   x_t = (1 - t) x_0 + t x_1^j,
        with a fresh x_0 ~ N(0, base_std^2 I) and t ~ U[0, 1] for every pair. No gradient flows through the solver."""
        batch, m, d = targets.shape
        x0 = self.base_std * torch.randn_like(targets)
        t = torch.rand(batch, m, 1, device=targets.device, dtype=targets.dtype)
        xt = (1 - t) * x0 + t * targets
        v = self.velocity(xt.reshape(-1, d), t.reshape(-1, 1), obs.repeat_interleave(m, dim=0))
        sq_err = (v.reshape(batch, m, d) - (targets - x0)).pow(2).sum(-1)
        return (weights * sq_err).sum(1).mean()


class FlowConfig(BaseModel):
    """The flow policy: a velocity field (an MLP by default) with a sinusoidal time embedding, solved in fixed steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden: list[PositiveInt] = Field([256, 256], min_length=1, description="velocity MLP widths")
    time_dim: int = Field(32, ge=2, multiple_of=2, description="size of the time embedding (even)")
    steps: int = Field(10, ge=1, description="ODE solver steps K")
    base_std: FiniteFloat = Field(1.0, gt=0, description="sigma_0 of the base noise N(0, sigma_0^2 I); below 1 for "
                                                         "targets much narrower than N(0, I) (module docstring)")
    integrator: Literal["euler", "midpoint"] = "euler"
    log_prob: Literal["exact", "hutchinson"] = Field(
        "exact", description="exact: each step's Jacobian log-det; hutchinson: the trace estimate along the solve "
                             "(module docstring); FMER defaults to hutchinson")
    velocity: Literal["mlp", "gated", "decoded"] = Field(
        "mlp", description="velocity field: mlp, or SAC Flow's gated (Flow-G, widths ``hidden``) or decoded (Flow-T, "
                           "d_model/heads/layers); velocities.py")
    d_model: int = Field(96, ge=1, description="decoded velocity only: token width")
    heads: int = Field(4, ge=1, description="decoded velocity only: attention heads (d_model must divide by it)")
    layers: int = Field(2, ge=1, description="decoded velocity only: decoder layers")


def make_velocity(config: FlowConfig, obs_dim: int, act_dim: int) -> VelocityField:
    """The velocity field ``config.velocity`` names."""
    if config.velocity == "mlp":
        return MLPVelocity(obs_dim, act_dim, config.hidden, config.time_dim)
    if config.velocity == "gated":
        return GatedVelocity(obs_dim, act_dim, config.hidden, config.time_dim)
    return DecodedVelocity(obs_dim, act_dim, config.d_model, config.heads, config.layers, config.time_dim)


def make_flow_policy(config: FlowConfig, obs_dim: int, act_dim: int, squash: Squash) -> FlowPolicy:
    return FlowPolicy(make_velocity(config, obs_dim, act_dim), squash, config.steps, config.integrator,
                      config.log_prob, config.base_std)
