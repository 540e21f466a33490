"""FLAME: max-entropy RL with a one-step flow policy (arXiv 2602.01606, "Boosting Maximum Entropy RL via One-Step Flow
Matching"; docs/algorithms.md section 5). The policy, its one-step sampler and the decoupled log-density are in
meanflow.py; this module is the policy improvement, the acting rule and the configuration.

Q-reweighted flow matching (no partition function). The target policy is pi+(a|s) proportional to exp(Q(s, a) /
alpha) on the action box. For a replay pair (s, a) draw r in (0, 1) and eps ~ N(0, I) and form the point
x = (1 - r) eps + r a on the straight path. Given x, the actions consistent with it have the likelihood
N(x; r a', (1 - r)^2 I), i.e. a' ~ N(x / r, ((1 - r) / r)^2 I) with eps' = (x - r a') / (1 - r); restricted to the
box (the Gaussian truncated to [-1, 1]^d, normalised coordinates) these are the posterior candidates
    a_k = (x - (1 - r) eps_k) / r,   k = 1..K,
and self-normalised importance weights towards the posterior p(a'|x) proportional to N(x; r a', .) pi+(a')
    w_k = softmax_k( min_i Q_i(s, a_k) / alpha )                                                        (4)
(the truncated proposal's normaliser is the same for every k and cancels). The marginal velocity of pi+'s straight
path at (x, r) is E[a' - eps' | x], estimated by v_bar = sum_k w_k (a_k - eps_k). The paper's loss
sum_k w_k || v(x, r) - (a_k - eps_k) ||^2 becomes, for the MeanFlow network (meanflow.py (2)),
    L = sum_k w_k || u(x, r, t) - sg[ v_k + (t - r) d/dr u ] ||^2,   v_k = a_k - eps_k,                (5)
with d/dr u = (du/dx) v_k + du/dr. The target is affine in v_k, so (5) equals || u - sg[v_bar + (t - r) (du/dx
v_bar + du/dr)] ||^2 plus a term free of the parameters (the weights sum to 1): one JVP per state with tangent
(v_bar, 1) gives exactly the gradient of the K JVPs of the official code (checked in the tests).

Soft policy evaluation uses the decoupled estimate of log pi (meanflow.py (3)) at a policy sample a' ~ pi(.|s'),
and alpha is tuned towards the target entropy (-3 |A| by default, the code's) with -E[log pi] at those samples.

Acting: the common best-of-N selection of the skeleton (``actors.candidates``, 32 in the paper's code) over one-step
samples, plus, when exploring, Gaussian noise of std ``exploration_scale`` x alpha (in normalised units, clipped to
the box), the paper's code's exploration noise scaled by alpha.

Traps in the official code, avoided here: its MeanFlow weights exponentiate alpha twice (here (4) divides by alpha
once); its training and sampling time conventions disagree (here one convention, meanflow.py (1)); its samplers draw
x_0 from 0.5 N(0, I) while the density assumes N(0, I) (here N(0, I) for both); its entropy is evaluated at the
best-of-32 action (here at policy samples, the ones the TD target uses).

Choices the paper leaves open, with the reason:
- Times: r ~ U[r_min, 1 - r_min] and t = r for a fraction ``flow_matching_fraction`` (1/2) of the pairs (plain
  flow matching: u(x, tau, tau) = v is the field the entropy estimator integrates), else t = 1 (``end_time: one``),
  the only interval acting uses: the two families the policy needs, each trained directly. ``end_time: uniform``
  draws (r, t) as a sorted uniform pair instead (MeanFlow's general intervals). Measured on a Gaussian target with
  its exact velocity as the tangent, 1600 updates of batch 256: the one-step variance is within 7 % with t = 1 and
  36 % under with uniform pairs.
- r_min = 0.05, not the code's 1e-3: without a box to confine them, the candidates spread as (1 - r) / r and the
  self-normalised target's noise grows with it (for a target of std 0.22 and K = 64: std 0.5 at r = 0.05, 2.8 at
  r = 0.01), and those few pairs dominated the regression; u(x, 0, 1) extrapolates over [0, 0.05].
- K: the self-normalised estimate is biased towards the proposal where the candidates and pi+ overlap little
  (points x far from pi+'s paths, which replay actions of older policies produce); the bias flattens the learned
  field's contraction and widens the policy. On the LQR the fitted slope dv/dx at r = 0.4 is -1.07, -1.22, -1.26
  for K = 64, 256, 1024 against -1.29 exactly, and the learned Sigma is 27 % too wide with K = 256, 4 % with 1024
  (lqr-flame.yaml uses 1024). The default K = 100 is the low end of the code's 100 to 500, for CPU learners.
- Truncated candidates are drawn by the inverse CDF in float64, with bounds in the upper tail mirrored to the lower
  one and the standardised bounds clipped at +-37, so that a posterior far outside the box puts its candidates
  on the nearest face instead of underflowing.
- The replay action is mapped into normalised coordinates (and into the box); the candidates, not the replay
  action, carry the learning signal.
- ``learner/weight_ess`` is the weights' effective sample size over K (as in ISFM-SAC).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.meanflow import MeanFlowNetwork, MeanFlowPolicy, meanflow_target
from softflow.algorithms.policy import PolicySample
from softflow.algorithms.squash import Squash

TAIL = 37.0  # standard-normal CDFs are representable in float64 down to -37 sigma


class FLAMEConfig(AlgorithmConfig):
    name: Literal["flame"] = "flame"
    hidden: list[int] = Field([256, 256], min_length=1, description="MeanFlow network widths")
    time_dim: int = Field(32, ge=2, description="size of each of the r and t embeddings (even)")
    num_candidates: int = Field(100, ge=1, description="K, posterior candidates per replay pair")
    entropy_steps: int = Field(20, ge=1, description="steps of the decoupled log-density solve")
    log_prob: Literal["exact", "hutchinson"] = Field("exact", description="per-step log-det of that solve")
    time_max_frequency: float = Field(10.0, gt=0, description="highest frequency of the r and t embeddings")
    flow_matching_fraction: float = Field(0.5, ge=0, le=1, description="fraction of (r, t) pairs with t = r")
    end_time: Literal["one", "uniform"] = Field("one", description="t of the other pairs: 1, or r <= t uniform")
    r_min: float = Field(0.05, gt=0, lt=0.5, description="r is clipped to [r_min, 1 - r_min]")
    exploration_scale: float = Field(0.05, ge=0, description="exploring: noise std = this x alpha (normalised)")
    target_entropy_per_dim: float = Field(-3.0, description="target entropy / |A| when target_entropy is unset")


def truncated_normal(mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Samples of N(mean, std^2) restricted to [-1, 1] per coordinate (broadcast to ``shape``), float64 inside."""
    mean, std = mean.double().expand(shape), std.double().expand(shape)
    lo, hi = (-1 - mean) / std, (1 - mean) / std
    mirror = lo > 0
    lo, hi = torch.where(mirror, -hi, lo).clamp(-TAIL, TAIL), torch.where(mirror, -lo, hi).clamp(-TAIL, TAIL)
    p_lo, p_hi = torch.special.ndtr(lo), torch.special.ndtr(hi)
    u = p_lo + torch.rand(shape, dtype=torch.float64, device=mean.device) * (p_hi - p_lo)
    z = torch.special.ndtri(u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - 1e-16)).clamp(-TAIL, TAIL)
    return (mean + std * torch.where(mirror, -z, z)).clamp(-1.0, 1.0)


def posterior_candidates(x: torch.Tensor, r: torch.Tensor, k: int, bounded: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """K actions consistent with the point x (B, d) at time r (B, 1): a_k ~ N(x / r, ((1 - r) / r)^2 I), in the box
    when ``bounded``; returns (a_k, eps_k), both (B, K, d), with x = (1 - r) eps_k + r a_k."""
    batch, d = x.shape
    mean, std = (x / r).unsqueeze(1), ((1 - r) / r).unsqueeze(1)
    if bounded:
        actions = truncated_normal(mean, std, (batch, k, d)).to(x.dtype)
    else:
        actions = mean + std * torch.randn(batch, k, d, device=x.device, dtype=x.dtype)
    eps = (x.unsqueeze(1) - r.unsqueeze(1) * actions) / (1 - r.unsqueeze(1))
    return actions, eps


class FLAME(SoftActorCritic):
    Config = FLAMEConfig
    config: FLAMEConfig
    policy: MeanFlowPolicy

    def __init__(self, config: FLAMEConfig, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 device: str | torch.device = "cpu"):
        if config.target_entropy is None:
            config = config.model_copy(update={"target_entropy": config.target_entropy_per_dim * len(action_low)})
        super().__init__(config, obs_dim, action_low, action_high, device)
        self._low, self._high = np.asarray(action_low, np.float32), np.asarray(action_high, np.float32)
        self._noise_scale = self.policy.box.scale.cpu().numpy()  # normalised units -> action units

    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> MeanFlowPolicy:
        c = self.config
        network = MeanFlowNetwork(obs_dim, act_dim, c.hidden, c.time_dim, c.time_max_frequency)
        return MeanFlowPolicy(network, squash, c.entropy_steps, c.log_prob)

    def sample_times(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t), each (B, 1): t = r for ``flow_matching_fraction`` of them, else t = 1 or r <= t uniform."""
        c = self.config
        if c.end_time == "one":
            r = torch.rand(batch, 1, device=like.device, dtype=like.dtype)
            end = torch.ones_like(r)
        else:
            r, end = torch.rand(batch, 2, device=like.device, dtype=like.dtype).sort(dim=1).values.split(1, dim=1)
        r = r.clamp(c.r_min, 1 - c.r_min)
        same = torch.rand(batch, 1, device=like.device) < c.flow_matching_fraction
        return r, torch.where(same, r, end.clamp(min=r))

    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(5) at the batch's replay pairs (s, a), one JVP per pair; the entropy from the TD target's samples."""
        obs, box, k = batch["obs"], self.policy.box, self.config.num_candidates
        a = box.normalise(batch["actions"])
        r, t = self.sample_times(a.shape[0], a)
        x = (1 - r) * torch.randn_like(a) + r * a
        with torch.no_grad():
            actions, eps = posterior_candidates(x, r, k, box.bounded)
            q = self.critic.min_q(obs.unsqueeze(1).expand(-1, k, -1), box.to_action(actions))
            weights = torch.softmax(q / self.temperature.value, dim=1)
            v_bar = (weights.unsqueeze(-1) * (actions - eps)).sum(1)
        u, target = meanflow_target(self.policy.network, x, r, t, obs, v_bar)
        loss = (u - target).pow(2).sum(-1).mean()
        ess = (1.0 / weights.pow(2).sum(1)).mean() / k
        return loss, -next_sample.log_prob.mean(), {"learner/weight_ess": ess}

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool, candidates: int = 1) -> np.ndarray:
        """The skeleton's best-of-N over one-step samples, plus exploration noise of std exploration_scale x alpha
        (normalised units) when exploring."""
        actions = super().act(obs, explore, candidates)
        std = self.config.exploration_scale * self.alpha
        if not explore or std == 0:
            return actions
        noisy = actions + self._noise_scale * (std * np.random.standard_normal(actions.shape)).astype(np.float32)
        return np.clip(noisy, self._low, self._high)
