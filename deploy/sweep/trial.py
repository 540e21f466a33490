"""One trial of a sweep: the run's metrics reported to Tune at every log interval with its newest checkpoint set, and
a trial started from a Tune checkpoint (a retry, a resumed sweep, a PBT exploit) continued through ``--resume``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softflow import checkpoints
from softflow.deploy.config import ExperimentConfig, dump_config


class TrialReporter:
    """The run's report callback in a trial: each metrics record goes to ``report`` (``tune.report``) as it is in
    metrics.jsonl, plus the newest value of the sweep's ``metric`` when the record lacks it (evaluations finish
    between log intervals; schedulers compare it at every report), the ``trial`` and its ``run_dir``. A checkpoint
    set the run sealed since the last report is handed along as a ``tune.Checkpoint``."""

    def __init__(self, run_dir: Path, metric: str, trial: str, report: Callable[..., None] | None = None):
        self.checkpoints = Path(run_dir) / "checkpoints"
        self.metric = metric
        self.extra = {"trial": trial, "run_dir": str(run_dir)}
        self.report = report
        self.latest: float | None = None
        self.handed: str | None = None
        self.reports = 0

    def new_checkpoint(self) -> Path | None:
        """The newest whole checkpoint set when it is newer than the last one handed to Tune, else None."""
        if not self.checkpoints.is_dir():
            return None
        sets = sorted(p for p in self.checkpoints.iterdir() if p.name.startswith(checkpoints.SET_PREFIX))
        if not sets or sets[-1].name == self.handed or checkpoints.set_problem(sets[-1]) is not None:
            return None
        self.handed = sets[-1].name
        return sets[-1]

    def __call__(self, env_steps: int, metrics: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        record = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if isinstance(record.get(self.metric), (int, float)):
            self.latest = record[self.metric]
        elif self.latest is not None:
            record[self.metric] = self.latest
        result = {**record, **(final or {}), "env_steps": env_steps, **self.extra}
        found = self.new_checkpoint()
        report = self.report
        if report is None:
            from ray import tune

            report = tune.report
        if found is None:
            report(result)
        else:
            from ray import tune

            report(result, checkpoint=tune.Checkpoint.from_directory(str(found)))
        self.reports += 1


def restore(checkpoint: Any, run_dir: Path, config: ExperimentConfig) -> bool:
    """Puts the set of a Tune checkpoint (this trial's own, or another's under PBT) into the run directory as its only
    checkpoint set, so that ``train(..., resume=True)`` continues from it; a run directory without config.yaml gets
    ``config``'s. Without a checkpoint, a run directory left by an attempt that failed before its first one is
    cleared for a fresh start. Returns whether to resume."""
    if checkpoint is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return False
    with checkpoint.as_directory() as source:
        source = Path(source)
        env_steps = json.loads((source / checkpoints.MANIFEST).read_text())["env_steps"]
        target = run_dir / "checkpoints"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copytree(source, target / checkpoints.set_name(env_steps))
    if not (run_dir / "config.yaml").is_file():
        (run_dir / "config.yaml").write_text(dump_config(config))
    return True


TRIAL_FILE = "trial.json"  # the trial's wall time, beside summary.json


def finished(checkpoint: Any, run_dir: Path, total_env_steps: int) -> dict[str, Any] | None:
    """The summary numbers and wall time of a trial that already ran to its budget (a sweep killed after the trial
    ended but before Tune recorded it), when ``checkpoint`` is the run's last one; None otherwise."""
    summary_file, trial_file = run_dir / "summary.json", run_dir / TRIAL_FILE
    if checkpoint is None or not summary_file.is_file() or not trial_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    with checkpoint.as_directory() as source:
        steps = json.loads((Path(source) / checkpoints.MANIFEST).read_text())["env_steps"]
    if summary.get("env_steps", -1) < total_env_steps or steps != summary["env_steps"]:
        return None
    return {**summary, **json.loads(trial_file.read_text())}
