"""The 2D multi-goal task of Soft Q-learning (Haarnoja et al. 2017) and FMER's Figure 3: a point mass at the origin
with four equally good goals, where a max-entropy policy should keep all four modes and a Gaussian commits to one.

State: the position s in [-7, 7]^2, starting at N(0, 0.1^2 I) (``init_std``; with ``origin_start_prob`` < 1,
only that fraction of episodes starts there and the others at N(0, ``spread_std``^2 I)). Action: a velocity a in
[-1, 1]^2; s' = clip(s + a). Reward: -(30 |a|^2 + min_g |s' - g|) per step, plus 10 on reaching a goal
(|s' - g| < 1), which ends the episode; at most 30 steps. Goals at (5, 0), (0, 5), (-5, 0), (0, -5). These are the
classic task's constants.

``goal_headings`` is the mode-coverage metric: the fraction of policy samples at the origin heading towards each
goal, "heading" meaning within 22.5 degrees of the goal's direction (so a uniform spread of directions heads for
some goal only half of the time) and moving at least ``MIN_SPEED``. ``soft_optimal_headings`` is the same metric
for the exact soft-optimal policy, by soft value iteration on a grid: what a learned policy can reach at most.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

ENV_ID = "softflow/MultiGoal-v0"
GOALS = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0], [0.0, -5.0]])
HEADING_HALF_ANGLE = np.deg2rad(22.5)
MIN_SPEED = 0.05


class MultiGoalEnv(gymnasium.Env):
    """The point-mass task with four goals (module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, actuation_cost: float = 30.0, distance_cost: float = 1.0, goal_reward: float = 10.0,
                 goal_radius: float = 1.0, init_std: float = 0.1, bound: float = 7.0, origin_start_prob: float = 1.0,
                 spread_std: float = 2.5):
        if not 0 <= origin_start_prob <= 1:
            raise ValueError(f"origin_start_prob must be in [0, 1], got {origin_start_prob}")
        self.actuation_cost, self.distance_cost, self.goal_reward = actuation_cost, distance_cost, goal_reward
        self.goal_radius, self.init_std, self.bound = goal_radius, init_std, bound
        self.origin_start_prob, self.spread_std = origin_start_prob, spread_std
        self.observation_space = spaces.Box(-bound, bound, (2,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        std = self.init_std if self.np_random.random() < self.origin_start_prob else self.spread_std
        self.position = np.clip(std * self.np_random.standard_normal(2), -self.bound, self.bound)
        return self.position.astype(np.float32), {}

    def step(self, action: np.ndarray):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.position = np.clip(self.position + action, -self.bound, self.bound)
        reward, reached = self.reward(self.position, action)
        info = {"goal": int(np.linalg.norm(GOALS - self.position, axis=1).argmin()) if reached else -1}
        return self.position.astype(np.float32), float(reward), bool(reached), False, info

    def reward(self, landed: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reward of ``action`` (..., 2) that took the point to ``landed`` (..., 2), and whether it reached a
        goal: -(actuation_cost |a|^2 + distance_cost min_g |s' - g|) + goal_reward on reaching one."""
        distance = np.linalg.norm(landed[..., None, :] - GOALS, axis=-1).min(-1)
        reached = distance < self.goal_radius
        cost = self.actuation_cost * (action**2).sum(-1) + self.distance_cost * distance
        return self.goal_reward * reached - cost, reached


def goal_headings(actions: np.ndarray) -> np.ndarray:
    """Fraction of ``actions`` (N, 2) taken at the origin that head towards each of the four goals (module
    docstring); the remainder heads for none."""
    speed = np.linalg.norm(actions, axis=1)
    directions = GOALS / np.linalg.norm(GOALS, axis=1, keepdims=True)
    cosines = actions @ directions.T / np.maximum(speed, 1e-12)[:, None]
    heading = (cosines >= np.cos(HEADING_HALF_ANGLE)) & (speed >= MIN_SPEED)[:, None]
    return heading.mean(axis=0)


def soft_optimal_headings(alpha: float, gamma: float = 0.99, spacing: float = 0.2, action_points: int = 31,
                          tolerance: float = 1e-3, samples: int = 20000, state: tuple[float, float] = (0.0, 0.0),
                          **env_kwargs: float) -> np.ndarray:
    """``goal_headings`` of the soft-optimal policy pi*(a|s) proportional to exp(Q*(s, a) / alpha) at ``state``
    (the origin by default; the directions are measured from the origin, as in ``goal_headings``).

    Soft value iteration V(s) = alpha log integral exp(Q(s, a) / alpha) da, Q(s, a) = r(s, a) + gamma V(s') (0 after
    a goal), on a grid of the plane ``spacing`` apart with V bilinear in between, over ``action_points`` squared
    actions on the box (an odd number), until V moves by less than ``tolerance``; goals end episodes within about
    ten steps from anywhere, so a few dozen sweeps suffice. The 30-step limit is not modelled (the learners
    bootstrap through it). The metric is taken on ``samples`` draws from the action grid, spread uniformly within
    their cells."""
    env = MultiGoalEnv(**env_kwargs)
    half = round(env.bound / spacing)  # grids symmetric to the bit, so that goals' boundary ties fall alike
    axis = spacing * np.arange(-half, half + 1)
    grid = np.arange(-(action_points // 2), action_points // 2 + 1) / (action_points // 2)
    actions = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    cell = grid[1] - grid[0]

    def transitions(states: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (state, action): the reward, 0 where a goal ends the episode else 1, and where s' lies on V's grid in
        grid_sample's coordinates ((x, y) are (column, row))."""
        landed = np.clip(states[:, None] + actions, -env.bound, env.bound)
        reward, reached = env.reward(landed, actions)
        where = torch.from_numpy(landed / (spacing * half)).flip(-1)[None]
        return torch.from_numpy(reward), torch.from_numpy(~reached), where

    def q_values(transition: tuple[torch.Tensor, torch.Tensor, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        reward, continues, where = transition
        next_values = torch.nn.functional.grid_sample(values[None, None], where, align_corners=True)[0, 0]
        return reward + gamma * next_values * continues

    states = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    grid_transitions = transitions(states)  # the same in every sweep: only V changes
    values = torch.zeros(len(axis), len(axis), dtype=torch.float64)
    while True:
        q = q_values(grid_transitions, values)
        updated = (alpha * torch.logsumexp(q / alpha + 2 * np.log(cell), dim=1)).reshape(values.shape)
        change, values = float((updated - values).abs().max()), updated
        if change < tolerance:
            break
    at_state = q_values(transitions(np.array([state], dtype=np.float64)), values)[0]
    probabilities = torch.softmax(at_state / alpha, 0).numpy()
    rng = np.random.default_rng(0)
    drawn = actions[rng.choice(len(probabilities), samples, p=probabilities)]
    return goal_headings(drawn + rng.uniform(-cell / 2, cell / 2, drawn.shape))


def register() -> None:
    """Makes ``softflow/MultiGoal-v0`` known to gymnasium.make (30-step episodes)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point=MultiGoalEnv, max_episode_steps=30)
