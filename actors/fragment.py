"""A batch of environment transitions produced by one rollout call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRANSITION_FIELDS: tuple[str, ...] = (
    "obs",
    "actions",
    "rewards",
    "next_obs",
    "terminated",
    "truncated",
)


@dataclass
class Fragment:
    """Transitions flattened over (time, env), plus finished-episode statistics.

    Attributes:
        obs: (N, obs_dim) float32 observations.
        actions: (N, act_dim) float32 actions that were executed.
        rewards: (N,) float32 rewards.
        next_obs: (N, obs_dim) float32 true next observations; at episode ends
            this is the final observation, never the observation after reset.
        terminated: (N,) float32, 1.0 only for true terminal states (the
            learner does not bootstrap there).
        truncated: (N,) float32, 1.0 where the episode was cut by a time limit
            (not terminal: the learner bootstraps from ``next_obs``).
        policy_version: version of the policy that produced the actions.
        episode_returns: returns of episodes that finished inside the fragment.
        episode_lengths: lengths of those episodes.
        episode_infos: final info dict of each of those episodes.
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    policy_version: int = 0
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    episode_infos: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of transitions."""
        return int(self.rewards.shape[0])

    @classmethod
    def concat(cls, fragments: Sequence[Fragment]) -> Fragment:
        """Concatenate fragments in order; ``policy_version`` is the oldest one."""
        if not fragments:
            raise ValueError("Fragment.concat needs at least one fragment")
        arrays = {
            name: np.concatenate([getattr(f, name) for f in fragments], axis=0)
            for name in TRANSITION_FIELDS
        }
        return cls(
            **arrays,
            policy_version=min(f.policy_version for f in fragments),
            episode_returns=[r for f in fragments for r in f.episode_returns],
            episode_lengths=[n for f in fragments for n in f.episode_lengths],
            episode_infos=[i for f in fragments for i in f.episode_infos],
        )
