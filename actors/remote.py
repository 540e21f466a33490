"""The process-side classes of the runtime: a rollout actor, the replay-buffer actor and the evaluator.

Each is a plain class (usable and tested in one process); the driver wraps them with ``ray.remote`` and chooses
their resources and restart policies, so Ray appears only where a process boundary is crossed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from softflow.actors.envs import make_env
from softflow.actors.evaluate import evaluate_algorithm
from softflow.actors.fragment import Fragment
from softflow.actors.rate_limiter import SampleToInsertRatio
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker
from softflow.algorithms import Algorithm, make_algorithm
from softflow.checkpoints import newest_set

Weights = tuple[int, dict[str, Any]]  # (version, the tensors actors load): what the learner publishes


@dataclass(frozen=True)
class RunSummary:
    """What the driver reads of a rollout run (the fragment itself goes to the replay actor by reference)."""

    transitions: int
    policy_version: int
    episode_returns: list[float]
    episode_lengths: list[int]
    episode_infos: list[dict[str, Any]]
    incarnation: int = 0


@dataclass(frozen=True)
class ReplayStatus:
    """The replay actor's counters and rates since its last status, and how many transitions it accepts now."""

    size: int
    inserts: int
    samples: int
    inserts_per_s: float
    samples_per_s: float
    insert_allowance: int

    def metrics(self) -> dict[str, float]:
        """The ``replay/`` metrics."""
        return {"replay/size": self.size, "replay/inserts": self.inserts, "replay/samples": self.samples,
                "replay/inserts_per_s": self.inserts_per_s, "replay/samples_per_s": self.samples_per_s}


class Watched:
    """A process the driver restarts itself when it dies (deploy/run/supervision.py).

    ``watch`` blocks for the life of the process. The driver calls it in a concurrency group of its own (Ray
    starts these classes with ``concurrency_groups={"watch": 1}``), beside the calls that do the work, so the call
    fails the moment the process dies, whether it was busy or idle.
    """

    def watch(self) -> None:
        threading.Event().wait()

    def pid(self) -> int:
        return os.getpid()


class RolloutActor(Watched):
    """Steps ``envs_per_actor`` environments with best-of-N acting from the newest weights it was handed.

    ``run`` returns the fragment (its transitions go to the replay actor as a value the driver owns, so a dead actor
    takes no stored data with it) and a small summary the driver reads (episode returns, policy version, and the
    ``incarnation`` the driver started this process as: 0, then one more for each restart).
    """

    def __init__(self, env_config, algorithm_config, envs_per_actor: int, candidates: int, seed: int,
                 exploration_noise: float = 0.0, incarnation: int = 0, threads: int | None = 1):
        if threads is not None:  # None: sharing a process (serial mode), whose thread count stays
            torch.set_num_threads(threads)
        self.worker = RolloutWorker(lambda i: make_env(env_config), envs_per_actor, self._act, seed,
                                    exploration_noise)
        low, high = self.worker.action_space.low.reshape(-1), self.worker.action_space.high.reshape(-1)
        self.algorithm = make_algorithm(algorithm_config, self.worker.obs_dim, low, high, "cpu")
        self.candidates = candidates
        self.incarnation = incarnation
        torch.manual_seed(seed)

    def _act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        return self.algorithm.act(obs, explore, self.candidates)

    def spaces(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(obs_dim, action low, action high), flattened."""
        space = self.worker.action_space
        return self.worker.obs_dim, space.low.reshape(-1), space.high.reshape(-1)

    def set_weights(self, weights: Weights) -> None:
        version, state = weights
        self.algorithm.load_policy_weights(state)
        self.worker.policy_version = version

    def run(self, num_steps: int, random_actions: bool, weights: Weights | None = None
            ) -> tuple[Fragment, RunSummary]:
        """Loads ``weights`` when given (between fragments), then steps ``num_steps`` times per environment."""
        if weights is not None:
            self.set_weights(weights)
        fragment = self.worker.run(num_steps, random_actions=random_actions)
        return fragment, RunSummary(len(fragment), fragment.policy_version, fragment.episode_returns,
                                    fragment.episode_lengths, fragment.episode_infos, self.incarnation)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class ReplayActor:
    """The replay buffer behind a samples-per-insert rate limiter (Reverb's SampleToInsertRatio).

    Inserts count transitions and samples count updates, so ``updates_per_step`` holds whatever the number of
    actors: ``sample`` answers ``None`` while the learner is ahead (it waits), and the driver holds actors back while
    ``insert_allowance`` is too small. The actor starts from the newest whole checkpoint set under ``checkpoints``
    (softflow/checkpoints.py) when there is one, so a replay actor that Ray restarts after a crash, or a resumed
    run, carries on from the last checkpoint.
    """

    REPLAY_FILE, LIMITER_FILE = "replay.npz", "limiter.json"

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, updates_per_step: float, min_size: int,
                 tolerance: float, seed: int, checkpoints_dir: str | None = None):
        self.limiter = SampleToInsertRatio(updates_per_step, min_size, tolerance)
        restore, _ = newest_set(Path(checkpoints_dir)) if checkpoints_dir else (None, [])
        if restore is not None:
            self.buffer = ReplayBuffer.load(restore / self.REPLAY_FILE)
            self.limiter.load_state_dict(json.loads((restore / self.LIMITER_FILE).read_text()))
        else:
            self.buffer = ReplayBuffer(capacity, obs_dim, act_dim, seed=seed)
        self._start = time.perf_counter()
        self._mark = (self._start, self.limiter.inserts, self.limiter.samples)

    def add(self, fragment: Fragment) -> ReplayStatus:
        self.buffer.add(fragment)
        self.limiter.insert(len(fragment))
        return self.status()

    def sample(self, num_batches: int, batch_size: int) -> dict[str, np.ndarray] | None:
        """``num_batches`` batches, or ``None`` when the rate limiter says the learner must wait for data."""
        if not self.limiter.can_sample(num_batches):
            return None
        self.limiter.sample(num_batches)
        return self.buffer.sample(num_batches, batch_size)

    def status(self) -> ReplayStatus:
        """Counters and rates since the last call, and the current insert allowance."""
        now = time.perf_counter()
        then, inserts, samples = self._mark
        elapsed = max(now - then, 1e-9)
        self._mark = (now, self.limiter.inserts, self.limiter.samples)
        return ReplayStatus(len(self.buffer), self.limiter.inserts, self.limiter.samples,
                            (self.limiter.inserts - inserts) / elapsed, (self.limiter.samples - samples) / elapsed,
                            self.limiter.insert_allowance())

    def save(self, staging: str) -> None:
        """Writes the buffer and the limiter's counters into the staging directory of a checkpoint set."""
        Path(staging).mkdir(parents=True, exist_ok=True)
        self.buffer.save(Path(staging) / self.REPLAY_FILE)
        (Path(staging) / self.LIMITER_FILE).write_text(json.dumps(self.limiter.state_dict()))

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class Evaluator(Watched):
    """Runs evaluation episodes with given weights in its own process, so training never stops for them.

    ``task_metrics(algorithm)`` adds the task's own figures to each evaluation (the LQR's distance to the soft
    optimum). A restarted evaluator keeps ``seed``: every evaluation runs on the same episode seeds."""

    def __init__(self, env_config, algorithm_config, obs_dim: int, low: np.ndarray, high: np.ndarray,
                 candidates: int, seed: int, threads: int | None = 1,
                 task_metrics: Callable[[Algorithm], dict[str, float]] | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.env = make_env(env_config)
        self.algorithm = make_algorithm(algorithm_config, obs_dim, low, high, "cpu")
        self.candidates = candidates
        self.seed = seed
        self.task_metrics = task_metrics

    def evaluate(self, weights: Weights, episodes: int) -> dict[str, float]:
        version, state = weights
        self.algorithm.load_policy_weights(state)
        result = evaluate_algorithm(self.env, self.algorithm, self.candidates, episodes, self.seed)
        if self.task_metrics is not None:
            result |= self.task_metrics(self.algorithm)
        return {**result, "eval/policy_version": version}
