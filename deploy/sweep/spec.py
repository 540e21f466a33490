"""Sweep files (the format below), checked before any trial runs, and the trials they describe.

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
    scheduler: {name: asha, grace_period: 20000}  # fifo (default) | asha | pbt: schedulers.py has the fields
    max_failures: 0                # retries of a failed trial from its last checkpoint (-1: without end)

``experiment`` may also be a list of files, crossed with the space (the trial's ``experiment``: the file's stem).

On the command line, ``space.KEY=SPEC`` sets the search space of KEY (``'space.actors.count={grid: [1, 2]}'``), a
field of the sweep file sets that field (``num_samples=4``, ``name=...``; ``'space={seed: {grid: [0, 1]}}'`` replaces
the whole space), and any other ``key=value`` (or ``overrides.KEY=VALUE``) is an experiment override for every trial
(``total_env_steps=5000``, like ``softflow train``); values are YAML. The command line has the last word: sweeping a
key there drops it from the file's fixed overrides, fixing a key there drops it from the file's space.

Everything is checked before a trial starts: the sweep file's keys and distributions, every value of the space (each
grid and choice value, both ends of a range) applied to the experiment and validated like a ``softflow train``
override, and each trial's resources against the Ray cluster. A bad input is one :class:`ConfigError` line.

Each trial is one :func:`softflow.deploy.run.driver.train` run in ``<sweep dir>/<trial>/`` (the usual run directory,
on the node the trial ran on) inside a placement group that reserves its whole topology: the trial's driver, the
learner's bundle and one bundle per rollout actor. Its W&B run is in the group named after the sweep directory, so
the trials of one sweep are shown together. It reports to Tune at every log interval (trial.py), then the run's
summary (final evaluation, env steps, updates), its metrics.jsonl condensed (see :func:`condense_metrics`) and
``wall_s``. At the end the sweep directory
holds ``results.csv``, ``results.json`` and ``sweep.png`` (the metric, and the final evaluation return, against the
first key of the space), and a table is printed; with ``actors.count`` in the space, also the scaling efficiency:
env steps/s with n actors over n x env steps/s with one (or with the fewest actors swept). """

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from softflow.deploy.config import ConfigError, ExperimentConfig, parse_experiment, read_yaml
from softflow.deploy.sweep.distributions import Distribution
from softflow.deploy.sweep.schedulers import PBT_KEYS, SchedulerConfig

THROUGHPUT = "actors/env_steps_per_s"
SCALING = "scaling_efficiency"
METRIC_PREFIXES = ("train/", "eval/", "losses/", "learner/", "actors/", "replay/", "weights/", "lqr/",
                    "multigoal/")
SUMMARY_METRICS = ("env_steps", "updates", "wall_s")
EXPERIMENT_KEY = "experiment"  # the trial config's key naming its experiment, when the sweep has several


class SweepConfig(BaseModel):
    """A sweep file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    experiment: str | list[str] = Field(description="the experiment YAML (relative to the sweep file or the working "
                                                    "directory), or a list of them crossed with the space")
    name: str | None = Field(None, description="default: the sweep file's stem")
    metric: str = Field(THROUGHPUT, description="the reported metric that ranks the trials and is plotted")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="draws of the random distributions (Tune's num_samples)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster holds")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted experiment keys for every trial")
    space: dict[str, Distribution] = Field(min_length=1, description="dotted experiment key -> distribution")
    scheduler: SchedulerConfig = Field(SchedulerConfig(), description="fifo (default), asha or pbt")
    max_failures: int = Field(0, ge=-1, description="retries of a failed trial from its last checkpoint (-1: "
                                                    "without end)")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not (self.metric in SUMMARY_METRICS or self.metric.startswith(METRIC_PREFIXES)):
            raise ValueError(f"metric '{self.metric}' is not a softflow metric; use one of "
                             f"{', '.join(SUMMARY_METRICS)} or a namespaced one ({', '.join(METRIC_PREFIXES)}), "
                             f"e.g. {THROUGHPUT}")
        if isinstance(self.experiment, list):
            stems = [Path(e).stem for e in self.experiment]
            if not stems or len(set(stems)) != len(stems):
                raise ValueError("experiment: a list needs at least one file and distinct file names")
            if EXPERIMENT_KEY in self.space:
                raise ValueError(f"space: '{EXPERIMENT_KEY}' is the list of experiment files, not a key to sweep")
        if self.scheduler.name == "pbt":
            pinned = [k for k in self.space if k not in (*PBT_KEYS, "seed")]
            if pinned or isinstance(self.experiment, list):
                raise ValueError(f"scheduler pbt restores one trial's checkpoint into another, so the space may "
                                 f"only hold seed and {', '.join(PBT_KEYS)}, and the experiment must be one file "
                                 f"(got {', '.join(pinned) or 'a list of experiments'})")
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
        if item["type"] == "extra_forbidden" and item["loc"][0] == "scheduler" and len(item["loc"]) == 2:
            message = f"unknown key (a scheduler takes {', '.join(SchedulerConfig.model_fields)})"
        elif item["type"] == "extra_forbidden":
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
    """Reads a sweep file and the command line's ``key=value`` (module docstring); returns the validated sweep (its
    experiment paths resolved) and the (first) experiment file it names."""
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
    files = [_experiment_file(path, name) for name in
             (sweep.experiment if isinstance(sweep.experiment, list) else [sweep.experiment])]
    resolved = [str(f.resolve()) for f in files]
    sweep = sweep.model_copy(update={"name": sweep.name or path.stem,
                                     "experiment": resolved if isinstance(sweep.experiment, list) else resolved[0]})
    return sweep, files[0]


def _experiment_file(path: Path, name: str) -> Path:
    experiment = path.parent / name
    if not experiment.is_file() and Path(name).is_file():
        experiment = Path(name)
    if not experiment.is_file():
        raise ConfigError(f"sweep file {path}: experiment '{name}' not found (relative to "
                          f"{path.parent} or the working directory)")
    return experiment


def experiments(sweep: SweepConfig) -> dict[str, Path]:
    """The experiment files of a loaded sweep by label (the file's stem; the value of ``experiment`` in a trial's
    config when there are several)."""
    names = sweep.experiment if isinstance(sweep.experiment, list) else [sweep.experiment]
    return {Path(name).stem: Path(name) for name in names}


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
                raise ConfigError(f"space {key}={short_value(value)}: {exc}") from None
    for key, dist in (sweep.scheduler.hyperparam_mutations or {}).items():
        for value in dist.probes():
            try:
                trial_experiment(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"scheduler.hyperparam_mutations {key}={short_value(value)}: {exc}") from None
    first = {key: dist.probes()[0] for key, dist in sweep.space.items()}
    probed = [first] + [{**first, k: v} for k, d in sweep.space.items() for v in d.probes()[1:]]
    checked = []
    for values in probed:
        try:
            checked.append(trial_experiment(base, values))
        except ConfigError as exc:
            raise ConfigError(f"space {_describe(values)}: {exc}") from None
    return checked, probed


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={short_value(value)}" for key, value in values.items())


def trial_bundles(experiment: ExperimentConfig) -> list[dict[str, float]]:
    """A trial's placement-group bundles: its driver, then the run's topology (learner, one per actor)."""
    from softflow.deploy.run.placement import TRIAL_DRIVER_BUNDLE, learner_gpus, topology_bundles

    return [dict(TRIAL_DRIVER_BUNDLE), *topology_bundles(experiment, learner_gpus(experiment))]


def check_resources(experiments: list[ExperimentConfig], values: list[dict[str, Any]]) -> None:
    """Each trial's bundles, summed per resource, must fit the Ray cluster's totals (a trial that never fits
    would wait forever); names the first swept values that do not fit."""
    from softflow.deploy.run.placement import shortfall

    for experiment, where in zip(experiments, values):
        missing = shortfall(trial_bundles(experiment))
        if missing is not None:
            key, amount, have = missing
            parts = (f" (its driver, the learner and {experiment.actors.count} x actors.num_cpus="
                     f"{experiment.actors.num_cpus:g})" if key == "CPU" else "")
            raise ConfigError(
                f"a trial with {_describe(where)} needs {amount:g} {key}{parts} but the Ray cluster has "
                f"{have:g}; sweep fewer actors (e.g. 'space.actors.count={{grid: [1, 2]}}'), "
                f"lower what the experiment asks for (actors.num_cpus, learner.num_gpus, ...), or add nodes")


def trial_name(index: int, values: dict[str, Any]) -> str:
    """``003_actors.count=4_seed=1``: the trial's index and swept values, safe as a directory name (lists as
    ``64-64``)."""
    text = "_".join(f"{key}={short_value(value)}" for key, value in values.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._=+-]", "", text.replace(",", "-"))[:80]
