"""Evaluation episodes with the deterministic policy (x_0 = 0 for flows, the mean for SAC)."""

from __future__ import annotations

from typing import Any, Callable

import gymnasium
import numpy as np

from softflow.actors.rollout import flatten_obs

# Final-info keys averaged over episodes when the env reports them (FrankaKitchen, see TaskCompletionInfo).
INFO_METRICS = {"tasks_completed": "eval/tasks_completed", "success": "eval/success_rate"}


def _run_episode(env: gymnasium.Env, act_fn: Callable[[np.ndarray, bool], np.ndarray],
                 seed: int) -> tuple[float, int, dict[str, Any]]:
    """One deterministic episode: its return, its length and its final info."""
    obs, info = env.reset(seed=seed)
    total, length, done = 0.0, 0, False
    while not done:
        action = act_fn(flatten_obs(env.observation_space, obs)[None], False)[0]
        if np.all(np.isfinite(env.action_space.low)):
            action = np.clip(action, env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, info = env.step(action)
        total, length, done = total + float(reward), length + 1, terminated or truncated
    return total, length, info


def evaluate(env: gymnasium.Env, act_fn: Callable[[np.ndarray, bool], np.ndarray], episodes: int,
             seed: int) -> dict[str, float]:
    """Runs ``episodes`` full episodes (seeds ``seed``, ``seed + 1``, ...) and returns ``eval/`` metrics.

    Besides the mean return and length, each key of :data:`INFO_METRICS` found in every episode's final info is
    averaged (``eval/tasks_completed`` and ``eval/success_rate`` on FrankaKitchen). No episodes, no metrics."""
    if episodes <= 0:
        return {}
    results = [_run_episode(env, act_fn, seed + episode) for episode in range(episodes)]
    returns, lengths, final_infos = zip(*results)
    metrics = {"eval/episode_return": float(np.mean(returns)), "eval/episode_length": float(np.mean(lengths))}
    for info_key, metric in INFO_METRICS.items():
        if all(info_key in info for info in final_infos):
            metrics[metric] = float(np.mean([float(info[info_key]) for info in final_infos]))
    return metrics
