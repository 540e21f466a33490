"""FMER: flow-matching policy with entropy regularisation (arXiv 2603.17685; v1 "Flow Matching Policy with Entropy
Regularization", v3 "Flow Matching Policy Optimization with Mirror Descent and Entropy Constraints"). The defaults
follow v3; v1's weights and entropy loss are options. docs/algorithms.md section 3 lists every place where this
module differs from the paper, and why.

Policy improvement (v3) is one step of KL-regularised (mirror-descent) soft policy iteration, taken by weighted flow
matching instead of by backpropagating through the ODE. With the current policy pi_k, a mirror-descent temperature
T >= 0 (the inverse step size) and the entropy multiplier alpha, the step
    pi_{k+1} = argmax_pi  E_pi[Q] + alpha H(pi) - T KL(pi || pi_k)
has the closed form pi_{k+1} proportional to pi_k^{T/(T+alpha)} exp(Q/(T+alpha)). Drawing the candidate set
a_1..a_M ~ pi_k(.|s) and importance-weighting towards pi_{k+1} gives the self-normalised weights
    w_j = softmax_j( A_j / (T + alpha) ),   A_j = Q(s, a_j) - alpha log pi_k(a_j|s)                      (1)
(the mean of A over the candidate set cancels in the softmax: the paper's advantage weighting), and the update
minimises the weighted conditional flow-matching loss towards the candidates' latents (``FlowPolicy.
flow_matching_loss``), a simulation-free surrogate of the mirror step. Its fixed point is pi proportional to
exp(Q/alpha), the soft-optimal policy: there A_j is constant and the weights are uniform. T = 0 is ISFM-SAC's full
step; alpha = 0 (``entropy_term: false``) is plain advantage weighting softmax(Q/T), which the paper reports to
collapse without the entropy term.

Entropy (both versions): log pi_k(a_j|s) by the instantaneous change of variables along the solve (10 Euler steps
by default, as in the paper), each step's trace by Hutchinson's estimator, plus the tanh correction (v3's analytic
entropy objective); flows.py, ``flow.log_prob: hutchinson``, this module's default. ``flow.log_prob: exact`` takes
each step's exact Jacobian log-det instead: the density of the map actually sampled, with no probe noise and no
O(dt) discretisation gap, at d Jacobian-vector products and a d x d log-det per step (docs/algorithms.md, section 3,
on what limits each as d grows). The entropy enters through the weights (1) and the soft TD target and needs no
gradient through the solver. alpha is the Lagrange multiplier of the constraint H(pi) >= target entropy (SAC's dual
update, ``autotune_alpha``), fed with -mean_j log pi(a_j|s).
Where it enters linearly (the TD target, alpha's entropy, the loss (3)) Hutchinson's estimate is unbiased for the
ODE's log-density. The weights (1) are another matter: they need the density of the actions actually sampled, and
the trace quadrature differs from the sampled map's log-det by a term that varies from candidate to candidate
wherever the flow is non-Gaussian and the steps are coarse (flows.py: O(dt^2) per Euler step, O(dt^3) per midpoint
step, large where a step contracts strongly). Against the fixed mixture energy of tests/algorithms/
test_fixed_energy.py (4 midpoint steps) it leaves a mode 0.035 heavier than its weight, with one probe or with the
exact trace alike, where the exact log-det leaves 0.011; so that test, and experiments that need the density of a
coarse solve, name ``flow.log_prob: exact``.

Trust region (v3): with ``tune_mirror_temperature`` T is set at every update, by bisection on log(T + alpha), to the
smallest T >= 0 whose weights keep an effective sample size (sum w)^2 / sum w^2 of at least ``target_ess`` x M on
average over the batch's states: a large step where the candidates agree with the target, a small one where the
importance weights would rest on a few samples. Otherwise T is ``mirror_temperature``, fixed.

Weightings (``weighting``):
- ``soft``: (1), the default (v3).
- ``advantage``: v1's advantage-weighted target velocity field,
      w_j = exp( (Q(s, a_j) - mean_i Q(s, a_i)) / T )                                                       (2)
  unnormalised and without the entropy term (v1 puts the entropy into the loss (3) instead); T tuned from the ESS
  as above, or v1's fixed temperature with ``tune_mirror_temperature: false``.
- ``top1``, all weight on argmax_j A_j (greedy; the paper reports it plateaus), and ``unnormalised``,
  w_j = exp((A_j - mean_j A_j)/(T + alpha)) without the normaliser (the paper reports it unstable): ablations.

Explicit entropy loss (v1's entropy objective), off by default:
    L = L_CFM + lambda E_s[ log pi(a|s) ],   a ~ pi(.|s) drawn with its gradient through the solve           (3)
(``entropy_loss_weight`` lambda). For the pushforward a = tanh(phi(x_0)) its gradient is
-lambda grad H = -lambda E[grad sum_k log|det F_k(x_k)| + grad log|det tanh'(x_K)|]: it widens every step's map.
``entropy_loss_until`` N applies it at updates 0..N-1 and drops it from update N on (v1's "entropy off after N
steps" ablation; N counts this learner's gradient updates). It is off by default because v3's weights (1) already
carry the entropy: with (1), (3) would count it twice; it is meant for ``weighting: advantage``.

Choices the paper leaves open:
- States and candidates: the batch's next states s' with the TD target's flow solve, or its states s with a solve
  of their own (``improve_at``, candidates.py, shared with ISFM-SAC); the critic that weights them is the one just
  updated by this update's TD step. The loss (3) draws one action per improvement state.
- Acting executes the best of ``actors.candidates`` samples by min(Q1, Q2) (the paper's data collection), which
  the rollout actors do for every algorithm.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, FiniteFloat, field_validator, model_validator

from softflow.algorithms.candidates import CandidateConfig, CandidateFlowMatching, effective_sample_fraction
from softflow.algorithms.flows import FlowConfig, FlowPolicy
from softflow.algorithms.policy import PolicySample

Weighting = Literal["soft", "advantage", "top1", "unnormalised"]


class FMERConfig(CandidateConfig):
    name: Literal["fmer"] = "fmer"
    flow: FlowConfig = Field(FlowConfig(log_prob="hutchinson"), description="the flow policy; log_prob defaults to "
                                                                             "hutchinson here (the paper's)")
    weighting: Weighting = Field("soft", description="soft (1, v3), advantage (2, v1), or the top1 and "
                                                     "unnormalised ablations (module docstring)")
    tune_mirror_temperature: bool = Field(True, description="set T each update from the weights' ESS")
    target_ess: FiniteFloat = Field(0.5, gt=0, le=1, description="the ESS fraction (of M) that tuned T keeps")
    mirror_temperature: FiniteFloat = Field(0.0, ge=0, description="T when it is not tuned (0: ISFM's full step)")
    entropy_term: bool = Field(True, description="false: no entropy anywhere (alpha = 0), the ablation")
    entropy_loss_weight: FiniteFloat = Field(0.0, ge=0, description="lambda of v1's explicit entropy loss (3); 0: off")
    entropy_loss_until: int | None = Field(None, ge=0, description="drop the loss (3) from this update on (v1's "
                                                                  "'entropy off after N steps'); null: never")

    @field_validator("flow", mode="before")
    @classmethod
    def _hutchinson_unless_named(cls, value: Any) -> Any:
        """A flow given as a mapping without ``log_prob`` gets FMER's default estimator, not FlowConfig's."""
        return {"log_prob": "hutchinson", **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _temperature_positive(self) -> FMERConfig:
        if self.tune_mirror_temperature or self.mirror_temperature > 0:
            return self
        if not self.entropy_term:
            raise ValueError("mirror_temperature must be > 0 when entropy_term is false and "
                             "tune_mirror_temperature is false (the weights divide by T + alpha = T)")
        if self.weighting == "advantage":
            raise ValueError("mirror_temperature must be > 0 for weighting advantage when tune_mirror_temperature "
                             "is false (the weights (2) divide by T)")
        return self


def ess_temperature(advantages: torch.Tensor, floor: torch.Tensor | float, target: float, rounds: int = 4,
                    points: int = 32) -> torch.Tensor:
    """The smallest tau >= ``floor`` with mean ESS fraction of softmax(advantages / tau) >= ``target``, as a 0-d
    tensor, found on the advantages' device with no host read.

    The ESS fraction grows with tau (towards 1 for flat weights). The search brackets log tau between ``floor``
    (or 1e-6 times the advantages' spread when ``floor`` is 0) and an upper bound that always suffices: with R the
    largest range max_j A_j - min_j A_j of a row, every weight ratio is at least exp(-R / tau), and the ESS
    fraction of a row is at least its smallest weight over its largest, so tau = R / -log(target) meets the
    target in every row. Each of ``rounds`` rounds evaluates the ESS at ``points`` temperatures of the bracket at
    once and keeps the interval where it first reaches the target: the bracket shrinks (points - 1)^rounds-fold
    (about 10^6 with the defaults), in a fixed number of vectorised steps instead of a data-dependent loop."""
    spread = advantages.std(dim=-1).mean() + 1e-12
    floor = torch.as_tensor(floor, dtype=advantages.dtype, device=advantages.device)
    low = torch.where(floor > 0, floor, 1e-6 * spread)
    width = (advantages.amax(-1) - advantages.amin(-1)).amax()
    high = torch.maximum(2 * low, width / -math.log(min(target, 1 - 1e-6)))
    log_low, log_high = low.log(), high.log()
    fractions = torch.linspace(0, 1, points, dtype=advantages.dtype, device=advantages.device)
    for _ in range(rounds):
        grid = log_low + (log_high - log_low) * fractions
        weights = torch.softmax(advantages / grid.exp().view(-1, 1, 1), dim=-1)
        enough = effective_sample_fraction(weights).mean(-1) >= target
        first = torch.argmax(enough.to(torch.int8))  # the first grid point that reaches the target
        log_high = grid.gather(0, first.reshape(1))[0]  # gather, not grid[first]: indexing with a tensor reads it
        log_low = grid.gather(0, (first - 1).clamp(min=0).reshape(1))[0]
    return log_high.exp()


def candidate_weights(advantages: torch.Tensor, tau: torch.Tensor | float, weighting: Weighting) -> torch.Tensor:
    """Weights (B, M) of the candidates from their advantages and the temperature tau: (1) with A_j and
    tau = T + alpha (``soft``), (2) with Q_j and tau = T (``advantage``), or an ablation (module docstring)."""
    if weighting == "soft":
        return torch.softmax(advantages / tau, dim=-1)
    if weighting == "top1":
        return torch.nn.functional.one_hot(advantages.argmax(-1), advantages.shape[-1]).to(advantages)
    return torch.exp((advantages - advantages.mean(-1, keepdim=True)) / tau)


def entropy_loss(policy: FlowPolicy, obs: torch.Tensor, weight: float) -> torch.Tensor:
    """lambda E_s[log pi(a|s)] of (3) with one action per state drawn with its gradient through the solve."""
    return weight * policy.sample(obs, with_log_prob=True).log_prob.mean()


class FMER(CandidateFlowMatching):
    Config = FMERConfig
    config: FMERConfig
    entropy_loss_on: bool = False

    @property
    def entropy_regularised(self) -> bool:
        return self.config.entropy_term

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared update, with the loss (3) switched by this update's index (a Python count, no host read)."""
        until = self.config.entropy_loss_until
        self.entropy_loss_on = self.config.entropy_loss_weight > 0 and (until is None or self.num_updates < until)
        return super().update(batch)

    def policy_loss(self, batch: dict[str, torch.Tensor], candidates: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The weighted flow-matching loss towards the M candidates at each state (``improve_at``), weights (1) or
        (2), plus the entropy loss (3) while it is on."""
        obs, candidates = self.improvement_candidates(batch, candidates)
        alpha = self.alpha_tensor
        with torch.no_grad():
            advantages = self.candidate_q(obs, candidates)
            floor = alpha.new_zeros(()) if self.config.weighting == "advantage" else alpha
            if self.entropy_regularised and self.config.weighting != "advantage":
                advantages = advantages - alpha * candidates.log_prob
            if self.config.tune_mirror_temperature and self.config.weighting != "top1":
                tau = ess_temperature(advantages, floor, self.config.target_ess)
            else:
                tau = self.config.mirror_temperature + floor
            weights = candidate_weights(advantages, tau, self.config.weighting)
        loss = self.policy.flow_matching_loss(obs, candidates.latent, weights)
        entropy = -candidates.log_prob.mean() if self.entropy_regularised else None
        metrics = {"learner/weight_ess": effective_sample_fraction(weights).mean(),
                   "learner/mirror_temperature": tau - floor}
        if self.config.entropy_loss_weight > 0:
            extra = entropy_loss(self.policy, obs, self.config.entropy_loss_weight) if self.entropy_loss_on \
                else loss.new_zeros(())
            loss = loss + extra
            metrics["losses/entropy_loss"] = extra.detach()
        return loss, entropy, metrics
