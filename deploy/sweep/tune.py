"""Running a sweep on Ray Tune: one trial per point of the space, each a ``softflow train`` run in its own placement
group (deploy/sweep/spec.py has the sweep file's format, results.py what a sweep writes)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from softflow.deploy.sweep.results import collect_results, condense_metrics, report
from softflow.deploy.sweep.spec import (
    _assign,
    base_tree,
    check_resources,
    check_space,
    load_sweep,
    trial_bundles,
    trial_experiment,
    trial_name,
)


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """The Tune function trainable: trains one trial's experiment in ``<sweep dir>/<trial name>/`` and reports the
    summary, the condensed metrics.jsonl and the wall time once."""
    from ray import tune

    from softflow.deploy.run.driver import train
    from softflow.deploy.run.metrics import drop_rewound_records, read_metrics

    name = tune.get_context().get_trial_name()
    experiment = trial_experiment(base, config)
    run_dir = Path(sweep_dir) / name
    start = time.perf_counter()
    summary = train(experiment, run_dir, progress=False)
    wall_s = time.perf_counter() - start
    records = drop_rewound_records(read_metrics(run_dir / "metrics.jsonl"))
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**condense_metrics(records, experiment.learner.learning_starts), **numbers, "wall_s": wall_s,
                 "trial": name, "run_dir": str(run_dir)})


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
              address: str | None = None) -> list[dict[str, Any]]:
    """Runs a sweep (module docstring) and returns its rows, one per trial. Raises ConfigError before any trial on
    bad input, and RunStopped after writing the results when a trial failed."""
    sweep, experiment_path = load_sweep(path, overrides)
    base = base_tree(sweep, experiment_path)
    checked, probed = check_space(sweep, base)
    keys = list(sweep.space)
    sweep_dir = Path(sweep_dir or Path("runs") / f"{sweep.name}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if "wandb.group" not in sweep.overrides:
        _assign(base, "wandb.group", sweep_dir.name)  # the trials of one sweep side by side in W&B

    from ray import tune

    from softflow.deploy.run.driver import ray_connection

    with ray_connection(address):
        check_resources(checked, probed)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json", exclude_none=True),
                                                             sort_keys=False))

        def name(trial) -> str:
            return trial_name(int(trial.trial_id.rsplit("_", 1)[-1]), {k: trial.config[k] for k in keys})

        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir)),
            lambda config: tune.PlacementGroupFactory(trial_bundles(trial_experiment(base, config)),
                                                      strategy="SPREAD"))  # as a run alone: actors over nodes
        tuner = tune.Tuner(
            trainable, param_space={k: d.domain() for k, d in sweep.space.items()},
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent_trials,
                                        trial_name_creator=name, trial_dirname_creator=name),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0,
                                      callbacks=[_progress_callback()]))
        print(f"softflow: sweep '{sweep.name}' over {', '.join(keys)}; sweep directory {sweep_dir}", flush=True)
        results = tuner.fit()
    return report(collect_results(results, keys), sweep, keys, sweep_dir)
