"""Evaluation episodes: the acting rule (best of ``actors.candidates`` by Q) and the single deterministic sample
(x_0 = 0 for flows, the mean for SAC), so that papers evaluated either way can be put side by side (FLAME's code
evaluates best-of-32, the others one sample)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np

from softflow.actors.rollout import EpisodeStep, check_finite, flatten_obs
from softflow.algorithms.base import Algorithm

# Final-info keys averaged over episodes when the env reports them (FrankaKitchen, see TaskCompletionInfo), and
# the names of their means under ``eval/`` and ``train/``.
INFO_METRICS = {"tasks_completed": "tasks_completed", "task_fraction": "task_fraction", "success": "success_rate"}


def episode_info_means(final_infos: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """The mean of each :data:`INFO_METRICS` key over the episodes' final infos, as ``{prefix}/{name}``, for the
    keys that every episode reports (none without episodes)."""
    return {f"{prefix}/{name}": float(np.mean([float(info[key]) for info in final_infos]))
            for key, name in INFO_METRICS.items() if final_infos and all(key in info for info in final_infos)}


def _run_episode(env: gymnasium.Env, act_fn: Callable[[np.ndarray, bool], np.ndarray],
                 seed: int) -> tuple[float, int, dict[str, Any]]:
    """One deterministic episode: its return, its length and its final info."""
    with np.errstate(all="ignore"):
        obs, info = env.reset(seed=seed)
        flat = flatten_obs(env.observation_space, obs)
    check_finite(env, flat, 0.0, "an evaluation reset")
    total, length, done = 0.0, 0, False
    while not done:
        action = act_fn(flat[None], False)[0]
        if np.all(np.isfinite(env.action_space.low)):
            action = np.clip(action, env.action_space.low, env.action_space.high)
        with np.errstate(all="ignore"):
            obs, reward, terminated, truncated, info = env.step(action)
            flat = flatten_obs(env.observation_space, obs)
        check_finite(env, flat, float(reward), EpisodeStep(length + 1, "an evaluation episode"))
        total, length, done = total + float(reward), length + 1, terminated or truncated
    return total, length, info


def evaluate(env: gymnasium.Env, act_fn: Callable[[np.ndarray, bool], np.ndarray], episodes: int,
             seed: int) -> dict[str, float]:
    """Runs ``episodes`` full episodes (seeds ``seed``, ``seed + 1``, ...) and returns ``eval/`` metrics.

    Besides the mean return and length, each key of :data:`INFO_METRICS` found in every episode's final info is
    averaged (``eval/tasks_completed``, ``eval/task_fraction`` and ``eval/success_rate`` on FrankaKitchen). No
    episodes, no metrics."""
    if episodes <= 0:
        return {}
    results = [_run_episode(env, act_fn, seed + episode) for episode in range(episodes)]
    returns, lengths, final_infos = zip(*results)
    return {"eval/episode_return": float(np.mean(returns)), "eval/episode_length": float(np.mean(lengths)),
            **episode_info_means(list(final_infos), "eval")}


def evaluate_algorithm(env: gymnasium.Env, algorithm: Algorithm, candidates: int, episodes: int,
                       seed: int) -> dict[str, float]:
    """:func:`evaluate` with the acting rule (best of ``candidates``), plus ``eval/episode_return_single``: the
    return of the single deterministic sample on the same episode seeds (the same figure when ``candidates`` is 1)."""
    metrics = evaluate(env, lambda obs, explore: algorithm.act(obs, explore, candidates), episodes, seed)
    if not metrics:
        return metrics
    if candidates == 1:
        single = metrics["eval/episode_return"]
    else:
        single = evaluate(env, lambda obs, explore: algorithm.act(obs, explore, 1), episodes, seed)[
            "eval/episode_return"]
    return metrics | {"eval/episode_return_single": single}
