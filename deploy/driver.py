"""The run driver: builds the parts of an experiment and runs the training loop in one process (serial mode).

Serial mode is the actor-learner data flow with the process boundaries taken out (Sample Factory's serial mode,
Acme's run_experiment): a RolloutWorker steps the environments with the algorithm's policy, fragments go into the
ReplayBuffer, and the Learner makes ``replay.updates_per_step`` updates per environment step once
``learner.learning_starts`` steps of random actions are in.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from softflow.actors.envs import LQREnvConfig, make_env
from softflow.actors.evaluate import evaluate
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker
from softflow.algorithms import make_algorithm
from softflow.deploy.config import ConfigError, ExperimentConfig, dump_config
from softflow.deploy.reports import lqr_report
from softflow.learner.learner import Learner, learner_device, rng_state, save_checkpoint


class MetricsLog:
    """Appends one JSON object per report to ``metrics.jsonl``: ``env_steps`` plus namespaced metrics."""

    def __init__(self, path: Path):
        self.path = path
        self.path.touch()

    def write(self, env_steps: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"env_steps": env_steps, **metrics}) + "\n")


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: ExperimentConfig, run_dir: Path, progress: bool = True, address: str | None = None,
          resume: bool = False) -> dict[str, float]:
    """Trains ``config`` and writes the run directory; returns the final report. ``actors.count: 0`` runs
    serially in this process; otherwise on Ray (embedded, or the cluster at ``address``)."""
    if config.actors.count == 0:
        return train_serial(config, run_dir, progress)
    return train_on_ray(config, run_dir, progress, address, resume)


def train_on_ray(config: ExperimentConfig, run_dir: Path, progress: bool, address: str | None,
                 resume: bool) -> dict[str, float]:
    import ray

    from softflow.deploy.runtime import LearnerDied, Runtime

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 configure_logging=True, log_to_driver=True)
    try:
        if not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(config))
        log = MetricsLog(run_dir / "metrics.jsonl")
        with _progress(progress) as bar:
            task = bar.add_task("train", total=config.total_env_steps, info="")

            def show(env_steps: int, report: dict[str, float]) -> None:
                info = f"return {report.get('train/episode_return', float('nan')):9.2f}  " \
                       f"updates/s {report['learner/updates_per_s']:6.1f}"
                bar.update(task, completed=env_steps, info=info)

            runtime = Runtime(config, run_dir, log, resume=resume)
            summary = runtime.run(show)
    except LearnerDied as exc:
        raise ConfigError(str(exc)) from None
    finally:
        if started_here:
            ray.shutdown()
    if "lqr" in summary:
        report = summary.pop("lqr")
        (run_dir / "lqr.json").write_text(json.dumps(report, indent=2))
        summary |= {"lqr/rel_err_K": report["rel_err_K"], "lqr/rel_err_Sigma": report["rel_err_Sigma"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_serial(config: ExperimentConfig, run_dir: Path, progress: bool) -> dict[str, float]:
    """Serial mode: the same data flow in one process, with no Ray (Sample Factory's serial mode)."""
    try:
        device = learner_device(config.learner.num_gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    seed_everything(config.seed)

    worker = RolloutWorker(lambda i: make_env(config.env), config.actors.envs_per_actor,
                           lambda obs, explore: algorithm.act(obs, explore), config.seed)
    low, high = worker.action_space.low.reshape(-1), worker.action_space.high.reshape(-1)
    algorithm = make_algorithm(config.algorithm, worker.obs_dim, low, high, device)
    learner = Learner(algorithm, device)
    replay = ReplayBuffer(config.replay.capacity, worker.obs_dim, worker.act_dim, seed=config.seed)
    eval_env = make_env(config.env)
    log = MetricsLog(run_dir / "metrics.jsonl")

    steps_per_fragment = config.actors.fragment_length * config.actors.envs_per_actor
    starts, batch_size = config.learner.learning_starts, config.algorithm.batch_size
    returns: list[float] = []
    lengths: list[int] = []
    update_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    next_log, next_eval = config.log_every_steps, config.eval.every_steps
    next_checkpoint = config.learner.checkpoint_every
    mark_time, mark_steps, mark_updates = time.perf_counter(), 0, 0

    def checkpoint() -> None:
        save_checkpoint(run_dir / "checkpoints" / "latest.pt", {
            "algorithm": algorithm.state_dict(), "env_steps": worker.env_steps, "updates": learner.num_updates,
            "rng": rng_state(), "config": config.model_dump(mode="json"),
        })
        replay.save(run_dir / "checkpoints" / "replay.npz")

    with _progress(progress) as bar:
        task = bar.add_task("train", total=config.total_env_steps, info="")
        while worker.env_steps < config.total_env_steps:
            fragment = worker.run(config.actors.fragment_length, random_actions=worker.env_steps < starts)
            replay.add(fragment)
            returns += fragment.episode_returns
            lengths += fragment.episode_lengths
            due = int(config.replay.updates_per_step * (worker.env_steps - starts)) - learner.num_updates
            if worker.env_steps >= starts and due > 0 and len(replay) >= batch_size:
                algorithm.set_progress(worker.env_steps / config.total_env_steps)
                update_metrics |= learner.update(replay.sample(due, batch_size))
            if learner.num_updates >= next_checkpoint:
                checkpoint()
                next_checkpoint += config.learner.checkpoint_every
            if config.eval.episodes and worker.env_steps >= next_eval:
                last_eval = evaluate(eval_env, algorithm.act, config.eval.episodes, seed=config.seed + 10_000)
                if isinstance(config.env, LQREnvConfig):
                    fit = lqr_report(algorithm, config.env, config.algorithm.gamma, 512, 16, config.seed)
                    last_eval |= {"eval/lqr_rel_err_K": fit["rel_err_K"], "eval/lqr_rel_err_Sigma": fit["rel_err_Sigma"]}
                next_eval += config.eval.every_steps
            if worker.env_steps >= next_log or worker.env_steps >= config.total_env_steps:
                now = time.perf_counter()
                elapsed = max(now - mark_time, 1e-9)
                report = {
                    **({"train/episode_return": float(np.mean(returns)),
                        "train/episode_length": float(np.mean(lengths))} if returns else {}),
                    **update_metrics, **last_eval,
                    "learner/updates": learner.num_updates,
                    "learner/updates_per_s": (learner.num_updates - mark_updates) / elapsed,
                    "actors/env_steps_per_s": (worker.env_steps - mark_steps) / elapsed,
                    "replay/size": len(replay),
                }
                log.write(worker.env_steps, report)
                mark_time, mark_steps, mark_updates = now, worker.env_steps, learner.num_updates
                info = f"return {report.get('train/episode_return', float('nan')):9.2f}  " \
                       f"updates/s {report['learner/updates_per_s']:6.1f}"
                bar.update(task, completed=worker.env_steps, info=info)
                returns, lengths, last_eval = [], [], {}
                next_log += config.log_every_steps
            bar.update(task, completed=worker.env_steps)
    checkpoint()
    worker.close()

    summary: dict = {"env_steps": worker.env_steps, "updates": learner.num_updates}
    if config.eval.episodes:
        summary |= evaluate(eval_env, algorithm.act, config.eval.episodes, seed=config.seed + 20_000)
    if isinstance(config.env, LQREnvConfig):
        report = lqr_report(algorithm, config.env, config.algorithm.gamma, seed=config.seed)
        (run_dir / "lqr.json").write_text(json.dumps(report, indent=2))
        summary |= {"lqr/rel_err_K": report["rel_err_K"], "lqr/rel_err_Sigma": report["rel_err_Sigma"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]env steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, transient=False,
    )
