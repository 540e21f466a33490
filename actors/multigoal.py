"""The 2D multi-goal task of Soft Q-learning (Haarnoja et al. 2017) and FMER's Figure 3: a point mass at the origin
with four equally good goals, where a max-entropy policy should keep all four modes and a Gaussian commits to one.

State: the position s in [-7, 7]^2, starting at N(0, 0.1^2 I). Action: a velocity a in [-1, 1]^2; s' = clip(s + a).
Reward: -(30 |a|^2 + min_g |s' - g|) per step, plus 10 on reaching a goal (|s' - g| < 1), which ends the episode;
at most 30 steps. Goals at (5, 0), (0, 5), (-5, 0), (0, -5). These are the classic task's constants.

``goal_headings`` is the mode-coverage metric: the fraction of policy samples at the origin heading towards each
goal, "heading" meaning within 22.5 degrees of the goal's direction (so a uniform spread of directions heads for
some goal only half of the time) and moving at least ``MIN_SPEED``.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

ENV_ID = "softflow/MultiGoal-v0"
GOALS = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0], [0.0, -5.0]])
HEADING_HALF_ANGLE = np.deg2rad(22.5)
MIN_SPEED = 0.05


class MultiGoalEnv(gymnasium.Env):
    """The point-mass task with four goals (module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, actuation_cost: float = 30.0, distance_cost: float = 1.0, goal_reward: float = 10.0,
                 goal_radius: float = 1.0, init_std: float = 0.1, bound: float = 7.0):
        self.actuation_cost, self.distance_cost, self.goal_reward = actuation_cost, distance_cost, goal_reward
        self.goal_radius, self.init_std, self.bound = goal_radius, init_std, bound
        self.observation_space = spaces.Box(-bound, bound, (2,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.position = np.clip(self.init_std * self.np_random.standard_normal(2), -self.bound, self.bound)
        return self.position.astype(np.float32), {}

    def step(self, action: np.ndarray):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.position = np.clip(self.position + action, -self.bound, self.bound)
        distances = np.linalg.norm(GOALS - self.position, axis=1)
        reached = bool(distances.min() < self.goal_radius)
        reward = -(self.actuation_cost * float(action @ action) + self.distance_cost * float(distances.min()))
        reward += self.goal_reward * reached
        info = {"goal": int(distances.argmin()) if reached else -1}
        return self.position.astype(np.float32), reward, reached, False, info


def goal_headings(actions: np.ndarray) -> np.ndarray:
    """Fraction of ``actions`` (N, 2) taken at the origin that head towards each of the four goals (module
    docstring); the remainder heads for none."""
    speed = np.linalg.norm(actions, axis=1)
    directions = GOALS / np.linalg.norm(GOALS, axis=1, keepdims=True)
    cosines = actions @ directions.T / np.maximum(speed, 1e-12)[:, None]
    heading = (cosines >= np.cos(HEADING_HALF_ANGLE)) & (speed >= MIN_SPEED)[:, None]
    return heading.mean(axis=0)


def register() -> None:
    """Makes ``softflow/MultiGoal-v0`` known to gymnasium.make (30-step episodes)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point=MultiGoalEnv, max_episode_steps=30)
