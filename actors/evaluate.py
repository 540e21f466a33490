"""Evaluation episodes with the deterministic policy (x_0 = 0 for flows, the mean for SAC)."""

from __future__ import annotations

from typing import Callable

import gymnasium
import numpy as np

from softflow.actors.rollout import flatten_obs


def evaluate(env: gymnasium.Env, act_fn: Callable[[np.ndarray, bool], np.ndarray], episodes: int,
             seed: int) -> dict[str, float]:
    """Runs ``episodes`` full episodes (seeds ``seed``, ``seed + 1``, ...) and returns ``eval/`` metrics."""
    returns, lengths = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, length, done = 0.0, 0, False
        while not done:
            action = act_fn(flatten_obs(env.observation_space, obs)[None], False)[0]
            if np.all(np.isfinite(env.action_space.low)):
                action = np.clip(action, env.action_space.low, env.action_space.high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total, length, done = total + float(reward), length + 1, terminated or truncated
        returns.append(total)
        lengths.append(length)
    return {"eval/episode_return": float(np.mean(returns)), "eval/episode_length": float(np.mean(lengths))}
