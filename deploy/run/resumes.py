"""What ``softflow train --resume RUN_DIR key=value ...`` may change, and the record of each resume.

A resumed run continues the same experiment: its environment, algorithm, seeds, replay and learner settings are
what its checkpoints were made with. Only the settings in :data:`RESUMABLE` may change: the budget, how often it
logs, evaluates and checkpoints, W&B, the number of rollout actors and their restarts, and where its processes run
(CPUs, GPUs, custom resources). Any other key ends the command with one line naming the key and the allowed set
(exit 2), before anything in the run directory is touched.

Each resume appends one line to ``resumes.jsonl`` in the run directory: the time, the env steps it continued
from, and each setting it changed (``[from, to]``); ``config.yaml`` is rewritten to the config the run now follows,
so that a later ``--resume`` continues with it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from softflow.deploy.config import ConfigError, ExperimentConfig, dump_config, load_experiment, set_override

RESUMABLE = ("total_env_steps", "log_every_steps", "eval", "wandb", "actors.count", "actors.max_restarts",
             "actors.num_cpus", "actors.resources", "learner.checkpoint_every", "learner.keep_checkpoints",
             "learner.num_cpus", "learner.num_gpus", "learner.resources", "storage")
RESUMES_FILE = "resumes.jsonl"


def allowed(key: str) -> bool:
    """Whether the dotted ``key`` may change on resume (a key in :data:`RESUMABLE`, or inside a section there)."""
    return any(key == name or key.startswith(f"{name}.") for name in RESUMABLE)


def _refused(run_dir: Path, key: str) -> ConfigError:
    names = ", ".join(f"{name}.*" if name in ("eval", "wandb") else name for name in RESUMABLE)
    return ConfigError(f"--resume {run_dir}: {key} cannot change when a run is resumed (only {names} can); start a "
                       f"new run for a different experiment")


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The dotted keys of every leaf of a nested dict, with their values."""
    found: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            found |= _leaves(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value
    return found


def check_overrides(run_dir: Path, overrides: list[str]) -> None:
    """Refuses (ConfigError, one line) an override of a key that must not change on resume, whatever its value."""
    for assignment in overrides:
        tree: dict[str, Any] = {}
        set_override(tree, assignment)
        for key in _leaves(tree):
            if not allowed(key):
                raise _refused(run_dir, key)


def changes(run_dir: Path, config: ExperimentConfig, also: tuple[str, ...] = ()) -> dict[str, list]:
    """The settings ``config`` changes against the run's ``config.yaml``, as ``{key: [from, to]}``; ConfigError
    (one line) when one of them must not change (``also``: keys allowed besides :data:`RESUMABLE`, e.g. the ones a
    sweep's PBT perturbs). A directory without config.yaml has nothing to compare."""
    if not (run_dir / "config.yaml").is_file():
        return {}
    before = _leaves(load_experiment(run_dir / "config.yaml").model_dump(mode="json"))
    after = _leaves(config.model_dump(mode="json"))
    changed = {key: [before.get(key), after.get(key)] for key in sorted(before.keys() | after.keys())
               if before.get(key) != after.get(key)}
    for key in changed:
        if not allowed(key) and not any(key == name or key.startswith(f"{name}.") for name in also):
            raise _refused(run_dir, key)
    return changed


def record(run_dir: Path, env_steps: int, changed: dict[str, list], config: ExperimentConfig) -> None:
    """Appends the resume to ``resumes.jsonl`` and, when it changed settings, rewrites ``config.yaml`` (through a
    temporary file and a rename, so it is whole whatever happens)."""
    line = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "env_steps": env_steps,
            "changed": changed}
    with (run_dir / RESUMES_FILE).open("a") as file:
        file.write(json.dumps(line) + "\n")
    if changed:
        staged = run_dir / ".config.yaml.tmp"
        staged.write_text(dump_config(config))
        os.replace(staged, run_dir / "config.yaml")
