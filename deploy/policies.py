"""Trained policies out of a run: ``softflow.load_policy`` and ``softflow evaluate``.

A checkpoint holds the experiment config and the spaces next to the learner state (``checkpoint_meta``), so a
checkpoint file alone rebuilds its policy; a run directory stands for the ``learner.pt`` of its newest whole
checkpoint set (softflow/checkpoints.py). Files are loaded without running code (``weights_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from softflow import checkpoints
from softflow.actors.envs import make_env
from softflow.actors.evaluate import evaluate_algorithm
from softflow.algorithms import Algorithm, make_algorithm
from softflow.deploy.config import ConfigError, parse_experiment


class Policy:
    """A trained policy for inference on the CPU: ``sample`` draws actions, ``act`` picks by best-of-N.

    ``candidates`` is the run's ``actors.candidates``: ``act`` samples that many actions per state and executes the
    one with the highest min(Q1, Q2), the same rule as the rollout actors and the evaluator.
    """

    def __init__(self, algorithm: Algorithm, candidates: int, config: dict[str, Any]):
        self.algorithm = algorithm
        self.candidates = candidates
        self.config = config

    def _batch(self, obs: np.ndarray) -> tuple[np.ndarray, bool]:
        obs = np.asarray(obs, dtype=np.float32)
        return (obs[None], True) if obs.ndim == 1 else (obs, False)

    @torch.no_grad()
    def sample(self, obs: np.ndarray, num_samples: int = 1) -> np.ndarray:
        """``num_samples`` actions per state: (obs_dim,) -> (N, act_dim), (B, obs_dim) -> (B, N, act_dim)."""
        batch, single = self._batch(obs)
        actions = self.algorithm.policy.sample(torch.as_tensor(batch), num_samples).action.numpy()
        return actions[0] if single else actions

    def act(self, obs: np.ndarray, explore: bool = False) -> np.ndarray:
        """The best-of-N action: (obs_dim,) -> (act_dim,), (B, obs_dim) -> (B, act_dim)."""
        batch, single = self._batch(obs)
        actions = self.algorithm.act(batch, explore, self.candidates)
        return actions[0] if single else actions


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the ``learner.pt`` of the run directory's newest whole checkpoint
    set; ConfigError if there is none."""
    path = Path(path)
    if path.is_dir():
        found, _ = checkpoints.newest_set(path / "checkpoints")
        if found is None:
            raise ConfigError(f"no whole checkpoint in {path / 'checkpoints'}: give the directory of a run that "
                              f"wrote one (runs/NAME-TIME) or a checkpoint file")
        return found / checkpoints.LEARNER_FILE
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: give a run directory (runs/NAME-TIME) or a checkpoint file "
                          f"(runs/NAME-TIME/checkpoints/step-.../learner.pt)")
    return path


def load_policy(path: str | Path) -> Policy:
    """The policy of a run directory or checkpoint file, on the CPU."""
    file = checkpoint_path(path)
    try:
        state = checkpoints.load(file, "cpu")
    except checkpoints.CheckpointError as exc:
        raise ConfigError(f"{file} is not a softflow checkpoint: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{file} cannot be read ({exc.strerror or exc})") from None
    try:
        spaces, config = state["spaces"], parse_experiment(state["config"])
        algorithm = make_algorithm(config.algorithm, int(spaces["obs_dim"]), np.array(spaces["low"], dtype=np.float32),
                                   np.array(spaces["high"], dtype=np.float32), "cpu")
        algorithm.load_state_dict(state["algorithm"])
    except ConfigError as exc:
        raise ConfigError(f"{file} holds a config that does not load: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{file} is not a softflow checkpoint ({type(exc).__name__}: {message})") from None
    return Policy(algorithm, config.actors.candidates, state["config"])


def evaluate_policy(path: str | Path, episodes: int, seed: int = 20_000) -> dict[str, Any]:
    """Runs ``episodes`` deterministic evaluation episodes of a saved policy; returns a JSON-ready summary."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1 (got {episodes})")
    policy = load_policy(path)
    config = parse_experiment(policy.config)
    env = make_env(config.env)
    result = evaluate_algorithm(env, policy.algorithm, policy.candidates, episodes, seed)
    env.close()
    return {"checkpoint": str(checkpoint_path(path)), "env": config.env.id, "algorithm": config.algorithm.name,
            "episodes": episodes, "candidates": policy.candidates, **result}
