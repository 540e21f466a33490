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
step; alpha = 0 (``entropy_term: false``) is plain advantage weighting softmax(Q/T), which docs/algorithms.md reports to
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
- Weightings for ablation (docs/algorithms.md section 3): ``soft`` (1); ``top1``, all weight on argmax_j A_j (greedy;
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
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The weighted flow-matching loss towards the M candidates at each state (``improve_at``), weights (1)."""
        obs, candidates = self.improvement_candidates(batch, candidates)
        alpha = self.alpha_tensor
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
        metrics = {"learner/weight_ess": effective_sample_fraction(weights).mean(),
                   "learner/mirror_temperature": tau - alpha}
        return loss, entropy, metrics
