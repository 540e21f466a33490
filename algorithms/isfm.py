"""ISFM-SAC: max-entropy RL with a flow policy, improved by importance-sampling flow matching (arXiv 2512.23870).

Policy evaluation is soft TD with log pi(a|s) from the change of variables of the sampled flow map (flows.py).
Policy improvement moves pi towards pi+(u|s) proportional to exp(Q(s, u)/alpha) using the current policy as the
proposal: for each state draw u_j ~ pi(.|s), j = 1..M, with log pi(u_j|s), and self-normalised weights
    w_j = softmax_j( Q(s, u_j)/alpha - log pi(u_j|s) )          (the partition function of pi+ cancels)
then minimise the weighted conditional flow-matching loss on the straight path
    L = E_s sum_j w_j || v(x_t, t, s) - (x_1^j - x_0) ||^2,  x_t = (1 - t) x_0 + t x_1^j,
with x_1^j the pre-squash latent of u_j, a fresh x_0 ~ N(0, I) and t ~ U[0, 1]. The update's error grows with the
Renyi divergence between successive policies, so the effective sample size (sum_j w_j)^2 / sum_j w_j^2, divided by
M, is logged as ``learner/weight_ess`` (1 = proposal equals target). ``weight_temperature`` < 1 tempers the weights
(w_j proportional to ratio_j^beta), a documented option for low ESS; the default 1 is the paper's estimator.

Implementation choice: the states s are the batch's next states s', and the M candidates come from the same flow
solve that gives the soft TD target its a' (the first candidate), so each update integrates the flow once;
``improve_at: obs`` takes the batch's states instead, with a second solve (candidates.py). The weights stay correct
because log pi(u_j|s) is the density of the policy that drew u_j.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, FiniteFloat

from softflow.algorithms.candidates import CandidateConfig, CandidateFlowMatching, effective_sample_fraction
from softflow.algorithms.policy import PolicySample


class ISFMConfig(CandidateConfig):
    name: Literal["isfm"] = "isfm"
    weight_temperature: FiniteFloat = Field(1.0, gt=0, le=1, description="beta in w proportional to ratio^beta")


class ISFM(CandidateFlowMatching):
    Config = ISFMConfig
    config: ISFMConfig

    def policy_loss(self, batch: dict[str, torch.Tensor], candidates: PolicySample
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted flow-matching loss at the next states s' of the batch, whose M candidates (drawn in the
        same solve as the TD target's a') are reweighted by the critic as it is after this update's TD step; or at
        its states s, with candidates of their own (``improve_at: obs``)."""
        obs, candidates = self.improvement_candidates(batch, candidates)
        with torch.no_grad():
            q = self.candidate_q(obs, candidates)
            log_ratio = q / self.temperature.value - candidates.log_prob
            weights = torch.softmax(self.config.weight_temperature * log_ratio, dim=1)
        loss = self.policy.flow_matching_loss(obs, candidates.latent, weights)
        ess = effective_sample_fraction(weights).mean()
        return loss, -candidates.log_prob.mean(), {"learner/weight_ess": ess}
