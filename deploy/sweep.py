"""Sweeps: ``softflow sweep SWEEP.yaml [key=value ...]`` runs one experiment many times on Ray Tune.

A sweep file names an experiment, fixed overrides for every trial, and a search space over dotted experiment keys::

    experiment: ../experiments/inverted-pendulum.yaml  # relative to the sweep file, else to the working directory
    name: my-sweep                 # default: the file's stem; the sweep directory is runs/<name>-<time>
    metric: actors/env_steps_per_s # what ranks the trials and is plotted against the first key of the space
    mode: max                      # max | min
    num_samples: 1                 # Tune's num_samples: draws of the random distributions (grids are crossed
                                   # with every draw; with grids only, the whole grid is repeated)
    max_concurrent_trials: 1       # default: as many as the cluster holds at once
    overrides: {total_env_steps: 20000, algorithm.batch_size: 128}   # dotted keys, applied to every trial
    space:                         # dotted keys -> exactly one of grid / choice / uniform / loguniform
      actors.count: {grid: [1, 2, 4]}
      seed: {choice: [0, 1, 2]}
      algorithm.q_lr: {loguniform: [1.0e-4, 1.0e-2]}
      algorithm.tau: {uniform: [0.001, 0.01]}

On the command line, ``space.KEY=SPEC`` sets the search space of KEY (``'space.actors.count={grid: [1, 2]}'``), a
field of the sweep file sets that field (``num_samples=4``, ``name=...``; ``'space={seed: {grid: [0, 1]}}'`` replaces
the whole space), and any other ``key=value`` (or ``overrides.KEY=VALUE``) is an experiment override for every trial
(``total_env_steps=5000``, like ``softflow train``); values are YAML. The command line has the last word: sweeping a
key there drops it from the file's fixed overrides, fixing a key there drops it from the file's space.

Everything is checked before a trial starts: the sweep file's keys and distributions, every value of the space (each
grid and choice value, both ends of a range) applied to the experiment and validated like a ``softflow train``
override, and each trial's resources against the Ray cluster. A bad input is one :class:`ConfigError` line.

Each trial is one :func:`softflow.deploy.driver.train` run in ``<sweep dir>/<trial>/`` (the usual run directory, on the
node the trial ran on) inside a placement group that reserves its whole topology: the trial's driver, the learner's
bundle and one bundle per rollout actor. Its W&B run is in the group named after the sweep directory, so the trials
of one sweep are shown together. It reports to Tune the run's summary (final evaluation, env steps, updates), its
metrics.jsonl condensed (see :func:`condense_metrics`) and ``wall_s``. At the end the sweep directory holds
``results.csv``, ``results.json`` and ``sweep.png`` (the metric, and the final evaluation return, against the first
key of the space), and a table is printed; with ``actors.count`` in the space, also the scaling efficiency: env
steps/s with n actors over n x env steps/s with one (or with the fewest actors swept).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from softflow.deploy.config import ConfigError, ExperimentConfig, RunStopped, parse_experiment, read_yaml

THROUGHPUT = "actors/env_steps_per_s"
SCALING = "scaling_efficiency"
# Columns of the table after the swept keys and the metric, when reported and not the metric itself.
HEADLINE = [THROUGHPUT, "learner/updates_per_s", "eval/episode_return", "env_steps", "wall_s"]
# Keys Tune adds to every reported result; not ours.
_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
              "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
              "iterations_since_restore", "experiment_tag", "should_checkpoint"}
_METRIC_PREFIXES = ("train/", "eval/", "losses/", "learner/", "actors/", "replay/", "weights/", "lqr/",
                    "multigoal/")
_SUMMARY_METRICS = ("env_steps", "updates", "wall_s")


class Distribution(BaseModel):
    """The search space of one key: exactly one of ``grid``, ``choice``, ``uniform`` or ``loguniform``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: list[Any] | None = Field(None, min_length=1, description="every value, one trial each (tune.grid_search)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn per sample (tune.choice)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly (tune.uniform)")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] > 0, uniform in log space")

    @model_validator(mode="after")
    def _one_distribution(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform "
                             f"(got {', '.join(given) or 'none'})")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: [low, high] needs low < high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {self.loguniform[0]:g})")
        return self

    def domain(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def probes(self) -> list[Any]:
        """The values checked against the experiment before the sweep: every listed value, both ends of a range."""
        return list(self.grid or self.choice or self.uniform or self.loguniform)


class SweepConfig(BaseModel):
    """A sweep file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    experiment: str = Field(description="the experiment YAML, relative to the sweep file or the working directory")
    name: str | None = Field(None, description="default: the sweep file's stem")
    metric: str = Field(THROUGHPUT, description="the reported metric that ranks the trials and is plotted")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="draws of the random distributions (Tune's num_samples)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster holds")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted experiment keys for every trial")
    space: dict[str, Distribution] = Field(min_length=1, description="dotted experiment key -> distribution")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not (self.metric in _SUMMARY_METRICS or self.metric.startswith(_METRIC_PREFIXES)):
            raise ValueError(f"metric '{self.metric}' is not a softflow metric; use one of "
                             f"{', '.join(_SUMMARY_METRICS)} or a namespaced one ({', '.join(_METRIC_PREFIXES)}), "
                             f"e.g. {THROUGHPUT}")
        both = sorted(set(self.space) & set(self.overrides))
        if both:
            raise ValueError(f"{', '.join(both)} is both swept (space) and fixed (overrides); keep one")
        return self


def _format_errors(error: ValidationError, path: Path) -> str:
    fields = ", ".join(SweepConfig.model_fields)
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = (f"unknown key (a sweep file takes {fields})" if len(item["loc"]) == 1 else
                       "unknown key (a distribution is one of grid, choice, uniform, loguniform)")
        elif item["type"] == "missing":
            message = "required key is missing"
        parts.append(f"{key}: {message}" if key else message)
    return f"sweep file {path}: " + "; ".join(parts)


def _assign(tree: dict[str, Any], key: str, value: Any) -> None:
    """Sets the dotted ``key`` of a nested dict to ``value`` (what ``softflow train``'s overrides do, typed)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"'{key}' must be a dotted name without empty parts, e.g. algorithm.q_lr")
    node = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is a value, not a section")
    node[parts[-1]] = value


def _mapping(tree: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    node = tree.setdefault(key, {})
    if not isinstance(node, dict):
        raise ConfigError(f"sweep file {path}: {key} must be a mapping of dotted keys")
    return node


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, Path]:
    """Reads a sweep file and the command line's ``key=value`` (module docstring); returns the validated sweep and
    the experiment file it names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' not found (give the path to a YAML file, "
                          f"e.g. cluster/sweeps/actor-scaling.yaml)")
    tree = read_yaml(path)
    for assignment in overrides:
        key, equals, text = assignment.partition("=")
        if not equals or not key:
            raise ConfigError(f"override '{assignment}' must look like key=value, e.g. num_samples=4 or "
                              f"'space.actors.count={{grid: [1, 2]}}'")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: the value '{text}' is not valid YAML "
                              f"({getattr(exc, 'problem', None) or exc})") from None
        # the command line has the last word: sweeping a key unfixes it, fixing a key takes it out of the space
        if key.startswith("space."):
            key = key.removeprefix("space.")
            _mapping(tree, "space", path)[key] = value
            _mapping(tree, "overrides", path).pop(key, None)
        elif key in SweepConfig.model_fields:  # space= and overrides= replace the whole mapping
            tree[key] = value
        else:
            key = key.removeprefix("overrides.")
            _mapping(tree, "overrides", path)[key] = value
            _mapping(tree, "space", path).pop(key, None)
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path)) from None
    experiment = path.parent / sweep.experiment
    if not experiment.is_file() and Path(sweep.experiment).is_file():
        experiment = Path(sweep.experiment)
    if not experiment.is_file():
        raise ConfigError(f"sweep file {path}: experiment '{sweep.experiment}' not found (relative to "
                          f"{path.parent} or the working directory)")
    return sweep.model_copy(update={"name": sweep.name or path.stem}), experiment


def base_tree(sweep: SweepConfig, experiment: Path) -> dict[str, Any]:
    """The experiment file's tree with the sweep's fixed overrides applied (not validated yet)."""
    tree = read_yaml(experiment)
    for key, value in sweep.overrides.items():
        _assign(tree, key, value)
    return tree


def trial_experiment(base: dict[str, Any], values: dict[str, Any]) -> ExperimentConfig:
    """The experiment of one trial: the base tree (experiment file and fixed overrides) with the swept values."""
    tree = copy.deepcopy(base)
    for key, value in values.items():
        _assign(tree, key, value)
    return parse_experiment(tree)


def check_space(sweep: SweepConfig, base: dict[str, Any]) -> tuple[list[ExperimentConfig], list[dict[str, Any]]]:
    """Validates the experiment with the fixed overrides, then each probe value of each key on its own (so an error
    names the key at fault), then each probe value with the other keys at their first value; returns those last
    experiments and their swept values (for the resource check)."""
    try:
        parse_experiment(base)
    except ConfigError as exc:
        raise ConfigError(f"the experiment with the sweep's overrides: {exc}") from None
    for key, dist in sweep.space.items():
        for value in dist.probes():
            try:
                trial_experiment(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"space {key}={_short(value)}: {exc}") from None
    first = {key: dist.probes()[0] for key, dist in sweep.space.items()}
    probed = [first] + [{**first, k: v} for k, d in sweep.space.items() for v in d.probes()[1:]]
    checked = []
    for values in probed:
        try:
            checked.append(trial_experiment(base, values))
        except ConfigError as exc:
            raise ConfigError(f"space {_describe(values)}: {exc}") from None
    return checked, probed


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_short(value)}" for key, value in values.items())


def trial_bundles(experiment: ExperimentConfig) -> list[dict[str, float]]:
    """A trial's placement-group bundles: its driver, then the run's topology (learner, one per actor)."""
    from softflow.deploy.placement import TRIAL_DRIVER_BUNDLE, learner_gpus, topology_bundles

    return [dict(TRIAL_DRIVER_BUNDLE), *topology_bundles(experiment, learner_gpus(experiment))]


def check_resources(experiments: list[ExperimentConfig], values: list[dict[str, Any]]) -> None:
    """Each trial's bundles, summed per resource, must fit the Ray cluster's totals (a trial that never fits
    would wait forever); names the first swept values that do not fit."""
    import ray

    from softflow.deploy.placement import total_resources

    have = ray.cluster_resources()
    for experiment, where in zip(experiments, values):
        need = total_resources(trial_bundles(experiment))
        for key, amount in sorted(need.items()):
            if amount > have.get(key, 0.0) + 1e-9:
                parts = (f" (its driver, the learner and {experiment.actors.count} x actors.num_cpus="
                         f"{experiment.actors.num_cpus:g})" if key == "CPU" else "")
                raise ConfigError(
                    f"a trial with {_describe(where)} needs {amount:g} {key}{parts} but the Ray cluster has "
                    f"{have.get(key, 0.0):g}; sweep fewer actors (e.g. 'space.actors.count={{grid: [1, 2]}}'), "
                    f"lower what the experiment asks for (actors.num_cpus, learner.num_gpus, ...), or add nodes")


def trial_name(index: int, values: dict[str, Any]) -> str:
    """``003_actors.count=4_seed=1``: the trial's index and swept values, safe as a directory name (lists as
    ``64-64``)."""
    text = "_".join(f"{key}={_short(value)}" for key, value in values.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._=+-]", "", text.replace(",", "-"))[:80]


def condense_metrics(records: list[dict[str, Any]], learning_starts: int) -> dict[str, float]:
    """One number per metric of a run's metrics.jsonl: rates (``*_per_s``) are the mean over the reports whose
    window began at or after ``learner.learning_starts`` (the policy acting; before it, actions are uniform random
    and the learner idle), or over all reports when none did; any other metric is its last reported value."""
    last: dict[str, float] = {}
    rates: dict[str, list[float]] = defaultdict(list)
    all_rates: dict[str, list[float]] = defaultdict(list)
    previous = 0
    for record in records:
        for key, value in record.items():
            if key == "env_steps" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("_per_s"):
                all_rates[key].append(value)
                if previous >= learning_starts:
                    rates[key].append(value)
            else:
                last[key] = value
        previous = record["env_steps"]
    return last | {key: float(sum(v) / len(v)) for key, v in ((k, rates.get(k) or all_rates[k]) for k in all_rates)}


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """The Tune function trainable: trains one trial's experiment in ``<sweep dir>/<trial name>/`` and reports the
    summary, the condensed metrics.jsonl and the wall time once."""
    from ray import tune

    from softflow.deploy.driver import train
    from softflow.deploy.metrics import drop_rewound_records, read_metrics

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


def scaling_efficiency(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Env steps/s with n actors over n/n0 x env steps/s with the fewest actors n0 (1 in the usual sweep), each the
    mean over the trials with that many actors; also written into each row."""
    by_count: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get(THROUGHPUT), (int, float)):
            by_count[int(row["actors.count"])].append(row[THROUGHPUT])
    if not by_count or min(by_count) < 1:
        return {}
    n0 = min(by_count)
    base = sum(by_count[n0]) / len(by_count[n0]) / n0  # steps/s per actor at the smallest count
    for row in rows:
        if isinstance(row.get(THROUGHPUT), (int, float)):
            row[SCALING] = row[THROUGHPUT] / (row["actors.count"] * base)
    return {n: sum(v) / len(v) / (n * base) for n, v in sorted(by_count.items())}


def _collect(results: Any, keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid: the trial, its swept values, status and every metric reported."""
    rows = []
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if k not in _TUNE_KEYS}
        name = metrics.pop("trial", None) or Path(result.path).name
        error = None if result.error is None else (str(result.error).strip().splitlines() or ["error"])[-1]
        rows.append({"trial": name, **{k: result.config.get(k) for k in keys},
                     "status": "error" if error else "ok", "error": error, **metrics})
    return sorted(rows, key=lambda row: row["trial"])


def write_results(rows: list[dict[str, Any]], sweep: SweepConfig, keys: list[str], sweep_dir: Path,
                  best: str | None) -> None:
    """results.json (the sweep and every row) and results.csv (one row per trial, every metric a column)."""
    (sweep_dir / "results.json").write_text(json.dumps(
        {"sweep": sweep_dir.name, "metric": sweep.metric, "mode": sweep.mode, "best_trial": best,
         "space": {k: d.model_dump(exclude_none=True) for k, d in sweep.space.items()}, "trials": rows},
        indent=2, default=str))
    first = ["trial", *keys, sweep.metric, SCALING]
    last = ["status", "error", "run_dir"]
    middle = sorted({k for row in rows for k in row} - set(first) - set(last))
    columns = [c for c in first if any(c in row for row in rows)] + middle + last
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _short(row[c]) if isinstance(row.get(c), (list, dict)) else row.get(c)
                             for c in columns})


def plot_sweep(rows: list[dict[str, Any]], metric: str, key: str, path: Path) -> Path | None:
    """``metric`` (and the scaling efficiency, and the final evaluation return, when there) against ``key``: each
    trial a point, the mean per value a line; for env steps/s against actor count, linear scaling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in dict.fromkeys([metric, SCALING, "eval/episode_return"])
              if any(isinstance(row.get(m), (int, float)) for row in rows)]
    if not panels:
        return None
    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = list(dict.fromkeys(_short(v) for v in values))
    xs = [v if numeric else labels.index(_short(v)) for v in values]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        points = [(x, row[name]) for x, row in zip(xs, rows) if isinstance(row.get(name), (int, float))]
        means = defaultdict(list)
        for x, y in points:
            means[x].append(y)
        line = sorted((x, sum(ys) / len(ys)) for x, ys in means.items())
        ax.scatter(*zip(*points), alpha=0.5, s=18)
        ax.plot(*zip(*line), marker="o")
        if name == THROUGHPUT and key == "actors.count" and line[0][0] > 0:
            ax.plot([x for x, _ in line], [line[0][1] * x / line[0][0] for x, _ in line], "k--", lw=1,
                    label="linear scaling")
            ax.legend()
        if name == SCALING:
            ax.set_ylim(0, max(1.1, max(y for _, y in points) * 1.05))
        elif name.endswith("_per_s"):
            ax.set_ylim(bottom=0)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
        if numeric and len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        elif not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(key)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows: list[dict[str, Any]], keys: list[str], metric: str, title: str) -> None:
    """The trials as a rich table: swept values, the metric, the headline metrics, the scaling efficiency."""
    from rich.console import Console
    from rich.table import Table

    from softflow.deploy.progress import format_value

    columns = [c for c in dict.fromkeys([metric, SCALING, *HEADLINE]) if any(c in row for row in rows)]
    table = Table(title=title)
    for name in ["trial", *keys, *columns, "status"]:
        table.add_column(name, justify="left" if name in ("trial", "status") else "right")
    for row in rows:
        table.add_row(row["trial"], *(_short(row.get(k)) for k in keys),
                      *(format_value(row.get(c)) for c in columns), row["status"])
    console = Console()
    (console if console.is_terminal else Console(width=300)).print(table)  # a file or pipe gets the whole table


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

    from softflow.deploy.driver import ray_connection

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
    return report(_collect(results, keys), sweep, keys, sweep_dir)


def report(rows: list[dict[str, Any]], sweep: SweepConfig, keys: list[str], sweep_dir: Path) -> list[dict[str, Any]]:
    """Writes results.csv, results.json and sweep.png, prints the table (and the scaling efficiency); raises
    RunStopped when a trial failed."""
    efficiency = scaling_efficiency(rows) if "actors.count" in keys else {}
    scored = [row for row in rows if isinstance(row.get(sweep.metric), (int, float))
              and math.isfinite(row[sweep.metric])]
    best = (max if sweep.mode == "max" else min)(scored, key=lambda row: row[sweep.metric]) if scored else None
    write_results(rows, sweep, keys, sweep_dir, best and best["trial"])
    plot = plot_sweep(rows, sweep.metric, keys[0], sweep_dir / "sweep.png")
    print_table(rows, keys, sweep.metric, f"sweep {sweep_dir.name}: {sweep.metric} ({sweep.mode})")
    if efficiency:
        n0 = min(efficiency)
        print(f"scaling efficiency (env steps/s with n actors over {'n' if n0 == 1 else f'n/{n0}'} x with {n0}): "
              + ", ".join(f"{n}: {e:.2f}" for n, e in efficiency.items()))
    if best:
        print(f"best trial by {sweep.metric} ({sweep.mode}): {best['trial']} = {best[sweep.metric]:.4g}")
    elif rows:
        print(f"no trial reported {sweep.metric}")
    print(f"results: {sweep_dir / 'results.csv'}, {sweep_dir / 'results.json'}" + (f", {plot}" if plot else ""))
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        raise RunStopped(f"{len(failed)} of {len(rows)} trials failed (first: {failed[0]['trial']}: "
                         f"{failed[0]['error']}); results of the others are in {sweep_dir}")
    return rows
