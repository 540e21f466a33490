"""The training loop: rollout actors, a replay actor, a learner and an evaluator, driven from here.

One loop for both layouts of processes.py: on Ray (each part its own process, calls concurrent) and in this process
(serial mode, ``actors.count: 0``: each call runs when it is made). The rate limiter, checkpoints, metrics, task
reports and ``--resume`` are therefore the same in both.

Data flow (docs/architecture.md): each rollout actor returns a fragment and a summary; the driver owns the
fragment's object and hands its reference to the replay actor, so transitions never pass through the driver and a
dead actor takes no stored data with it. The learner pulls batches from the replay actor (two requests in flight)
and, every ``learner.publish_every`` updates, puts its weights into the object store once; the driver passes the newest
reference to each actor with its next fragment request, so acting never waits for weights. The replay actor's rate
limiter holds ``replay.updates_per_step``: the learner waits when it is ahead, and the driver holds actors back when
they are. Rollout actors and the evaluator that die are restarted by the driver (supervision.py), each death
counted once (``actors/restarts``, ``eval/restarts``) and the transitions of the runs a dead actor had not delivered
counted (``actors/lost_transitions``); a restarted actor rejoins with a fresh seed and the current weights. A replay
actor that dies is restarted by Ray from its last save (every checkpoint); the transitions inserted since then are
lost and counted (``replay/lost_transitions``). A learner that dies stops the run (:class:`LearnerDied`); ``--resume``
continues it from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from softflow import checkpoints
from softflow.actors.envs import LQREnvConfig
from softflow.actors.evaluate import episode_info_means
from softflow.actors.rate_limiter import SampleToInsertRatio
from softflow.actors.remote import ReplayStatus, RunSummary
from softflow.actors.rollout import EnvError
from softflow.algorithms import Algorithm, make_algorithm
from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, checkpoint_meta
from softflow.deploy.run.processes import LocalProcesses, RayProcesses
from softflow.deploy.run.reports import lqr_report, needs_task_report, task_report
from softflow.deploy.run.supervision import Supervised, Supervisor, actor_seed
from softflow.learner.remote import SAMPLE_REQUESTS_IN_FLIGHT, TrainResult

WAIT_TIMEOUT_S = 0.05


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
    evaluator_restarts: int = 0
    next_log: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0


def ratio_tolerance(config: ExperimentConfig) -> float:
    """``replay.ratio_tolerance``, checked against deadlock, or by default room for every actor's in-flight runs
    on the insert side and every in-flight sample request on the learner's side (at least the deadlock-free
    minimum of :meth:`SampleToInsertRatio.min_error_buffer`). Serial mode needs only that minimum, for samples of
    one batch (:class:`~softflow.learner.remote.LocalReplay`), so it holds the ratio to within one update."""
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
    if c.actors.count == 0:  # serial mode: nothing runs concurrently and the learner takes what the limiter allows
        return SampleToInsertRatio.min_error_buffer(c.replay.updates_per_step, c.learner.learning_starts,
                                                    insert_chunk, 1)
    runs = c.actors.count * RayProcesses.runs_in_flight
    return max(minimum, runs * insert_chunk * c.replay.updates_per_step
               + SAMPLE_REQUESTS_IN_FLIGHT * c.learner.batches_per_request)


def lqr_distance(env: LQREnvConfig, gamma: float, seed: int, algorithm: Algorithm) -> dict[str, float]:
    """The learned policy's distance to the soft LQR optimum, for every evaluation (a cheaper fit than the final
    report's lqr.json: 512 states, 16 samples each)."""
    fit = lqr_report(algorithm, env, gamma, 512, 16, seed)
    return {"eval/lqr_rel_err_K": fit["rel_err_K"], "eval/lqr_rel_err_Sigma": fit["rel_err_Sigma"]}


def evaluation_task_metrics(config: ExperimentConfig) -> Callable[[Algorithm], dict[str, float]] | None:
    """What the evaluator adds to each evaluation for this experiment's task (the LQR's distance), or None."""
    if isinstance(config.env, LQREnvConfig):
        return partial(lqr_distance, config.env, config.algorithm.gamma, config.seed)
    return None


class Runtime:
    """Builds the actors of one run and drives them until the env-step budget is spent."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, resume: bool = False,
                 processes: RayProcesses | LocalProcesses | None = None):
        self.config = config
        self.run_dir = run_dir
        self.checkpoints = run_dir / "checkpoints"
        restore = None
        if resume:
            restore, skipped = checkpoints.newest_set(self.checkpoints)
            for line in skipped:
                print(f"softflow: warning: {line}; resuming from an earlier one", file=sys.stderr)
            if restore is None:
                raise ConfigError(f"--resume {run_dir}: no whole checkpoint set in {self.checkpoints}; the run cannot "
                                  f"be continued, start it afresh in a new directory")
        self.counters = Counters(next_log=config.log_every_steps, next_eval=config.eval.every_steps,
                                 next_checkpoint=config.learner.checkpoint_every)
        self.evaluation: tuple | None = None  # (the evaluation in flight, the evaluator's incarnation running it)
        self.processes = processes or (RayProcesses(config) if config.actors.count > 0 else LocalProcesses(config))
        try:
            self._start(resume, restore)
        except BaseException:
            self.processes.close()
            raise

    def _start(self, resume: bool, restore: Path | None) -> None:
        c, p = self.config, self.processes
        self.supervisor = Supervisor(p, c.actors.max_restarts, self._stopped_at)
        self.slots = [self.supervisor.start(f"rollout actor {i}", partial(self._rollout_actor, i))
                      for i in range(p.rollout_actors)]
        self.obs_dim, self.low, self.high = self._call(self.slots[0], "spaces")
        self.replay = p.replay(c.replay.capacity, self.obs_dim, len(self.low), c.replay.updates_per_step,
                               c.learner.learning_starts, ratio_tolerance(c), c.seed,
                               str(self.checkpoints))
        self.learner = p.learner(c.algorithm, self.obs_dim, self.low, self.high,
                                 p.replay_client(self.replay, c.learner.batches_per_request, c.algorithm.batch_size),
                                 c.seed, checkpoint_meta(c, self.obs_dim, self.low, self.high),
                                 str(restore / checkpoints.LEARNER_FILE) if restore else None, c.learner.compile)
        self.evaluator = self.supervisor.start("the evaluator", lambda incarnation: p.evaluator(
            c.env, c.algorithm, self.obs_dim, self.low, self.high, c.actors.candidates, c.seed + 10_000,
            task_metrics=evaluation_task_metrics(c)), rollout=False)
        described = p.get(self.learner.describe.remote())
        self.device = described["device"]
        if resume:
            restarted = self.counters.restarts  # rollout actors that died before the spaces came
            self.counters = Counters(**described["driver"])
            self.counters.restarts += restarted
        self.weights = p.get(self.learner.publish.remote())
        self.status = p.get(self.replay.status.remote())
        self.learner_rate: float | None = None  # updates per second of the learner's work, from its last call
        self.counters.env_steps = self.status.inserts

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, report: Callable[[int, dict[str, float]], None],
            stop_requested: Callable[[], str | None] = lambda: None) -> dict[str, Any]:
        """Drives the run to ``total_env_steps``; ``report(env_steps, metrics)`` gets each metrics record. When
        ``stop_requested()`` names a reason (a signal), the run stops at the next step with a checkpoint and
        :class:`RunStopped`."""
        c, n = self.config, self.counters
        chunk = c.actors.fragment_length * c.actors.envs_per_actor
        pending = 0  # transitions of runs submitted but not yet in the replay buffer
        adds: dict = {}  # add ref -> transitions
        learner_task = self._train_learner()
        status_task, status_due = None, 0.0  # a replay status call in flight; when the next may go
        window = Window()
        while n.env_steps < c.total_env_steps:
            if stop_requested():
                self._stop(stop_requested(), learner_task, adds)
            for member, incarnation, exc in self.supervisor.deaths():  # before any run goes to a dead actor
                self._died(member, incarnation, exc)
            for slot in self.slots:
                while (len(slot.runs) < self.processes.runs_in_flight and n.env_steps + pending < c.total_env_steps
                       and self.status.insert_allowance - pending >= chunk):
                    random_actions = n.env_steps + pending < c.learner.learning_starts
                    self._submit(slot, random_actions)
                    pending += chunk
            timeout = WAIT_TIMEOUT_S
            if not adds and all(not s.runs for s in self.slots) and status_task is None:  # all held back: poll
                now = time.perf_counter()
                if now >= status_due:
                    status_task = self.replay.status.remote()
                else:
                    timeout = min(timeout, status_due - now)
            eval_task = self.evaluation[0] if self.evaluation else None
            waiting = [learner_task, *adds, *(r for s in self.slots for r in s.runs)]
            waiting += [t for t in (eval_task, status_task) if t is not None]
            ready = self.processes.wait(waiting, timeout)
            for ref in ready:
                if ref is learner_task:
                    window.learner(self._learner_result(learner_task))
                    learner_task = self._train_learner()
                elif ref is eval_task:
                    window.metrics |= self._evaluation_result()
                elif ref is status_task:
                    self.status = self.processes.get(status_task)
                    status_task, status_due = None, time.perf_counter() + self._next_status_in(pending, chunk)
                elif ref in adds:
                    self.status = self.processes.get(ref)
                    transitions = adds.pop(ref)
                    pending -= transitions
                    n.env_steps += transitions
                else:
                    pending -= self._run_finished(ref, adds, window)
            if self.evaluation is None and c.eval.episodes and n.env_steps >= n.next_eval:
                self.evaluation = (self.evaluator.handle.evaluate.remote(self.weights.reference, c.eval.episodes),
                                   self.evaluator.incarnation)
                n.next_eval += c.eval.every_steps
            if n.updates >= n.next_checkpoint:
                self.checkpoint()
                n.next_checkpoint += c.learner.checkpoint_every
            if n.env_steps >= n.next_log or n.env_steps >= c.total_env_steps:
                if self.evaluation and self.processes.wait([self.evaluation[0]], 0):  # a finished one joins
                    window.metrics |= self._evaluation_result()
                report(n.env_steps, window.report(self.weights.version, self.status, n))
                window = Window()
                n.next_log += c.log_every_steps
        self._learner_result(learner_task)
        self.checkpoint()
        return self.finish()

    def _stop(self, reason: str, learner_task, adds: dict) -> None:
        """Stops the run where it is: the transitions on their way into the replay actor are counted, the learner's
        call finishes, and a checkpoint is written; runs still in flight are dropped (they were never counted)."""
        for ref, transitions in adds.items():
            self.status = self.processes.get(ref)
            self.counters.env_steps += transitions
        self._learner_result(learner_task)
        self.checkpoint()
        raise RunStopped(f"stopped by {reason} at {self.counters.env_steps} env steps with a checkpoint. Continue "
                         f"it with: softflow train --resume {self.run_dir}")

    def _submit(self, slot: Supervised, random_actions: bool) -> None:
        weights = None if slot.version == self.weights.version else self.weights.reference
        slot.version = self.weights.version
        chunk = self.config.actors.fragment_length * self.config.actors.envs_per_actor
        fragment_ref, summary_ref = slot.handle.run.options(num_returns=2).remote(
            self.config.actors.fragment_length, random_actions, weights)
        slot.runs[summary_ref] = (fragment_ref, slot.incarnation, chunk)

    def _run_finished(self, summary_ref, adds: dict, window: Window) -> int:
        """Forwards a finished run's fragment to the replay actor, or, when its actor died first, counts the run's
        transitions as lost (and the death, if it is news); returns the transitions that are no longer pending in the
        driver's own accounting (lost ones)."""
        slot = next(s for s in self.slots if summary_ref in s.runs)
        fragment_ref, incarnation, transitions = slot.runs.pop(summary_ref)
        try:
            summary = self.processes.get(summary_ref)
        except self.processes.errors as exc:
            self._died(slot, incarnation, exc)
            self.counters.lost_transitions += transitions
            return transitions
        except EnvError:  # the run stops; its fragment's error is read too, so Ray reports no unhandled one
            with contextlib.suppress(EnvError):
                self.processes.get(fragment_ref)
            raise
        adds[self.replay.add.remote(fragment_ref)] = transitions
        window.fragment(summary, self.weights.version)
        return 0

    def _rollout_actor(self, index: int, incarnation: int):
        c = self.config
        return self.processes.rollout_actor(index, c.env, c.algorithm, c.actors.envs_per_actor, c.actors.candidates,
                                            actor_seed(c.seed, index, incarnation), c.actors.exploration_noise,
                                            incarnation=incarnation)

    def _died(self, member: Supervised, incarnation: int, exc: BaseException) -> None:
        """Restarts a rollout actor or the evaluator whose ``incarnation`` died and counts the death, once however
        many signals it sends (supervision.py)."""
        if self.supervisor.died(member, incarnation, exc):
            if member.rollout:
                self.counters.restarts += 1
            else:
                self.counters.evaluator_restarts += 1

    def _call(self, member: Supervised, method: str, *args: Any) -> Any:
        """``member.method(*args)``, called again on the restarted process when the process dies in it."""
        while True:
            incarnation = member.incarnation
            try:
                return self.processes.get(getattr(member.handle, method).remote(*args))
            except self.processes.errors as exc:
                self._died(member, incarnation, exc)

    def _evaluation_result(self) -> dict[str, float]:
        """The metrics of the evaluation in flight, which has finished; none when the evaluator died in it (it is
        restarted and the evaluation runs again)."""
        task, incarnation = self.evaluation
        self.evaluation = None
        try:
            return self.processes.get(task)
        except self.processes.errors as exc:
            self._died(self.evaluator, incarnation, exc)
            self.counters.next_eval -= self.config.eval.every_steps
            return {}

    def _stopped_at(self) -> str:
        """Where a run that cannot go on stopped, and whether it can be continued."""
        where = f"the run stopped at {self.counters.env_steps} env steps"
        if not any(self.checkpoints.glob(f"{checkpoints.SET_PREFIX}*")):
            return f"{where}, before its first checkpoint"
        return f"{where}, its checkpoints are kept. Continue it with: softflow train --resume {self.run_dir}"

    def _train_learner(self):
        progress = self.counters.env_steps / self.config.total_env_steps
        return self.learner.train.remote(self.config.learner.publish_every, progress)

    def _learner_result(self, task) -> TrainResult:
        try:
            result = self.processes.get(task)
        except self.processes.errors as exc:
            raise LearnerDied(f"the learner process died ({type(exc).__name__}); the run stopped at "
                              f"{self.counters.env_steps} env steps. Continue it with: softflow train --resume "
                              f"{self.run_dir}") from None
        self.counters.updates += result.updates
        busy_s = result.seconds * (1.0 - result.metrics["learner/wait_fraction"])  # every call reports it
        if result.updates and busy_s > 0:
            self.learner_rate = result.updates / busy_s
        if result.weights is not None:
            self.weights = result.weights
        return result

    def _next_status_in(self, pending: int, chunk: int) -> float:
        """Seconds until the next status call while every actor is held back: the updates the rate limiter wants
        before it accepts one more fragment, at the learner's last measured rate (updates per second of work, its
        waits left out), within ``[status_poll_s, status_wait_max_s]`` of the processes."""
        p = self.processes
        missing = chunk - (self.status.insert_allowance - pending)  # transitions
        if missing <= 0 or self.learner_rate is None:
            return p.status_poll_s
        return min(max(missing * self.config.replay.updates_per_step / self.learner_rate, p.status_poll_s),
                   p.status_wait_max_s)

    def checkpoint(self) -> None:
        """One consistent checkpoint set (softflow/checkpoints.py): the learner writes its state and the driver's
        counters, the replay actor its buffer and limiter, into one staging directory, which the learner then seals
        and switches in. A write that fails (a full disk) stops the run with one line; the sets before it stay."""
        staging = checkpoints.staging_path(self.checkpoints, self.counters.env_steps)
        try:
            self.processes.get([self.learner.save_checkpoint.remote(str(staging), asdict(self.counters)),
                                self.replay.save.remote(str(staging))])
            self.processes.get(self.learner.commit_checkpoint.remote(str(staging), self.counters.env_steps,
                                                                     self.config.learner.keep_checkpoints))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            cause = getattr(exc, "cause", exc)  # through Ray, the writer's own OSError
            raise RunStopped(f"could not write a checkpoint into {self.checkpoints} ({cause.strerror or cause}); the "
                             f"earlier checkpoints are intact. Free space, then continue with: softflow train "
                             f"--resume {self.run_dir}") from None

    def finish(self) -> dict[str, Any]:
        c = self.config
        for member, incarnation, exc in self.supervisor.deaths():
            self._died(member, incarnation, exc)
        evaluation = self._call(self.evaluator, "evaluate", self.weights.reference, c.eval.episodes) \
            if c.eval.episodes else {}
        summary: dict[str, Any] = {"env_steps": self.counters.env_steps, "updates": self.counters.updates,
                                   "actors/restarts": self.counters.restarts,
                                   "actors/lost_transitions": self.counters.lost_transitions,
                                   "eval/restarts": self.counters.evaluator_restarts,
                                   "replay/lost_transitions": self.counters.env_steps - self.status.inserts,
                                   "learner/device": self.device, **evaluation}
        summary["placement"] = self.processes.placement(self.learner, self.replay, [s.handle for s in self.slots])
        if needs_task_report(c):
            algorithm = make_algorithm(c.algorithm, self.obs_dim, self.low, self.high, "cpu")
            algorithm.load_policy_weights(self.processes.get(self.weights.reference)[1])
            summary |= task_report(algorithm, c, self.run_dir)
        return summary

    def close(self) -> None:
        """Releases the run's placement group (its actors end with it)."""
        self.processes.close()

    def actor_pids(self) -> list[int]:
        return self.processes.get([s.handle.pid.remote() for s in self.slots])

    def evaluator_pid(self) -> int:
        return self.processes.get(self.evaluator.handle.pid.remote())


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

    def fragment(self, summary: RunSummary, latest_version: int) -> None:
        self.returns += summary.episode_returns
        self.lengths += summary.episode_lengths
        self.infos += summary.episode_infos
        self.lags.append(latest_version - summary.policy_version)
        self.transitions += summary.transitions

    def learner(self, result: TrainResult) -> None:
        self.metrics |= result.metrics
        self.updates += result.updates

    def report(self, version: int, status: ReplayStatus, counters: Counters) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        report = dict(self.metrics)
        if self.returns:
            report |= {"train/episode_return": float(np.mean(self.returns)),
                       "train/episode_length": float(np.mean(self.lengths))}
        report |= episode_info_means(self.infos, "train")
        report |= {"learner/updates": counters.updates, "learner/updates_per_s": self.updates / elapsed,
                   "actors/env_steps_per_s": self.transitions / elapsed, "actors/restarts": counters.restarts,
                   "actors/lost_transitions": counters.lost_transitions, "eval/restarts": counters.evaluator_restarts,
                   "weights/version": version,
                   **({"weights/version_lag": float(np.mean(self.lags))} if self.lags else {}),
                   **status.metrics(), "replay/lost_transitions": counters.env_steps - status.inserts}
        return report
