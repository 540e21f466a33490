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
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from softflow.actors.rollout import EnvError
from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, dump_config
from softflow.deploy.run import resumes
from softflow.deploy.run.failures import check_writable, env_stopped, settle, write_failure, write_stopped
from softflow.deploy.run.metrics import MetricsLogger
from softflow.deploy.run.progress import TrainingProgress, print_summary
from softflow.deploy.run.storage import run_root
from softflow.learner.learner import TrainingDiverged, learner_device


def default_run_dir(config: ExperimentConfig) -> Path:
    """``<storage or runs>/<name>-<time>-<4 random hex digits>``: two runs started in the same second get different
    ones; a ``storage`` that is a file or not writable is refused (storage.py)."""
    return run_root(config) / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_fresh_run_dir(run_dir: Path) -> None:
    """A fresh run needs a directory that holds no run and can be written: one line (ConfigError) instead of
    touching an old run's files, naming ``--resume`` and a free directory, or the file or unwritable parent in the
    way."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory; give a new directory, e.g. "
                          f"runs/{run_dir.stem}-run")
    check_writable(run_dir, "the run directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        free = next(run_dir.with_name(f"{run_dir.name}-{i}") for i in range(2, 10_000)
                    if not run_dir.with_name(f"{run_dir.name}-{i}").exists())
        raise ConfigError(f"{run_dir} already holds a run; continue it with 'softflow train --resume {run_dir}' "
                          f"or start a new one in a free directory (e.g. --run-dir {free})")


Report = Callable[[int, dict[str, float]], None]
CONNECT_TIMEOUT_S = 3.0


def train(config: ExperimentConfig, run_dir: Path, progress: bool = True, address: str | None = None,
          resume: bool = False, on_report: Report | None = None, resumable: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trains ``config``, writes the run directory (config.yaml, metrics.jsonl, checkpoints/, summary.json,
    learning_curve.png, W&B files, and the task reports of reports.py: lqr.json, multigoal.json and .png) and
    returns the summary. A fresh run refuses a directory that already holds one (:func:`check_fresh_run_dir`); a
    resumed one refuses a config that changes more than resumes.py allows, before anything is touched, and records
    what it changed in ``resumes.jsonl`` (``resumable``: keys it may change besides resumes.py's, for a sweep's
    PBT). ``on_report(env_steps, metrics)``, when given, gets each metrics record after metrics.jsonl (a sweep's
    trial reports it to Tune)."""
    changed = resumes.changes(run_dir, config, resumable) if resume else None
    if not resume:
        check_fresh_run_dir(run_dir)
    if config.actors.count > 0:
        with ray_connection(address):
            return _train(config, run_dir, progress, changed, on_report)
    try:
        learner_device(config.learner.num_gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _train(config, run_dir, progress, changed, on_report)


def _train(config: ExperimentConfig, run_dir: Path, progress: bool, changed: dict | None,
           on_report: Report | None = None) -> dict[str, Any]:
    """The run directory, metrics and display around the training loop (``changed``: None for a fresh run, the
    settings a resume changes otherwise)."""
    resume = changed is not None
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    logger = MetricsLogger(run_dir, run_dir.name, config.model_dump(mode="json"), config.wandb, resume=resume)
    with TrainingProgress(config.total_env_steps, progress) as display:
        def report(env_steps: int, metrics: dict[str, float]) -> None:
            logger.log(env_steps, metrics)
            display.update(env_steps, metrics)
            if on_report is not None:
                on_report(env_steps, metrics)

        try:
            with stop_on_signals() as stop:
                summary = run_loop(config, run_dir, report, resume, stop, changed)
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


def run_loop(config: ExperimentConfig, run_dir: Path, report: Report, resume: bool,
             stop_requested: Callable[[], str | None] = lambda: None, changed: dict | None = None) -> dict[str, Any]:
    """Runs the training loop, on the Ray this process is connected to or (serial mode) in this process; a resume
    is recorded (resumes.py) once its checkpoint is loaded."""
    from softflow.deploy.run.runtime import Runtime

    try:
        runtime = Runtime(config, run_dir, resume=resume)
    except EnvError as exc:  # serial mode: the env is built in this process
        raise env_stopped(exc, run_dir, 0) from None
    try:
        if resume:
            resumes.record(run_dir, runtime.counters.env_steps, changed or {}, config)
        return runtime.run(report, stop_requested)
    except EnvError as exc:
        settle(runtime)
        raise env_stopped(exc, run_dir, runtime.counters.env_steps) from None
    except OSError as exc:
        if not write_failure(exc):
            raise
        raise write_stopped(exc, run_dir, runtime.counters.env_steps) from None
    finally:
        runtime.close()


class StopRequest:
    """Set by SIGTERM (``ray job stop``, Kubernetes, Slurm) or SIGINT: the loop stops at its next step with a
    checkpoint. A second SIGINT interrupts at once."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self) -> str | None:
        return self.reason

    def handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals():
    """Routes SIGTERM and SIGINT to a :class:`StopRequest` while the loop runs (in the main thread only; a Tune
    trial's thread keeps Tune's own handling)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
