"""The distributed runtime: rollout actors, a replay actor, a learner and an evaluator on Ray, driven from here.

Data flow (docs/architecture.md): each rollout actor returns a fragment and a summary; the driver owns the
fragment's object and
hands its reference to the replay actor, so transitions never pass through the driver and a dead actor takes no
stored data with it. The learner pulls batches from the replay actor (two requests in flight) and, every
``learner.publish_every`` updates, puts its weights into the object store once; the driver passes the newest
reference to each actor with its next fragment request, so acting never waits for weights. The replay actor's rate
limiter holds ``replay.updates_per_step``: the learner waits when it is ahead, and the driver holds actors back when
they are. Actors that die are restarted by Ray (``max_restarts``) and rejoin with the current weights. A replay
actor that dies is restarted from its last save (every checkpoint); the transitions inserted since then are lost and
counted (``replay/lost_transitions``). A learner that dies stops the run (:class:`LearnerDied`); ``--resume``
continues it from the last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from softflow.actors.evaluate import episode_info_means
from softflow.actors.rate_limiter import SampleToInsertRatio
from softflow.actors.remote import Evaluator, ReplayActor, RolloutActor
from softflow.algorithms import make_algorithm
from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, checkpoint_meta
from softflow.deploy.placement import Topology, learner_gpus
from softflow.deploy.reports import needs_task_report, task_report
from softflow.learner.remote import SAMPLE_REQUESTS_IN_FLIGHT, LearnerActor

RUNS_IN_FLIGHT_PER_ACTOR = 2
WAIT_TIMEOUT_S = 0.05
ACTOR_ERRORS = (RayActorError, ActorUnavailableError)


class LearnerDied(RunStopped):
    """The learner process is gone; the run stops and can be resumed from its last checkpoint. The message says
    how."""


@dataclass
class Counters:
    """What the driver counts; saved in every checkpoint so that ``--resume`` continues them."""

    env_steps: int = 0
    updates: int = 0
    restarts: int = 0
    lost_transitions: int = 0
    next_log: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0


@dataclass
class ActorSlot:
    """One rollout actor as the driver sees it: its handle, runs in flight, and the weight version it holds."""

    handle: Any
    epoch: int = 0
    version: int = -1
    runs: dict = field(default_factory=dict)  # summary ref -> (fragment ref, epoch, transitions)


def ratio_tolerance(config: ExperimentConfig) -> float:
    """``replay.ratio_tolerance``, checked against deadlock, or by default room for every actor's in-flight runs
    on the insert side and every in-flight sample request on the learner's side (at least the deadlock-free
    minimum of :meth:`SampleToInsertRatio.min_error_buffer`)."""
    c = config
    insert_chunk = c.actors.fragment_length * c.actors.envs_per_actor
    minimum = SampleToInsertRatio.min_error_buffer(c.replay.updates_per_step, c.learner.learning_starts,
                                                   insert_chunk, c.learner.batches_per_request)
    if c.replay.ratio_tolerance is not None:
        try:
            SampleToInsertRatio(c.replay.updates_per_step, c.learner.learning_starts,
                                c.replay.ratio_tolerance).check_chunks(insert_chunk, c.learner.batches_per_request)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return c.replay.ratio_tolerance
    runs = c.actors.count * RUNS_IN_FLIGHT_PER_ACTOR
    return max(minimum, runs * insert_chunk * c.replay.updates_per_step
               + SAMPLE_REQUESTS_IN_FLIGHT * c.learner.batches_per_request)


class Runtime:
    """Builds the actors of one run and drives them until the env-step budget is spent."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, resume: bool = False):
        self.config = config
        self.run_dir = run_dir
        self.checkpoint_path = run_dir / "checkpoints" / "latest.pt"
        self.counters = Counters(next_log=config.log_every_steps, next_eval=config.eval.every_steps,
                                 next_checkpoint=config.learner.checkpoint_every)
        gpus = learner_gpus(config)
        self.topology = Topology(config, gpus)
        c = config
        self.slots = [ActorSlot(ray.remote(RolloutActor).options(
            num_cpus=c.actors.num_cpus, resources=c.actors.resources, max_restarts=-1, max_task_retries=0,
            **self.topology.actor(i)).remote(
            c.env, c.algorithm, c.actors.envs_per_actor, c.actors.candidates, c.seed + 1000 * i,
            c.actors.exploration_noise))
            for i in range(c.actors.count)]
        self.obs_dim, self.low, self.high = ray.get(self.slots[0].handle.spaces.remote())
        act_dim = len(self.low)
        tolerance = ratio_tolerance(c)
        self.replay = ray.remote(ReplayActor).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                      **self.topology.learner()).remote(
            c.replay.capacity, self.obs_dim, act_dim, c.replay.updates_per_step, c.learner.learning_starts,
            tolerance, c.seed, str(run_dir / "checkpoints" / "replay.npz"))
        self.learner = ray.remote(LearnerActor).options(num_cpus=c.learner.num_cpus, num_gpus=gpus,
                                                        resources=c.learner.resources, max_restarts=0,
                                                        **self.topology.learner()).remote(
            c.algorithm, self.obs_dim, self.low, self.high, gpus, self.replay, c.algorithm.batch_size,
            c.learner.batches_per_request, c.seed, checkpoint_meta(c, self.obs_dim, self.low, self.high),
            str(self.checkpoint_path) if resume else None, c.learner.num_cpus, c.learner.compile)
        self.evaluator = ray.remote(Evaluator).options(num_cpus=0, **self.topology.learner()).remote(
            c.env, c.algorithm, self.obs_dim, self.low, self.high, c.actors.candidates, c.seed + 10_000)
        described = ray.get(self.learner.describe.remote())
        self.device = described["device"]
        if resume:
            self.counters = Counters(**described["driver"])
        self.weights = ray.get(self.learner.publish.remote())
        self.status = ray.get(self.replay.status.remote())
        self.counters.env_steps = int(self.status["replay/inserts"])

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, report: Callable[[int, dict[str, float]], None]) -> dict[str, Any]:
        """Drives the run to ``total_env_steps``; ``report(env_steps, metrics)`` gets each metrics record."""
        c, n = self.config, self.counters
        chunk = c.actors.fragment_length * c.actors.envs_per_actor
        pending = 0  # transitions of runs submitted but not yet in the replay buffer
        adds: dict = {}  # add ref -> transitions
        learner_task = self._train_learner()
        eval_task, status_task = None, None
        window = Window()
        while n.env_steps < c.total_env_steps:
            for slot in self.slots:
                while (len(slot.runs) < RUNS_IN_FLIGHT_PER_ACTOR and n.env_steps + pending < c.total_env_steps
                       and self.status["insert_allowance"] - pending >= chunk):
                    random_actions = n.env_steps + pending < c.learner.learning_starts
                    self._submit(slot, random_actions)
                    pending += chunk
            if not adds and all(not s.runs for s in self.slots) and status_task is None:
                status_task = self.replay.status.remote()
            if eval_task is None and c.eval.episodes and n.env_steps >= n.next_eval:
                eval_task = self.evaluator.evaluate.remote(self.weights[1], c.eval.episodes)
                n.next_eval += c.eval.every_steps
            waiting = [learner_task, *adds, *(r for s in self.slots for r in s.runs)]
            waiting += [t for t in (eval_task, status_task) if t is not None]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_TIMEOUT_S)
            for ref in ready:
                if ref is learner_task:
                    window.learner(self._learner_result(learner_task))
                    learner_task = self._train_learner()
                elif ref is eval_task:
                    window.metrics |= ray.get(eval_task)
                    eval_task = None
                elif ref is status_task:
                    self.status = ray.get(status_task)
                    status_task = None
                elif ref in adds:
                    self.status = ray.get(ref)
                    transitions = adds.pop(ref)
                    pending -= transitions
                    n.env_steps += transitions
                else:
                    pending -= self._run_finished(ref, adds, window)
            if n.updates >= n.next_checkpoint:
                self.checkpoint()
                n.next_checkpoint += c.learner.checkpoint_every
            if n.env_steps >= n.next_log or n.env_steps >= c.total_env_steps:
                report(n.env_steps, window.report(self.weights[0], self.status, n))
                window = Window()
                n.next_log += c.log_every_steps
        self._learner_result(learner_task)
        self.checkpoint()
        return self.finish()

    def _submit(self, slot: ActorSlot, random_actions: bool) -> None:
        weights = None if slot.version == self.weights[0] else self.weights[1]
        slot.version = self.weights[0]
        chunk = self.config.actors.fragment_length * self.config.actors.envs_per_actor
        fragment_ref, summary_ref = slot.handle.run.options(num_returns=2).remote(
            self.config.actors.fragment_length, random_actions, weights)
        slot.runs[summary_ref] = (fragment_ref, slot.epoch, chunk)

    def _run_finished(self, summary_ref, adds: dict, window: Window) -> int:
        """Forwards a finished run's fragment to the replay actor, or counts its loss if the actor died; returns
        the transitions that are no longer pending in the driver's own accounting (lost ones)."""
        slot = next(s for s in self.slots if summary_ref in s.runs)
        fragment_ref, epoch, transitions = slot.runs.pop(summary_ref)
        try:
            summary = ray.get(summary_ref)
        except ACTOR_ERRORS:
            if epoch == slot.epoch:  # the first failed run of this incarnation: one restart
                self.counters.restarts += 1
                slot.epoch += 1
                slot.version = -1  # the restarted process has fresh weights: send the current ones
            self.counters.lost_transitions += transitions
            return transitions
        adds[self.replay.add.remote(fragment_ref)] = transitions
        window.fragment(summary, self.weights[0])
        return 0

    def _train_learner(self):
        progress = self.counters.env_steps / self.config.total_env_steps
        return self.learner.train.remote(self.config.learner.publish_every, progress)

    def _learner_result(self, task) -> dict[str, Any]:
        try:
            result = ray.get(task)
        except ACTOR_ERRORS as exc:
            raise LearnerDied(f"the learner process died ({type(exc).__name__}); the run stopped at "
                              f"{self.counters.env_steps} env steps. Continue it with: softflow train --resume "
                              f"{self.run_dir}") from None
        self.counters.updates += result["updates"]
        if result["weights"] is not None:
            self.weights = result["weights"]
        return result

    def checkpoint(self) -> None:
        """The learner writes networks, optimisers and the driver's counters; the replay actor its buffer."""
        ray.get([self.learner.save_checkpoint.remote(str(self.checkpoint_path), asdict(self.counters)),
                 self.replay.save.remote()])

    def finish(self) -> dict[str, Any]:
        c = self.config
        summary: dict[str, Any] = {"env_steps": self.counters.env_steps, "updates": self.counters.updates,
                                   "actors/restarts": self.counters.restarts,
                                   "actors/lost_transitions": self.counters.lost_transitions,
                                   "replay/lost_transitions": self.counters.env_steps - self.status["replay/inserts"],
                                   "learner/device": self.device}
        if c.eval.episodes:
            summary |= ray.get(self.evaluator.evaluate.remote(self.weights[1], c.eval.episodes))
        summary["placement"] = self.placement()
        if needs_task_report(c):
            algorithm = make_algorithm(c.algorithm, self.obs_dim, self.low, self.high, "cpu")
            algorithm.load_policy_weights(ray.get(self.weights[1])[1])
            summary |= task_report(algorithm, c, self.run_dir)
        return summary

    def close(self) -> None:
        """Releases the run's placement group (its actors end with it)."""
        self.topology.remove()

    def placement(self) -> dict[str, Any]:
        """The Ray node of the learner, the replay actor and each rollout actor."""
        return {"learner": ray.get(self.learner.node_id.remote()), "replay": ray.get(self.replay.node_id.remote()),
                "actors": ray.get([s.handle.node_id.remote() for s in self.slots])}

    def actor_pids(self) -> list[int]:
        return ray.get([s.handle.pid.remote() for s in self.slots])


class Window:
    """What happened since the last report: episode returns, policy lag, learner metrics and throughput."""

    def __init__(self):
        self.start = time.perf_counter()
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.infos: list[dict] = []
        self.lags: list[int] = []
        self.metrics: dict[str, float] = {}
        self.updates = 0
        self.transitions = 0

    def fragment(self, summary: dict[str, Any], latest_version: int) -> None:
        self.returns += summary["episode_returns"]
        self.lengths += summary["episode_lengths"]
        self.infos += summary["episode_infos"]
        self.lags.append(latest_version - summary["policy_version"])
        self.transitions += summary["transitions"]

    def learner(self, result: dict[str, Any]) -> None:
        self.metrics |= result["metrics"]
        self.updates += result["updates"]

    def report(self, version: int, status: dict[str, float], counters: Counters) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        report = dict(self.metrics)
        if self.returns:
            report |= {"train/episode_return": float(np.mean(self.returns)),
                       "train/episode_length": float(np.mean(self.lengths))}
        report |= episode_info_means(self.infos, "train")
        report |= {"learner/updates": counters.updates, "learner/updates_per_s": self.updates / elapsed,
                   "actors/env_steps_per_s": self.transitions / elapsed, "actors/restarts": counters.restarts,
                   "actors/lost_transitions": counters.lost_transitions, "weights/version": version,
                   **({"weights/version_lag": float(np.mean(self.lags))} if self.lags else {}),
                   **{k: v for k, v in status.items() if k.startswith("replay/")},
                   "replay/lost_transitions": counters.env_steps - status["replay/inserts"]}
        return report
