"""FMER: flow-matching policy with entropy regularisation (arXiv 2603.17685; v3: "... with Mirror Descent and
Entropy Constraints"). No official code exists; the choices below are ours and each is named with its reason.

Policy improvement is one step of KL-regularised (mirror-descent) soft policy iteration, taken by weighted flow
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
step; alpha = 0 (``entropy_term: false``) is plain advantage weighting softmax(Q/T), which ALGORITHMS.md reports to
collapse without the entropy term.

Choices the paper leaves open:
- Entropy: log pi_k(a_j|s) is the exact change-of-variables density of the sampled K-step map with the tanh
  correction (flows.py, ``flow.log_prob: exact``, or the Hutchinson estimate), so the entropy enters through the
  weights (1) and the soft TD target, and needs no gradient through the solver. alpha is the Lagrange multiplier
  of the constraint H(pi) >= target entropy (SAC's dual update, ``autotune_alpha``), fed with -mean_j log pi(a_j|s).
- Trust region: with ``tune_mirror_temperature`` T is set at every update, by bisection on log(T + alpha), to the
  smallest T >= 0 whose weights keep an effective sample size (sum w)^2 / sum w^2 of at least ``target_ess`` x M
  on average over the batch's states: a large step where the candidates agree with the target, a small one where
  the importance weights would rest on a few samples. Otherwise T is ``mirror_temperature``, fixed.
- Weightings for ablation (ALGORITHMS.md section 3): ``soft`` (1); ``top1``, all weight on argmax_j A_j (greedy;
  the paper reports it plateaus); ``unnormalised``, w_j = exp((A_j - mean_j A_j)/(T + alpha)) without the
  normaliser (the paper reports it unstable).
- States and candidates: the batch's next states s' with the TD target's flow solve, or its states s with a solve
  of their own (``improve_at``, candidates.py, shared with ISFM-SAC); the critic that weights them is the one just
  updated by this update's TD step.
- Solver: 10 Euler steps by default (the paper's); acting executes the best of ``actors.candidates`` samples by
  min(Q1, Q2) (the paper's data collection), which the rollout actors do for every algorithm.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from softflow.algorithms.candidates import CandidateConfig, CandidateFlowMatching, effective_sample_fraction
from softflow.algorithms.policy import PolicySample

Weighting = Literal["soft", "top1", "unnormalised"]


class FMERConfig(CandidateConfig):
    name: Literal["fmer"] = "fmer"
    weighting: Weighting = Field("soft", description="soft (1), top1 (greedy) or unnormalised, for ablations")
    tune_mirror_temperature: bool = Field(True, description="set T each update from the weights' ESS")
    target_ess: float = Field(0.5, gt=0, le=1, description="the ESS fraction (of M) that tuned T keeps")
    mirror_temperature: float = Field(0.0, ge=0, description="T when it is not tuned (0: ISFM's full step)")
    entropy_term: bool = Field(True, description="false: no entropy anywhere (alpha = 0), the ablation")

    @model_validator(mode="after")
    def _temperature_positive(self) -> "FMERConfig":
        if not (self.entropy_term or self.tune_mirror_temperature or self.mirror_temperature > 0):
            raise ValueError("mirror_temperature must be > 0 when entropy_term is false and "
                             "tune_mirror_temperature is false (the weights divide by T + alpha = T)")
        return self


def ess_temperature(advantages: torch.Tensor, floor: float, target: float, iterations: int = 40) -> float:
    """The smallest tau >= ``floor`` with mean ESS fraction of softmax(advantages / tau) >= ``target``.

    The ESS fraction grows with tau (towards 1 for flat weights), so the answer is found by bisection on log tau
    between ``floor`` (or a tiny multiple of the advantages' spread when ``floor`` is 0) and a doubling bound."""
    spread = float(advantages.std(dim=-1).mean()) + 1e-12

    def ess(tau: float) -> float:
        return float(effective_sample_fraction(torch.softmax(advantages / tau, dim=-1)).mean())

    low = floor if floor > 0 else 1e-6 * spread
    if ess(low) >= target:
        return low
    high = max(2 * low, spread)
    while ess(high) < target:
        high *= 2
    log_low, log_high = math.log(low), math.log(high)
    for _ in range(iterations):
        mid = 0.5 * (log_low + log_high)
        log_low, log_high = (log_low, mid) if ess(math.exp(mid)) >= target else (mid, log_high)
    return math.exp(log_high)


def candidate_weights(advantages: torch.Tensor, tau: float, weighting: Weighting) -> torch.Tensor:
    """Weights (B, M) of the candidates from their soft advantages A_j and the temperature tau = T + alpha."""
    if weighting == "soft":
        return torch.softmax(advantages / tau, dim=-1)
    if weighting == "top1":
        return torch.nn.functional.one_hot(advantages.argmax(-1), advantages.shape[-1]).to(advantages)
    return torch.exp((advantages - advantages.mean(-1, keepdim=True)) / tau)


class FMER(CandidateFlowMatching):
    Config = FMERConfig
    config: FMERConfig

    @property
    def entropy_regularised(self) -> bool:
        return self.config.entropy_term

    def policy_loss(self, batch: dict[str, torch.Tensor], candidates: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """The weighted flow-matching loss towards the M candidates at each state (``improve_at``), weights (1)."""
        obs, candidates = self.improvement_candidates(batch, candidates)
        alpha = self.alpha
        with torch.no_grad():
            advantages = self.candidate_q(obs, candidates)
            if self.entropy_regularised:
                advantages = advantages - alpha * candidates.log_prob
            if self.config.tune_mirror_temperature and self.config.weighting != "top1":
                tau = ess_temperature(advantages, alpha, self.config.target_ess)
            else:
                tau = self.config.mirror_temperature + alpha
            weights = candidate_weights(advantages, tau, self.config.weighting)
        loss = self.policy.flow_matching_loss(obs, candidates.latent, weights)
        entropy = -candidates.log_prob.mean() if self.entropy_regularised else None
        metrics = {"learner/weight_ess": effective_sample_fraction(weights).mean().item(),
                   "learner/mirror_temperature": tau - alpha}
        return loss, entropy, metrics
