"""What ISFM-SAC and FMER share: a flow policy improved by weighted flow matching towards M candidate actions drawn
from the policy itself at each state of the batch (their modules give the weights).

``improve_at`` names those states. ``next_obs`` (the default): the batch's next states s', whose candidates come
from the same flow solve that gives the soft TD target its a', so each update solves the flow once. ``obs``: the
batch's states s, with a second solve there (and one draw per next state for the TD target): start states are never
next states, and where the decision is taken at the start (the multi-goal task's origin) the policy is otherwise
improved there only by generalisation from its neighbours.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from softflow.algorithms.base import AlgorithmConfig, SoftActorCritic
from softflow.algorithms.flows import FlowConfig, FlowPolicy, make_flow_policy
from softflow.algorithms.policy import PolicySample
from softflow.algorithms.squash import Squash


class CandidateConfig(AlgorithmConfig):
    flow: FlowConfig = FlowConfig()
    num_candidates: int = Field(16, ge=2, description="M, candidate actions per state for the weights")
    improve_at: Literal["next_obs", "obs"] = Field(
        "next_obs", description="the states of the policy step: next_obs shares the TD target's flow solve, obs "
                                "draws candidates at the batch's states (and start states) with a second solve")
    policy_frequency: int = Field(1, ge=1, description="the policy steps every this many updates")


def effective_sample_fraction(weights: torch.Tensor) -> torch.Tensor:
    """(sum_j w_j)^2 / (M sum_j w_j^2) per row of (B, M) weights: 1 for uniform weights, 1/M for one-hot."""
    return weights.sum(-1).pow(2) / (weights.shape[-1] * weights.pow(2).sum(-1))


class CandidateFlowMatching(SoftActorCritic):
    """The flow policy, the candidate draws and the states they are drawn at (module docstring)."""

    config: CandidateConfig

    def build_policy(self, obs_dim: int, act_dim: int, squash: Squash) -> FlowPolicy:
        return make_flow_policy(self.config.flow, obs_dim, act_dim, squash)

    @property
    def samples_per_next_state(self) -> int:
        return self.config.num_candidates if self.config.improve_at == "next_obs" else 1

    def improvement_candidates(self, batch: dict[str, torch.Tensor], next_sample: PolicySample
                               ) -> tuple[torch.Tensor, PolicySample]:
        """The states of the policy step and the M candidates at each (``improve_at``), shape (B, M, d)."""
        if self.config.improve_at == "next_obs":
            return batch["next_obs"], next_sample
        with torch.no_grad():
            return batch["obs"], self.policy.sample(batch["obs"], self.config.num_candidates,
                                                    with_log_prob=self.entropy_regularised)

    def candidate_q(self, obs: torch.Tensor, candidates: PolicySample) -> torch.Tensor:
        """min(Q1, Q2) of the M candidates at each state, shape (B, M), for the weights."""
        return self.critic.candidates_min_q(obs, candidates.action)
