"""FLAME: max-entropy RL with a one-step flow policy (arXiv 2602.01606, "Boosting Maximum Entropy RL via One-Step Flow
Matching"; docs/algorithms.md section 5). The policy, its one-step sampler and the decoupled log-density are in
meanflow.py; this module is the policy improvement, the acting rule and the configuration.

Q-reweighted flow matching (no partition function). The target policy is pi+(a|s) proportional to exp(Q(s, a) /
alpha) on the action box. For a replay pair (s, a) draw r in (0, 1) and eps ~ N(0, I) and form the point
x = (1 - r) eps + r a on the straight path. Given x, the actions consistent with it have the likelihood
L(x | a') = N(x; r a', (1 - r)^2 I), proportional in a' to N(a'; x / r, c^2 I) with c = (1 - r) / r, and the
posterior p+(a' | x) proportional to L(x | a') pi+(a'). The marginal velocity of pi+'s straight path at (x, r) is
E+[a' - eps' | x] with eps' = (x - r a') / (1 - r), estimated from K candidates a_k ~ q with eps_k = (x - r a_k) /
(1 - r) and self-normalised weights
    w_k = softmax_k( min_i Q_i(s, a_k) / alpha + log L(x | a_k) - log q(a_k) ),   v_bar = sum_k w_k (a_k - eps_k).  (4)
The paper draws the candidates from the likelihood itself (restricted to the box [-1, 1]^d, normalised
coordinates), q = L / Z, when the last two terms are the same for every k and (4) is softmax(Q / alpha)
(``proposal: likelihood``). The paper's loss sum_k w_k || v(x, r) - (a_k - eps_k) ||^2 becomes, for the MeanFlow
network (meanflow.py (2)),
    L = sum_k w_k || u(x, r, t) - sg[ v_k + (t - r) d/dr u ] ||^2,   v_k = a_k - eps_k,                (5)
with d/dr u = (du/dx) v_k + du/dr. The target is affine in v_k, so (5) equals || u - sg[v_bar + (t - r) (du/dx
v_bar + du/dr)] ||^2 plus a term free of the parameters (the weights sum to 1): one JVP per state with tangent
(v_bar, 1) gives exactly the gradient of the K JVPs of the official code (checked in the tests).

Why the likelihood alone fails as the action dimension d grows (docs/algorithms.md section 5 derives it). For a
Gaussian pi+ of variance s^2 per direction, the likelihood proposal's effective sample size is about
    ESS / K = prod_j [ s_j sqrt(2) / c ] exp(-|x / r - mu|^2 / (2 c^2))   (c >> s),                    (6)
so at r = 0.05 (c = 19) and s = 0.47 one candidate in 30 counts in 1-D, one in 800 in 2-D, one in 24000 in 3-D, and
replay actions of older policies (x far from pi+'s paths) cut it further at every r. A self-normalised estimate
with ESS ~ 1 is the best candidate, which sits between pi+ and the proposal's centre x / r: the estimated field
contracts less than pi+'s (at d = 3, r = 0.05 it expands) and the policy comes out too wide. Measured with the
critic frozen at the exact soft Q of the LQR systems and replay actions 30 % from N(0, I): Sigma 30 % too wide at
d = 2 with K = 1024, 4 to 11 times too wide at d = 3 (4x3) and on the ill-conditioned 2x2 with K = 100; the exact
posterior velocity in its place gives 1 %.

The fix (``proposal: policy``, default): the current policy is the natural prior. Its one-step map linearised at
x_0 = 0 gives pi ~ N(mean, J J^T) (meanflow.py), whose posterior given x is Gaussian in closed form,
    N(m, S),  G = C (C + c^2 I)^-1,  m = mean + G (x / r - mean),  S = c^2 G,  C = J J^T,                (7)
and the candidates come from the defensive mixture q = beta L / Z + (1 - beta) N(m, kappa S) (``defensive_fraction``
beta = 0.1, ``proposal_inflation`` kappa = 1.5), with the exact mixture density in (4). (4) stays a consistent
estimate of pi+'s velocity for any policy (the likelihood part covers every posterior, and bounds each weight by
1 / beta of the paper's); where pi is near pi+ (7) is near p+: for pi = pi+ Gaussian, ESS / K >= (1 - beta)
((2 kappa - 1) / kappa^2)^(d/2), 0.75 at d = 3 and 0.33 at d = 17. Measured in the same frozen check: Sigma
within 4 % on the 3x2, 4x3 and ill-conditioned 2x2 systems with K = 100. Cost per update: one
closed-form Jacobian of the one-step map per state and a d x d solve and Cholesky per pair, small beside K critic
evaluations per pair.

Soft policy evaluation uses the decoupled estimate of log pi (meanflow.py (3)) at a policy sample a' ~ pi(.|s'),
and alpha is tuned towards the target entropy (-3 |A| by default, the code's) with -E[log pi] at those samples.

Acting: the common best-of-N selection of the skeleton (``actors.candidates``, 32 in the paper's code) over one-step
samples, plus, when exploring, Gaussian noise of std ``exploration_scale`` x alpha (in normalised units, clipped to
the box), the paper's code's exploration noise scaled by alpha.

The official code's other parts, each an option (docs/algorithms.md section 5 cites the lines):
- ``policy_schedule: delayed``, ``policy_frequency: 2`` (default): one actor step every 2 updates, the code's
  delay_update. (Its target critics also move only every 2 updates; here Polyak every update.)
- ``q_loss_weight`` (default 0; the code's 1): adds -min Q_target(s, a_theta) at a one-step action to the actor
  loss. Its minimiser is no longer pi+ but a policy pulled towards argmax Q, narrower than the soft optimum (with
  the critic frozen at the 3x2 LQR's soft Q, weight 1 leaves Sigma at 0.56 to 0.64 of Sigma*), so it is off by
  default: the policy improvement stays the paper's (4)-(5).
- ``reward_scale`` (default 1; the code's 0.2): rewards x scale inside the update. At a fixed alpha this is the
  temperature alpha / scale; 1 keeps alpha on the reward's scale, as for every other algorithm here.
- ``lr_schedule: code``: the policy's rate constant for ``lr_decay_begin`` (25000) updates, then linear to
  ``lr_final_fraction`` of itself over ``lr_decay_updates`` (50000), the critics' constant (the code's optax
  schedule, 3e-4 to 3e-5). Default ``run``, the skeleton's schedule over the run, which the shipped experiments set.
- ``alpha_update_every`` (default 1; the code's 100, with alpha lr 0.005): log alpha steps only at those update
  counts. 1 is SAC's rule, which the target entropy's other users here share.

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
- r_min = 0.05, not the code's 1e-3: the likelihood's spread (1 - r) / r grows without bound as r -> 0 (19 at 0.05,
  999 at 1e-3), and u(x, 0, 1) extrapolates over [0, 0.05].
- K = 50, half the low end of the code's 100 to 500: with (7) each candidate counts (ESS / K 0.64 at d = 6, 0.36
  at d = 17; from the likelihood alone (6) gives 2e-9 at d = 6, r = 0.05), so 50 leave an ESS of 18 or more up to
  d = 17 and the estimated field's slope within 1 % for r <= 0.5 (docs/algorithms.md section 5). Cost at MuJoCo
  sizes on a CPU (``softflow bench learner``): an update is 10.3 CleanRL SAC updates at K = 100, 7.6 at K = 50, two
  thirds of it then the 20-step exact entropy solve. The experiment files keep the code's 100.
- Truncated candidates are drawn by the inverse CDF in float64, with bounds in the upper tail mirrored to the lower
  one and the standardised bounds clipped at +-37, so that a posterior far outside the box puts its candidates
  on the nearest face instead of underflowing. The Gaussian part of (7) is drawn unrestricted; its candidates
  outside the box get weight 0 (pi+ lives on the box), and the likelihood part's density carries its box mass.
- The replay action is mapped into normalised coordinates (and into the box); the candidates, not the replay
  action, carry the learning signal.
- ``learner/weight_ess`` is the weights' effective sample size over K (as in ISFM-SAC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field, FiniteFloat, PositiveInt

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.critics import Temperature
from softflow.algorithms.meanflow import MeanFlowNetwork, MeanFlowPolicy, meanflow_target
from softflow.algorithms.policy import PolicySample
from softflow.algorithms.squash import Squash

TAIL = 37.0  # standard-normal CDFs are representable in float64 down to -37 sigma
JITTER = 1e-4  # floor of the Gaussian proposal's covariance, as a fraction of the likelihood's variance c^2


class FLAMEConfig(AlgorithmConfig):
    name: Literal["flame"] = "flame"
    hidden: list[PositiveInt] = Field([256, 256], min_length=1, description="MeanFlow network widths")
    time_dim: int = Field(32, ge=2, multiple_of=2, description="size of each of the r and t embeddings (even)")
    num_candidates: int = Field(50, ge=1, description="K, posterior candidates per replay pair")
    proposal: Literal["policy", "likelihood"] = Field(
        "policy", description="posterior candidates from the likelihood mixed with the linearised policy's Gaussian "
                              "posterior (7), or from the likelihood alone (the paper's)")
    defensive_fraction: FiniteFloat = Field(0.1, gt=0, le=1, description="share of the K candidates drawn from the "
                                                                         "likelihood under proposal: policy")
    proposal_inflation: FiniteFloat = Field(1.5, ge=1, description="covariance factor of the Gaussian proposal (7)")
    entropy_steps: int = Field(20, ge=1, description="steps of the decoupled log-density solve")
    log_prob: Literal["exact", "hutchinson"] = Field("exact", description="per-step log-det of that solve")
    time_max_frequency: FiniteFloat = Field(10.0, gt=0, description="highest frequency of the r and t embeddings")
    flow_matching_fraction: FiniteFloat = Field(0.5, ge=0, le=1, description="fraction of (r, t) pairs with t = r")
    end_time: Literal["one", "uniform"] = Field("one", description="t of the other pairs: 1, or r <= t uniform")
    r_min: FiniteFloat = Field(0.05, gt=0, lt=0.5, description="r is clipped to [r_min, 1 - r_min]")
    exploration_scale: FiniteFloat = Field(0.05, ge=0, description="exploring: noise std = this x alpha (normalised)")
    target_entropy_per_dim: FiniteFloat = Field(-3.0, description="target entropy / |A| when target_entropy is unset")
    policy_frequency: int = Field(2, ge=1, description="the policy steps every this many updates (the code's 2)")
    policy_schedule: Literal["burst", "delayed"] = Field(
        "delayed", description="delayed: one actor step every policy_frequency updates (the code's delay_update)")
    q_loss_weight: FiniteFloat = Field(0.0, ge=0, description="weight of the code's -Q(s, a_theta) term in the actor "
                                                              "loss (1 there; 0 keeps pi+ the fixed point)")
    reward_scale: FiniteFloat = Field(1.0, gt=0, description="rewards are multiplied by this inside the update (the "
                                                             "code's 0.2; 1 keeps alpha on the reward's scale)")
    lr_schedule: Literal["run", "code"] = Field(
        "run", description="run: both rates fall linearly over the run to lr_final_fraction (the skeleton's); "
                           "code: the policy's alone, from update lr_decay_begin over lr_decay_updates")
    lr_decay_begin: int = Field(25_000, ge=0, description="lr_schedule code: the update the policy's decay starts")
    lr_decay_updates: int = Field(50_000, ge=1, description="lr_schedule code: updates the decay lasts")
    alpha_update_every: int = Field(1, ge=1, description="log alpha steps at policy steps whose update count is a "
                                                         "multiple of this (the code's 100)")


def truncated_normal(mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Samples of N(mean, std^2) restricted to [-1, 1] per coordinate (broadcast to ``shape``), float64 inside."""
    mean, std = mean.double().expand(shape), std.double().expand(shape)
    lo, hi = standard_bounds(mean, std)
    p_lo, p_hi = torch.special.ndtr(lo), torch.special.ndtr(hi)
    u = p_lo + torch.rand(shape, dtype=torch.float64, device=mean.device) * (p_hi - p_lo)
    z = torch.special.ndtri(u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - 1e-16)).clamp(-TAIL, TAIL)
    return (mean + std * torch.where((-1 - mean) / std > 0, -z, z)).clamp(-1.0, 1.0)


def standard_bounds(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box's standardised bounds (lo, hi), mirrored to the lower tail when the whole box lies above the mean
    (the CDF's precision is there) and clipped at +-37."""
    lo, hi = (-1 - mean) / std, (1 - mean) / std
    mirror = lo > 0
    return (torch.where(mirror, -hi, lo).clamp(-TAIL, TAIL), torch.where(mirror, -lo, hi).clamp(-TAIL, TAIL))


def truncated_log_mass(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(N(mean, std^2 I) in [-1, 1]^d) over the last axis, in float64 through log-CDFs."""
    lo, hi = standard_bounds(mean.double(), std.double().expand_as(mean))
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return (log_hi + torch.log1p(-torch.exp(log_lo - log_hi))).sum(-1)


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
    return actions, noise_of(x, r, actions)


def noise_of(x: torch.Tensor, r: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """eps_k = (x - r a_k) / (1 - r), the noise that puts a_k's straight path through x at time r."""
    return (x.unsqueeze(1) - r.unsqueeze(1) * actions) / (1 - r.unsqueeze(1))


def gaussian_posterior(mean: torch.Tensor, factor: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                       inflation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, L): the posterior N(m, S) of a' given x_r = x under the prior N(mean, C), C = factor factor^T, and the
    Cholesky factor L of inflation x S (plus a floor): (7) in the Kalman form, which needs no inverse of C,
        G = C (C + c^2 I)^-1,   m = mean + G (x / r - mean),   S = c^2 G,   c = (1 - r) / r.
    float64 inside; the ``_ex`` factorisations never read their status back to the host."""
    dtype, d = x.dtype, x.shape[-1]
    mean, factor, x, r = mean.double(), factor.double(), x.double(), r.double()
    c2 = (((1 - r) / r) ** 2).unsqueeze(-1)  # (B, 1, 1)
    cov = factor @ factor.transpose(1, 2)
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    gain = torch.linalg.solve_ex(cov + c2 * eye, cov).result  # (C + c^2 I)^-1 C = G^T = G: C and C + c^2 I commute
    m = mean + ((x / r - mean).unsqueeze(1) @ gain).squeeze(1)
    cov_post = inflation * c2 * 0.5 * (gain + gain.transpose(1, 2)) + JITTER * c2 * eye
    return m.to(dtype), torch.linalg.cholesky_ex(cov_post).L.to(dtype)


def gaussian_log_prob(a: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log N(a_k; mean, L L^T) for a (B, K, d), mean (B, d), L (B, d, d) lower triangular: (B, K)."""
    z = torch.linalg.solve_triangular(chol, (a - mean.unsqueeze(1)).transpose(1, 2), upper=False)
    log_det = torch.diagonal(chol, dim1=1, dim2=2).log().sum(-1, keepdim=True)
    return -0.5 * z.pow(2).sum(1) - log_det - 0.5 * a.shape[-1] * math.log(2 * math.pi)


def mixture_candidates(x: torch.Tensor, r: torch.Tensor, k: int, bounded: bool, mean: torch.Tensor,
                       factor: torch.Tensor, defensive: float, inflation: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K candidates from the defensive mixture q = beta N_box(x / r, c^2 I) + (1 - beta) N(m, inflation S) (7),
    stratified (round(beta K) from the first, at least one); returns (a_k, eps_k, log L(x | a_k) - log q(a_k)),
    the last -inf outside the box, so that the weights (4) become softmax_k(Q / alpha + that)."""
    k_lik = min(k, max(1, round(defensive * k)))
    actions, _ = posterior_candidates(x, r, k_lik, bounded)
    centre, chol = gaussian_posterior(mean, factor, x, r, inflation)
    if k > k_lik:
        draws = torch.randn(x.shape[0], k - k_lik, x.shape[1], 1, device=x.device, dtype=x.dtype)
        actions = torch.cat([actions, centre.unsqueeze(1) + (chol.unsqueeze(1) @ draws).squeeze(-1)], dim=1)
    c2 = ((1 - r) / r) ** 2  # (B, 1)
    log_lik = (-0.5 * (actions - (x / r).unsqueeze(1)).pow(2).sum(-1) / c2
               - 0.5 * x.shape[1] * torch.log(2 * math.pi * c2))
    log_q = log_lik
    if bounded:
        log_q = log_lik - truncated_log_mass(x / r, (1 - r) / r).to(x.dtype).unsqueeze(-1)
    if k > k_lik:
        log_q = torch.logaddexp(math.log(k_lik / k) + log_q,
                                math.log((k - k_lik) / k) + gaussian_log_prob(actions, centre, chol))
    log_ratio = log_lik - log_q
    if bounded:
        log_ratio = log_ratio.masked_fill((actions.abs() > 1).any(-1), -math.inf)
    return actions, noise_of(x, r, actions), log_ratio


class DelayedTemperature(Temperature):
    """alpha's step only at update counts that are multiples of ``every`` (the code's delay_alpha_update)."""

    def __init__(self, alpha: float, autotune: bool, target_entropy: float, lr: float, every: int,
                 clock: Callable[[], int]):
        super().__init__(alpha, autotune, target_entropy, lr)
        self.every, self.clock = every, clock

    def update(self, entropy: torch.Tensor) -> None:
        if self.clock() % self.every == 0:
            super().update(entropy)


class FLAME(SoftActorCritic):
    Config = FLAMEConfig
    config: FLAMEConfig
    policy: MeanFlowPolicy

    def __init__(self, config: FLAMEConfig, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 device: str | torch.device = "cpu"):
        if config.target_entropy is None:
            config = config.model_copy(update={"target_entropy": config.target_entropy_per_dim * len(action_low)})
        super().__init__(config, obs_dim, action_low, action_high, device)
        if config.alpha_update_every > 1:
            self.temperature = DelayedTemperature(config.alpha, config.autotune_alpha, config.target_entropy,
                                                  config.alpha_lr, config.alpha_update_every,
                                                  lambda: self.num_updates).to(self.device)
        self._low, self._high = np.asarray(action_low, np.float32), np.asarray(action_high, np.float32)
        self._noise_scale = self.policy.box.scale.cpu().numpy()  # normalised units -> action units

    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> MeanFlowPolicy:
        c = self.config
        network = MeanFlowNetwork(obs_dim, act_dim, c.hidden, c.time_dim, c.time_max_frequency)
        return MeanFlowPolicy(network, squash, c.entropy_steps, c.log_prob)

    def set_progress(self, fraction: float) -> None:
        """The skeleton's annealing over the run (``lr_schedule: run``); the code's schedule counts updates."""
        if self.config.lr_schedule == "run":
            super().set_progress(fraction)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The skeleton's update on rewards x ``reward_scale``, after setting the code's policy rate if chosen."""
        c = self.config
        if c.lr_schedule == "code":
            done = min(max(self.num_updates - c.lr_decay_begin, 0) / c.lr_decay_updates, 1.0)
            for group in self.policy_optimizer.param_groups:
                group["lr"] = c.policy_lr * (1.0 - done * (1.0 - c.lr_final_fraction))
        if c.reward_scale != 1.0:
            batch = {**batch, "rewards": batch["rewards"] * c.reward_scale}
        return super().update(batch)

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

    def posterior_velocity(self, obs: torch.Tensor, x: torch.Tensor, r: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_bar (B, d), the weights (B, K)): the self-normalised estimate (4) of pi+'s marginal velocity at
        (x, r), from the candidates of ``proposal``."""
        c, box = self.config, self.policy.box
        if c.proposal == "likelihood":
            actions, eps = posterior_candidates(x, r, c.num_candidates, box.bounded)
            log_ratio = 0.0
        else:
            mean, factor = self.policy.network.one_step_linearisation(obs)
            actions, eps, log_ratio = mixture_candidates(x, r, c.num_candidates, box.bounded, mean, factor,
                                                         c.defensive_fraction, c.proposal_inflation)
        q = self.critic.candidates_min_q(obs, box.to_action(actions))
        weights = torch.softmax(q / self.temperature.value + log_ratio, dim=1)
        return (weights.unsqueeze(-1) * (actions - eps)).sum(1), weights

    def policy_loss(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(5) at the batch's replay pairs (s, a), one JVP per pair, plus ``q_loss_weight`` x -Q(s, a_theta) at a
        one-step action; the entropy from the TD target's samples."""
        obs, c = batch["obs"], self.config
        a = self.policy.box.normalise(batch["actions"])
        r, t = self.sample_times(a.shape[0], a)
        x = (1 - r) * torch.randn_like(a) + r * a
        with torch.no_grad():
            v_bar, weights = self.posterior_velocity(obs, x, r)
        u, target = meanflow_target(self.policy.network, x, r, t, obs, v_bar)
        loss = (u - target).pow(2).sum(-1).mean()
        if c.q_loss_weight > 0:
            loss = loss - c.q_loss_weight * self.critic.min_target_q(obs, self.policy.sample(obs).action).mean()
        ess = (1.0 / weights.pow(2).sum(1)).mean() / weights.shape[1]
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
