"""The learner process: pulls batches from the replay actor, updates, and publishes weights.

``LearnerActor`` wraps the plain :class:`~softflow.learner.learner.Learner` (Sample Factory's split): the driver
calls ``train`` again and again; each call runs up to ``publish_every`` updates, then publishes the weights with one
``ray.put`` and returns metrics and the ``(version, reference)`` pair the driver hands to the actors.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from softflow import checkpoints
from softflow.algorithms import make_algorithm
from softflow.learner.learner import Learner, learner_device

SAMPLE_REQUESTS_IN_FLIGHT = 2
WAIT_POLL_S = 0.002


class RemoteReplay:
    """Batches from the replay actor through Ray, ``SAMPLE_REQUESTS_IN_FLIGHT`` requests ahead of the learner.
    The replay actor answers ``None`` while its rate limiter holds the learner back; then this polls."""

    def __init__(self, replay, batches_per_request: int, batch_size: int):
        self.replay = replay
        self.batches_per_request = batches_per_request
        self.batch_size = batch_size
        self.requests: deque = deque()
        self.wait_s = 0.0

    def next_batches(self, deadline: float) -> dict[str, np.ndarray] | None:
        """The next batches, keeping requests in flight; None if none came by ``deadline``."""
        while True:
            while len(self.requests) < SAMPLE_REQUESTS_IN_FLIGHT:
                self.requests.append(self.replay.sample.remote(self.batches_per_request, self.batch_size))
            start = time.perf_counter()
            batches = ray.get(self.requests.popleft())
            if batches is not None:
                return batches
            time.sleep(WAIT_POLL_S)
            self.wait_s += time.perf_counter() - start
            if time.perf_counter() > deadline:
                return None


class LocalReplay:
    """Batches from a replay actor in this process (serial mode): as many as the rate limiter allows, up to
    ``batches_per_request``, and ``None`` at once when it allows none, since nothing can insert while the learner
    waits."""

    def __init__(self, replay, batches_per_request: int, batch_size: int):
        self.replay = replay
        self.batches_per_request = batches_per_request
        self.batch_size = batch_size
        self.wait_s = 0.0

    def next_batches(self, deadline: float) -> dict[str, np.ndarray] | None:
        allowed = min(self.batches_per_request, self.replay.limiter.sample_allowance())
        return self.replay.sample(allowed, self.batch_size) if allowed else None


@dataclass(frozen=True)
class Published:
    """Weights the learner has shared: their version and where they are (an object reference on Ray, whose
    holder Ray does not resolve when it is passed inside this object)."""

    version: int
    reference: Any


@dataclass(frozen=True)
class TrainResult:
    """One ``LearnerActor.train`` call: the updates made, their mean metrics, and the weights published after."""

    updates: int
    seconds: float
    metrics: dict[str, float]
    weights: Published | None


class LearnerActor:
    """The learner loop of the runtime, fed by ``replay`` (a :class:`RemoteReplay` or :class:`LocalReplay`).
    ``threads``: torch's thread count in this process (None leaves it, when the process is shared); ``share``
    puts the published weights where the actors can read them (``ray.put``, or nothing in one process)."""

    def __init__(self, algorithm_config, obs_dim: int, low: np.ndarray, high: np.ndarray,
                 replay: RemoteReplay | LocalReplay, seed: int, meta: dict[str, Any], checkpoint: str | None = None,
                 compile_mode: str = "none", *, num_gpus: float | str, threads: int | None,
                 share: Callable[[Any], Any]):
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = learner_device(num_gpus)
        self.algorithm = make_algorithm(algorithm_config, obs_dim, low, high, self.device)
        self.learner = Learner(self.algorithm, self.device, compile_mode)
        self.replay = replay
        self.share = share
        self.version = 0
        self.meta = meta
        self.extra: dict[str, Any] = {}
        if checkpoint is not None:
            state = checkpoints.load(Path(checkpoint), self.device)
            self.algorithm.load_state_dict(state["algorithm"])
            self.learner.num_updates = state["updates"]
            self.version = state["version"]
            self.extra = state["driver"]
            torch.set_rng_state(state["torch_rng"])

    def describe(self) -> dict[str, Any]:
        """Where the learner runs (device, torch threads), and the driver's counters restored from a checkpoint."""
        name = str(self.device) if self.device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(self.device)})"
        return {"device": name, "threads": torch.get_num_threads(), "updates": self.learner.num_updates,
                "version": self.version, "driver": self.extra}

    def publish(self) -> Published:
        """The weights actors need, shared once."""
        self.version += 1
        return Published(self.version, self.share((self.version, self.algorithm.policy_weights())))

    def train(self, max_updates: int, progress: float, max_seconds: float = 1.0) -> TrainResult:
        """Up to ``max_updates`` updates (fewer if the rate limiter holds the learner for ``max_seconds``), then one
        weight publication. ``progress`` (0..1 of the env-step budget) drives learning-rate schedules."""
        self.algorithm.set_progress(progress)
        start = time.perf_counter()
        self.replay.wait_s = 0.0
        done, totals = 0, {}
        while done < max_updates:
            batches = self.replay.next_batches(start + max_seconds)
            if batches is None:
                break
            metrics = self.learner.update(batches)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * len(batches["rewards"])
            done += len(batches["rewards"])
        elapsed = max(time.perf_counter() - start, 1e-9)
        metrics = {key: value / done for key, value in totals.items()} if done else {}
        metrics |= {"learner/updates": self.learner.num_updates, "learner/wait_fraction": self.replay.wait_s / elapsed}
        return TrainResult(done, elapsed, metrics, self.publish() if done else None)

    def save_checkpoint(self, staging: str, driver_state: dict[str, Any]) -> None:
        """Writes ``learner.pt`` into the staging directory of a checkpoint set (softflow/checkpoints.py):
        networks, optimisers, alpha, counters, the torch RNG state, the driver's counters and ``meta`` (the config
        and the spaces, so that the file alone loads as a policy)."""
        Path(staging).mkdir(parents=True, exist_ok=True)
        torch.save({**self.meta, "algorithm": self.algorithm.state_dict(), "updates": self.learner.num_updates,
                    "version": self.version, "driver": driver_state, "torch_rng": torch.get_rng_state()},
                   Path(staging) / checkpoints.LEARNER_FILE)

    def commit_checkpoint(self, staging: str, env_steps: int, keep: int) -> str:
        """Seals the staging directory as the set of ``env_steps`` (run beside the replay actor, on the node whose
        disk holds both files); returns the set's path."""
        return str(checkpoints.commit_set(Path(staging), env_steps, self.learner.num_updates, keep))

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
