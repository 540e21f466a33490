"""FLAME's policy: a MeanFlow average-velocity network for one-step actions, and the decoupled log-density estimator
(arXiv 2602.01606; MeanFlow: Geng et al. 2025). Conventions as everywhere in softflow: time runs from noise (0) to
action (1), x_0 ~ N(0, I) (never the official code's 0.5 N(0, I)).

Average velocity. For the flow dx/dtau = v(x, tau, s) let u(x, r, t, s) be the average velocity over [r, t] of the
trajectory through x at time r:
    x_t = x_r + (t - r) u(x_r, r, t),   r <= t,                                                        (1)
so u(x, t, t) = v(x, t) and one step from noise is the action: x_1 = x_0 + u(x_0, 0, 1, s). Differentiating
(t - r) u = int_r^t v along the trajectory with respect to r gives the MeanFlow identity
    u(x_r, r, t) = v(x_r, r) + (t - r) d/dr u(x_r, r, t),   d/dr u = (du/dx) v + du/dr,                (2)
the paper's u = v - (t - r) du/dt with its time reversed (MeanFlow puts noise at 1 and the point at the later
time; here the point is at the earlier time r, so that acting needs u at x_0). The total derivative is one
forward-mode product, ``torch.func.jvp`` of u in (x, r) with tangent (v, 1) (``meanflow_target``).

Decoupled log-density. log pi is estimated by its own K_e-step solve (``entropy_steps``, the code's 20),
independent of the one-step sampler, of the instantaneous field v(x, tau) = u(x, tau, tau): from the action's
latent x_1 backwards with Euler steps y <- y - dt v(y, tau_k), tau_k = k / K_e for k = K_e..1 (the code's
reverse solve), reaching x^_0 = G(x_1). The density of the map actually solved is exact:
    log p(x_1 | s) = log N(x^_0; 0, I) + sum_k log |det(I - dt J_v(y_k, tau_k))|                       (3)
(``exact``: per-step Jacobians in closed form for the MLP, fields.MLPVelocity; each step's log|det| floored as in
flows.py). ``hutchinson`` replaces each term by its first-order estimate -dt eps^T J_v eps with one Rademacher probe
per step (the code's estimator), for large action dimensions. As K_e grows, (3) tends to the instantaneous change
of variables of the flow that u(., 0, 1) integrates in one step; the one-step sampler's own map is not used, so its
discretisation (MeanFlow's approximation error) does not bias the entropy.

Action box. The flow lives in normalised action coordinates y = (a - centre) / half-range, where FLAME's posterior
candidates are restricted to [-1, 1]^d (flame.py); the action is centre + half-range * clip(x_1, -1, 1), and
log pi(a|s) = log p(x_1|s) - sum_j log half-range_j. The candidates that train the flow all lie in the box, so the
learned flow puts (almost) all its mass there and the clip rarely acts; where it does, (3) is the density of the
unclipped x_1 (a choice, named here). Unbounded dimensions (the LQR) use the identity. This departs from the tanh
squashing the other flows use (docs/algorithms.md, "Common ground"): FLAME restricts its candidates to the action box,
which has a meaning only in action coordinates, and so do the paper's code (actions clipped to [-1, 1]).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp

from softflow.algorithms.fields import MLPVelocity
from softflow.algorithms.flows import STEP_LOG_DET_FLOOR
from softflow.algorithms.policy import PolicySample, draw_base_noise, standard_normal_log_prob
from softflow.algorithms.squash import Squash


class ActionBox(nn.Module):
    """Normalised coordinates y in [-1, 1]^d <-> actions centre + half-range * y (identity when unbounded)."""

    def __init__(self, squash: Squash):
        super().__init__()
        self.bounded = squash.bounded
        self.register_buffer("center", squash.center.clone())
        self.register_buffer("scale", squash.scale.clone())

    def to_action(self, y: torch.Tensor) -> torch.Tensor:
        return self.center + self.scale * (y.clamp(-1.0, 1.0) if self.bounded else y)

    def normalise(self, action: torch.Tensor) -> torch.Tensor:
        y = (action - self.center) / self.scale
        return y.clamp(-1.0, 1.0) if self.bounded else y

    def log_abs_det(self) -> torch.Tensor:
        """sum_j log half-range_j, the log-Jacobian of y -> action."""
        return self.scale.log().sum()


class MeanFlowNetwork(nn.Module):
    """u(x, r, t, s) = MLP([x, emb(r), emb(t), s]) (SiLU, last layer zero: the initial policy is N(0, I)).

    Built on ``MLPVelocity`` with emb(t) and s as its conditioning, so the instantaneous field v(x, tau) =
    u(x, tau, tau) has MLPVelocity's closed-form Jacobian. The embedding's frequencies stop at
    ``time_max_frequency`` (10 by default, against 1000 for the flows of flows.py): the MeanFlow target
    differentiates u in r, and features like sin(1000 r) make that derivative, and the target, explode (with the
    exact velocity of a Gaussian target the one-step map diverges at 1000 and converges at 10)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], time_dim: int = 32,
                 time_max_frequency: float = 10.0):
        super().__init__()
        self.act_dim = act_dim
        self.field = MLPVelocity(obs_dim + time_dim, act_dim, hidden, time_dim, time_max_frequency)

    def conditioning(self, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.field.time(t), obs], dim=-1)

    def forward(self, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Average velocity over [r, t] (both (B, 1)) from x (B, d) at time r, states obs (B, o)."""
        return self.field(x, r, self.conditioning(t, obs))

    def from_zero_to_one(self, x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """u(x, 0, 1, s), the one-step velocity: ``forward`` with the constant features [emb(0), emb(1)] built once
        per call (acting latency is FLAME's point)."""
        times = self.field.time(torch.tensor([[0.0], [1.0]], dtype=x.dtype, device=x.device)).reshape(1, -1)
        return self.field.net(torch.cat([x, times.expand(x.shape[0], -1), obs], dim=-1))

    def one_step_linearisation(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_1(0), J): the one-step action from x_0 = 0 and J = I + du/dx_0 (0, 0, 1) there, so that the policy at
        s is approximately N(x_1(0), J J^T) (exactly, for an affine u). In closed form (``forward_and_jacobian``)."""
        x0 = obs.new_zeros(obs.shape[0], self.act_dim)
        zero = x0[:, :1]
        u, jac = self.field.forward_and_jacobian(x0, zero, self.conditioning(zero + 1, obs))
        return u, jac + torch.eye(self.act_dim, dtype=obs.dtype, device=obs.device)

    def instantaneous(self, x: torch.Tensor, tau: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """v(x, tau, s) = u(x, tau, tau, s)."""
        return self(x, tau, tau, obs)

    def instantaneous_and_jacobian(self, x: torch.Tensor, tau: torch.Tensor, obs: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, dv/dx) at (x, tau), the Jacobian in closed form (``MLPVelocity.forward_and_jacobian``)."""
        return self.field.forward_and_jacobian(x, tau, self.conditioning(tau, obs))


def meanflow_target(network: MeanFlowNetwork, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(x, r, t, s), sg[v + (t - r) d/dr u]): the prediction and the target of the MeanFlow identity (2), the
    total derivative by one ``torch.func.jvp`` in (x, r) with tangent (v, 1). ``v`` (B, d) is the velocity at
    (x, r): the marginal one, or a (weighted) conditional estimate of it."""
    u, du_dr = jvp(lambda xx, rr: network(xx, rr, t, obs), (x, r), (v, torch.ones_like(r)))
    return u, (v + (t - r) * du_dr).detach()


class MeanFlowPolicy(nn.Module):
    """One-step actions x_0 + u(x_0, 0, 1, s) in the action box, with the decoupled log-density (3)."""

    steps = 1

    def __init__(self, network: MeanFlowNetwork, squash: Squash, entropy_steps: int = 20,
                 log_prob_method: str = "exact"):
        super().__init__()
        self.network = network
        self.act_dim = network.act_dim
        self.box = ActionBox(squash)
        self.entropy_steps = entropy_steps
        self.log_prob_method = log_prob_method

    def one_step(self, x0: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """x_1 = x_0 + u(x_0, 0, 1, s) in normalised coordinates."""
        return x0 + self.network.from_zero_to_one(x0, obs)

    def latent_log_prob(self, obs: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """log p(x_1 | s) by the reverse K_e-step solve (3), shape (n,)."""
        net, steps, d = self.network, self.entropy_steps, x1.shape[-1]
        dt = 1.0 / steps
        eye = torch.eye(d, dtype=x1.dtype, device=x1.device)
        y, log_det = x1, x1.new_zeros(x1.shape[0])
        for k in range(steps, 0, -1):
            tau = x1.new_full((x1.shape[0], 1), k / steps)
            if self.log_prob_method == "exact":
                v, jac = net.instantaneous_and_jacobian(y, tau, obs)
                log_det = log_det + torch.linalg.slogdet(eye - dt * jac).logabsdet.clamp(min=d * STEP_LOG_DET_FLOOR)
            else:
                probe = torch.randint_like(y, 2) * 2 - 1
                v, tangent = jvp(lambda z: net.instantaneous(z, tau, obs), (y,), (probe,))
                log_det = log_det - dt * (probe * tangent).sum(-1)
            y = y - dt * v
        return standard_normal_log_prob(y) + log_det

    def sample(self, obs: torch.Tensor, num_samples: int | None = None, with_log_prob: bool = False,
               noise: torch.Tensor | None = None) -> PolicySample:
        """One-step actions; leading shape (B, N) with ``num_samples`` else (B,); ``noise`` replaces x_0."""
        batch, n = obs.shape[0], num_samples or 1
        flat_obs = obs.repeat_interleave(n, dim=0) if n > 1 else obs
        x1 = self.one_step(draw_base_noise(obs, batch * n, self.act_dim, noise), flat_obs)
        log_prob = None
        if with_log_prob:
            log_prob = self.latent_log_prob(flat_obs, x1) - self.box.log_abs_det()
        shape = (batch, n) if num_samples is not None else (batch,)
        return PolicySample(action=self.box.to_action(x1).reshape(*shape, self.act_dim),
                            latent=x1.reshape(*shape, self.act_dim),
                            log_prob=None if log_prob is None else log_prob.reshape(shape))
