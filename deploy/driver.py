"""The run driver: the run directory, metrics and progress display around one of two ways to train.

``actors.count >= 1`` runs the distributed runtime on Ray (``deploy/runtime.py``): rollout actors, a replay actor,
a learner and an evaluator. ``actors.count: 0`` is serial mode, the same data flow with the process boundaries taken
out (Sample Factory's serial mode, RLlib's ``num_env_runners=0``): a RolloutWorker steps the environments, fragments
go into a ReplayBuffer, and the Learner makes ``replay.updates_per_step`` updates per environment step once
``learner.learning_starts`` steps of random actions are in. Both report through one callback to ``metrics.jsonl``,
W&B and the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softflow.actors.envs import LQREnvConfig, make_env
from softflow.actors.evaluate import episode_info_means, evaluate_algorithm
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker
from softflow.algorithms import make_algorithm
from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, checkpoint_meta, dump_config
from softflow.deploy.metrics import MetricsLogger
from softflow.deploy.progress import TrainingProgress, print_summary
from softflow.deploy.reports import lqr_report, task_report
from softflow.learner.learner import Learner, TrainingDiverged, learner_device, save_checkpoint


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


Report = Callable[[int, dict[str, float]], None]
CONNECT_TIMEOUT_S = 3.0


def train(config: ExperimentConfig, run_dir: Path, progress: bool = True, address: str | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Trains ``config``, writes the run directory (config.yaml, metrics.jsonl, checkpoints/, summary.json,
    learning_curve.png, W&B files, and the task reports of reports.py: lqr.json, multigoal.json and .png) and
    returns the summary."""
    if config.actors.count > 0:
        with ray_connection(address):
            return _train(config, run_dir, progress, resume, device=None)
    try:
        device = learner_device(config.learner.num_gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _train(config, run_dir, progress, resume, device)


def _train(config: ExperimentConfig, run_dir: Path, progress: bool, resume: bool,
           device: torch.device | None) -> dict[str, Any]:
    """The run directory, metrics and display around serial mode (``device`` given) or the Ray runtime."""
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    logger = MetricsLogger(run_dir, run_dir.name, config.model_dump(mode="json"), config.wandb, resume=resume)
    with TrainingProgress(config.total_env_steps, progress) as display:
        def report(env_steps: int, metrics: dict[str, float]) -> None:
            logger.log(env_steps, metrics)
            display.update(env_steps, metrics)

        try:
            if config.actors.count == 0:
                summary = train_serial(config, run_dir, device, report)
            else:
                summary = train_on_ray(config, run_dir, report, resume)
        except TrainingDiverged as exc:
            logger.abort()
            cause = getattr(exc, "cause", exc)  # through Ray, the learner's exception is the cause
            raise RunStopped(f"training diverged: {cause}; metrics up to here are in {run_dir}") from None
        except BaseException:
            logger.abort()
            raise
    logger.finish(summary)
    if progress:
        print_summary(summary)
    return summary


def train_on_ray(config: ExperimentConfig, run_dir: Path, report: Report, resume: bool) -> dict[str, Any]:
    """Runs the Ray runtime on the Ray this process is connected to."""
    from softflow.deploy.runtime import Runtime

    runtime = Runtime(config, run_dir, resume=resume)
    try:
        return runtime.run(report)
    finally:
        runtime.close()


@contextlib.contextmanager
def ray_connection(address: str | None):
    """Uses the Ray this process already has (a Tune trial, a test) or connects to ``address`` (or
    ``RAY_ADDRESS``; neither starts Ray on this machine) and shuts it down at the end. Connection problems are
    one-line ConfigErrors, and a host:port where nothing listens fails in seconds instead of a minutes-long wait."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    host_port = address.removeprefix("ray://") if address else ""
    if ":" in host_port:
        host, _, port = host_port.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc}); start one with "
                              f"'ray start --head' or leave --address out to start Ray on this machine") from None
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


def train_serial(config: ExperimentConfig, run_dir: Path, device: torch.device, report: Report) -> dict[str, Any]:
    """Serial mode: the same data flow in one process, with no Ray (Sample Factory's serial mode)."""
    seed_everything(config.seed)
    worker = RolloutWorker(lambda i: make_env(config.env), config.actors.envs_per_actor,
                           lambda obs, explore: algorithm.act(obs, explore, config.actors.candidates), config.seed,
                           config.actors.exploration_noise)
    low, high = worker.action_space.low.reshape(-1), worker.action_space.high.reshape(-1)
    algorithm = make_algorithm(config.algorithm, worker.obs_dim, low, high, device)
    learner = Learner(algorithm, device, config.learner.compile)
    replay = ReplayBuffer(config.replay.capacity, worker.obs_dim, worker.act_dim, seed=config.seed)
    eval_env = make_env(config.env)

    def evaluate(seed: int) -> dict[str, float]:
        return evaluate_algorithm(eval_env, algorithm, config.actors.candidates, config.eval.episodes, seed)

    starts, batch_size = config.learner.learning_starts, config.algorithm.batch_size
    returns: list[float] = []
    lengths: list[int] = []
    infos: list[dict[str, Any]] = []
    update_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    next_log, next_eval = config.log_every_steps, config.eval.every_steps
    next_checkpoint = config.learner.checkpoint_every
    mark_time, mark_steps, mark_updates = time.perf_counter(), 0, 0

    def checkpoint() -> None:
        save_checkpoint(run_dir / "checkpoints" / "latest.pt", {
            **checkpoint_meta(config, worker.obs_dim, low, high),
            "algorithm": algorithm.state_dict(), "updates": learner.num_updates, "version": learner.num_updates,
            "driver": {"env_steps": worker.env_steps}, "torch_rng": torch.get_rng_state(),
        })
        replay.save(run_dir / "checkpoints" / "replay.npz")

    while worker.env_steps < config.total_env_steps:
        fragment = worker.run(config.actors.fragment_length, random_actions=worker.env_steps < starts)
        replay.add(fragment)
        returns += fragment.episode_returns
        lengths += fragment.episode_lengths
        infos += fragment.episode_infos
        due = int(config.replay.updates_per_step * (worker.env_steps - starts)) - learner.num_updates
        if worker.env_steps >= starts and due > 0 and len(replay) >= batch_size:
            algorithm.set_progress(worker.env_steps / config.total_env_steps)
            update_metrics |= learner.update(replay.sample(due, batch_size))
        if learner.num_updates >= next_checkpoint:
            checkpoint()
            next_checkpoint += config.learner.checkpoint_every
        if config.eval.episodes and worker.env_steps >= next_eval:
            last_eval = evaluate(config.seed + 10_000)
            if isinstance(config.env, LQREnvConfig):
                fit = lqr_report(algorithm, config.env, config.algorithm.gamma, 512, 16, config.seed)
                last_eval |= {"eval/lqr_rel_err_K": fit["rel_err_K"], "eval/lqr_rel_err_Sigma": fit["rel_err_Sigma"]}
            next_eval += config.eval.every_steps
        if worker.env_steps >= next_log or worker.env_steps >= config.total_env_steps:
            now = time.perf_counter()
            elapsed = max(now - mark_time, 1e-9)
            report(worker.env_steps, {
                **({"train/episode_return": float(np.mean(returns)),
                    "train/episode_length": float(np.mean(lengths))} if returns else {}),
                **episode_info_means(infos, "train"),
                **update_metrics, **last_eval,
                "learner/updates": learner.num_updates,
                "learner/updates_per_s": (learner.num_updates - mark_updates) / elapsed,
                "actors/env_steps_per_s": (worker.env_steps - mark_steps) / elapsed,
                "replay/size": len(replay),
            })
            mark_time, mark_steps, mark_updates = now, worker.env_steps, learner.num_updates
            returns, lengths, infos, last_eval = [], [], [], {}
            next_log += config.log_every_steps
    checkpoint()
    worker.close()

    summary: dict[str, Any] = {"env_steps": worker.env_steps, "updates": learner.num_updates}
    if config.eval.episodes:
        summary |= evaluate(config.seed + 20_000)
    return summary | task_report(algorithm, config, run_dir)
