"""Running a sweep on Ray Tune: one trial per point of the space, each a ``softflow train`` run in its own placement
group (deploy/sweep/spec.py has the sweep file's format, results.py what a sweep writes)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from softflow.deploy.config import ConfigError, ExperimentConfig
from softflow.deploy.run.storage import run_root
from softflow.deploy.sweep.board import log_sweep_table
from softflow.deploy.sweep.results import collect_results, condense_metrics, report
from softflow.deploy.sweep.schedulers import PBT_RESUMABLE, build_scheduler
from softflow.deploy.sweep.spec import (
    EXPERIMENT_KEY,
    _assign,
    base_tree,
    check_resources,
    check_space,
    experiments,
    load_sweep,
    trial_bundles,
    trial_experiment,
    trial_name,
)
from softflow.deploy.sweep.trial import TRIAL_FILE, TrialReporter, finished, restore


def default_sweep_dir(name: str, experiment: ExperimentConfig) -> Path:
    """``<storage or runs>/<name>-<time>``: a sweep goes where its (first) experiment's runs go (``storage``)."""
    return run_root(experiment) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def run_trial(config: dict[str, Any], bases: dict[str, dict[str, Any]], sweep_dir: str, metric: str,
              resumable: tuple[str, ...] = ()) -> None:
    """The Tune function trainable: trains one trial's experiment in ``<sweep dir>/<trial name>/``, reports every
    log interval with the newest checkpoint set (trial.py), then the summary, the condensed metrics.jsonl and the
    wall time once more. Started with a Tune checkpoint (a retry, ``--resume``, a PBT exploit), it continues from
    it; ``resumable``: what such a restore may change besides resumes.py's keys (PBT's)."""
    from ray import tune

    from softflow.deploy.run.driver import train
    from softflow.deploy.run.metrics import drop_rewound_records, read_metrics

    name = tune.get_context().get_trial_name()
    values = {k: v for k, v in config.items() if k != EXPERIMENT_KEY}
    experiment = trial_experiment(bases[config.get(EXPERIMENT_KEY, next(iter(bases)))], values)
    run_dir = Path(sweep_dir) / name
    reporter = TrialReporter(run_dir, metric, name)
    checkpoint = tune.get_checkpoint()
    summary = finished(checkpoint, run_dir, experiment.total_env_steps)
    if summary is None:  # not a trial that ended before a killed sweep recorded it
        resume = restore(checkpoint, run_dir, experiment)
        start = time.perf_counter()
        try:
            summary = train(experiment, run_dir, progress=False, resume=resume, on_report=reporter,
                            resumable=resumable if resume else ())
        finally:
            if "wandb" in sys.modules:  # W&B's service ends with the run, not when Tune ends the trial's process
                sys.modules["wandb"].teardown()
        summary["wall_s"] = time.perf_counter() - start
        (run_dir / TRIAL_FILE).write_text(json.dumps({"wall_s": summary["wall_s"]}) + "\n")
    records = drop_rewound_records(read_metrics(run_dir / "metrics.jsonl"))
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    reporter(summary["env_steps"], {}, {**condense_metrics(records, experiment.learner.learning_starts), **numbers})


def _progress_callback():
    """A Tune callback that prints one line when a trial starts, ends or fails (Tune itself runs silent)."""
    from ray import tune

    class Lines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"softflow: trial {trial} started", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"softflow: trial {trial} finished", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"softflow: trial {trial} failed (its error is in results.csv)", flush=True)

    return Lines()


def run_sweep(path: str | Path, overrides: list[str] = (), sweep_dir: str | Path | None = None,
              address: str | None = None, resume: str | Path | None = None) -> list[dict[str, Any]]:
    """Runs a sweep (module docstring) and returns its rows, one per trial; ``resume``: the directory of an
    interrupted sweep to finish (its sweep.yaml; finished trials are kept, unfinished and failed ones continue from
    their last checkpoint). Raises ConfigError before any trial on bad input, and RunStopped after writing the
    results when a trial failed."""
    if resume is not None:
        sweep_dir = Path(resume)
        if not (sweep_dir / "sweep.yaml").is_file() or not (sweep_dir / "tune").is_dir():
            raise ConfigError(f"--resume {sweep_dir}: no sweep there (no sweep.yaml and tune/); give the directory "
                              f"of a sweep that started its trials")
        if overrides:
            raise ConfigError(f"--resume {sweep_dir}: a resumed sweep takes no key=value (it continues the sweep "
                              f"in its sweep.yaml)")
        path = sweep_dir / "sweep.yaml"
    sweep, _ = load_sweep(path, overrides)
    files = experiments(sweep)
    bases = {label: base_tree(sweep, file) for label, file in files.items()}
    checked, probed = [], []
    for label, base in bases.items():
        try:
            found = check_space(sweep, base)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}" if len(bases) > 1 else str(exc)) from None
        checked += found[0]
        probed += [{**values, **({EXPERIMENT_KEY: label} if len(bases) > 1 else {})} for values in found[1]]
    keys = ([EXPERIMENT_KEY] if len(bases) > 1 else []) + list(sweep.space)
    sweep_dir = Path(sweep_dir or default_sweep_dir(sweep.name, checked[0])).resolve()
    if "wandb.group" not in sweep.overrides:
        for base in bases.values():
            _assign(base, "wandb.group", sweep_dir.name)  # the trials of one sweep side by side in W&B
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # reports before the first evaluation
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # the sweep's state, for --resume, at most 2 s old

    from ray import tune

    from softflow.deploy.run.driver import ray_connection

    with ray_connection(address):
        check_resources(checked, probed)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
                sweep.model_dump(mode="json", exclude_none=True), sort_keys=False))

        def name(trial) -> str:
            return trial_name(int(trial.trial_id.rsplit("_", 1)[-1]), {k: trial.config[k] for k in keys})

        def experiment_of(config: dict[str, Any]):
            values = {k: v for k, v in config.items() if k != EXPERIMENT_KEY}
            return trial_experiment(bases[config.get(EXPERIMENT_KEY, next(iter(bases)))], values)

        resumable = PBT_RESUMABLE if sweep.scheduler.name == "pbt" else ()
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, bases=bases, sweep_dir=str(sweep_dir), metric=sweep.metric,
                                 resumable=resumable),
            lambda config: tune.PlacementGroupFactory(trial_bundles(experiment_of(config)),
                                                      strategy="SPREAD"))  # as a run alone: actors over nodes
        run_config = tune.RunConfig(
            name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[_progress_callback()],
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
        if resume is not None:
            tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
            print(f"softflow: resuming sweep '{sweep.name}' in {sweep_dir}", flush=True)
        else:
            scheduler = build_scheduler(sweep.scheduler, sweep.metric, sweep.mode,
                                        max(c.total_env_steps for c in checked),
                                        min(c.log_every_steps for c in checked))
            space = {k: d.domain() for k, d in sweep.space.items()}
            for key, dist in (sweep.scheduler.hyperparam_mutations or {}).items():
                space.setdefault(key, dist.domain())  # PBT perturbs keys of the trial's config
            if len(bases) > 1:
                space = {EXPERIMENT_KEY: tune.grid_search(list(bases)), **space}
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                            max_concurrent_trials=sweep.max_concurrent_trials,
                                            trial_name_creator=name, trial_dirname_creator=name),
                run_config=run_config)
            print(f"softflow: sweep '{sweep.name}' over {', '.join(keys)}; sweep directory {sweep_dir}", flush=True)
        results = tuner.fit()
    rows = collect_results(results, keys)
    log_sweep_table(rows, sweep, bases, sweep_dir)
    return report(rows, sweep, keys, sweep_dir)
