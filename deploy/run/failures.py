"""Failures that end a run with one line: an env that cannot be built or turns non-finite, a run directory that
cannot be written.

Before a run starts (nothing written, exit 2): :func:`check_env` builds the env once in the driver and resets it,
and :func:`check_writable` refuses a directory that cannot be created or written. While it runs (exit 1, the
checkpoints kept): :func:`env_stopped` and :func:`write_stopped` turn an :class:`~softflow.actors.rollout.EnvError`
(an env that raised, or returned a NaN or infinite observation or reward) or an ``OSError`` into a
:class:`~softflow.deploy.config.RunStopped` line that names the cause, where the run stopped and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from softflow import checkpoints
from softflow.actors.rollout import EnvError, check_finite, first_line, flatten_obs
from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped


def check_env(config: ExperimentConfig) -> None:
    """Builds ``config.env`` and resets it once: an env that fails is refused with one line naming env.id and
    env.kwargs (ConfigError) before anything is written or started."""
    from softflow.actors.envs import make_env

    try:
        env = make_env(config.env)
        try:
            with np.errstate(all="ignore"):
                obs, _ = env.reset(seed=config.seed)
                flat = flatten_obs(env.observation_space, obs)
            check_finite(env, flat, 0.0, "its first reset")
        finally:
            env.close()
    except EnvError as exc:
        raise ConfigError(f"{exc}; check env.kwargs") from None
    except Exception as exc:
        raise ConfigError(f"env {config.env.id} could not be built ({first_line(exc)}); check env.id and "
                          f"env.kwargs") from None


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuses (ConfigError, one line) a directory ``path`` that cannot be created or written: it, or the nearest
    of its parents that exists, is a file or not writable. Nothing is created."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file, not a directory; give a "
                          f"directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {existing} is not writable by this user; give a "
                          f"writable directory")


# errnos of a write that failed: no permission, read-only, full, too big, the directory gone or not one
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR}


def write_failure(exc: OSError) -> bool:
    """Whether ``exc`` is a failed write into the run directory (not a lost connection, say)."""
    return not isinstance(exc, ConnectionError) and exc.errno in WRITE_ERRNOS


def stopped_at(run_dir: Path, env_steps: int, then: str) -> str:
    """Where a run stopped, which checkpoint is kept, and ``then`` what to do: start afresh, or (with a checkpoint)
    also continue it."""
    newest, _ = checkpoints.newest_set(run_dir / "checkpoints")
    if newest is None:
        return f"the run stopped at {env_steps} env steps, before its first checkpoint. {then}, then start it afresh"
    return (f"the run stopped at {env_steps} env steps, its last checkpoint ({newest.name}) is kept. {then}, then "
            f"continue it with: softflow train --resume {run_dir}")


def env_stopped(exc: EnvError, run_dir: Path, env_steps: int) -> RunStopped:
    """The line of a run stopped by its env (through Ray, ``exc`` carries the actor's EnvError as its cause)."""
    cause = getattr(exc, "cause", None) or exc
    then = "Check the env settings (env.kwargs, an LQR system)"
    return RunStopped(f"{cause}; {stopped_at(run_dir, env_steps, then)}")


def settle(runtime: Any, timeout: float = 2.0) -> None:
    """Reads the runs and the evaluation still in flight when a run stops (within ``timeout``), failed ones too,
    so that Ray does not print the errors of dropped calls as unhandled once their references go."""
    refs = [ref for slot in runtime.slots for summary, (fragment, *_) in slot.runs.items()
            for ref in (summary, fragment)]
    refs += [runtime.evaluation[0]] if runtime.evaluation else []
    if refs and runtime.processes.errors:  # on Ray (in serial mode every call has finished)
        import ray

        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in runtime.processes.ready(refs) if refs else []:
        with contextlib.suppress(Exception):
            runtime.processes.get(ref)


def write_stopped(exc: OSError, run_dir: Path, env_steps: int) -> RunStopped:
    """The line of a run stopped because its run directory could not be written."""
    where = f" to {exc.filename}" if exc.filename else f" into {run_dir}"
    then = f"Make {run_dir} writable (or free space)"
    return RunStopped(f"could not write{where} ({exc.strerror or exc}); {stopped_at(run_dir, env_steps, then)}")
