"""The run driver: the run directory, metrics and progress display around the training loop (runtime.py).

``actors.count >= 1`` runs the loop's parts on Ray: rollout actors, a replay actor, a learner and an evaluator.
``actors.count: 0`` is serial mode, the same loop with the process boundaries taken out (Sample Factory's serial
mode, RLlib's ``num_env_runners=0``; processes.py). Both report through one callback to ``metrics.jsonl``, W&B and
the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, dump_config
from softflow.deploy.metrics import MetricsLogger
from softflow.deploy.progress import TrainingProgress, print_summary
from softflow.learner.learner import TrainingDiverged, learner_device


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


Report = Callable[[int, dict[str, float]], None]
CONNECT_TIMEOUT_S = 3.0


def train(config: ExperimentConfig, run_dir: Path, progress: bool = True, address: str | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Trains ``config``, writes the run directory (config.yaml, metrics.jsonl, checkpoints/, summary.json,
    learning_curve.png, W&B files, and the task reports of reports.py: lqr.json, multigoal.json and .png) and
    returns the summary."""
    if config.actors.count > 0:
        with ray_connection(address):
            return _train(config, run_dir, progress, resume)
    try:
        learner_device(config.learner.num_gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _train(config, run_dir, progress, resume)


def _train(config: ExperimentConfig, run_dir: Path, progress: bool, resume: bool) -> dict[str, Any]:
    """The run directory, metrics and display around the training loop."""
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    logger = MetricsLogger(run_dir, run_dir.name, config.model_dump(mode="json"), config.wandb, resume=resume)
    with TrainingProgress(config.total_env_steps, progress) as display:
        def report(env_steps: int, metrics: dict[str, float]) -> None:
            logger.log(env_steps, metrics)
            display.update(env_steps, metrics)

        try:
            summary = run_loop(config, run_dir, report, resume)
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


def run_loop(config: ExperimentConfig, run_dir: Path, report: Report, resume: bool) -> dict[str, Any]:
    """Runs the training loop, on the Ray this process is connected to or (serial mode) in this process."""
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
