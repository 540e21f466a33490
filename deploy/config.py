"""Experiment files: the frozen config tree, loading YAML with ``key=value`` overrides, and one-line errors.

One experiment file describes one run. Each component takes its own sub-config (``env``, ``algorithm``, ``actors``,
``replay``, ``learner``, ``eval``); this module composes them and checks what spans several of them (an LQR system
against ``algorithm.gamma``). Any problem raises ``ConfigError`` with one line that names the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator
from pydantic.fields import FieldInfo

from softflow.actors.envs import EnvConfig, GymEnvConfig, LQREnvConfig, check_env_id
from softflow.actors.lqr import check_lqr_system
from softflow.algorithms import ALGORITHMS, AnyAlgorithmConfig
from softflow.deploy.run.metrics import WandbConfig


class ConfigError(Exception):
    """A bad experiment file or override; the message is one line meant for the user."""


class RunStopped(Exception):
    """A run that cannot go on (e.g. its learner died); the message says how to continue it. Exit code 1."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ray custom resources: amounts >= 0, finite
Resources = dict[str, Annotated[FiniteFloat, Field(ge=0)]]
SEED_MAX = 2**32 - 1  # numpy's legacy seeding range; the runtime adds offsets per actor and for the evaluator


class ActorsConfig(_Section):
    count: int = Field(2, ge=0, description="rollout actors (Ray processes); 0 runs everything in this process "
                                           "without Ray (serial mode, for debugging and the LQR case study)")
    num_cpus: FiniteFloat = Field(1.0, gt=0, description="CPUs Ray reserves per rollout actor (fractions share a core)")
    envs_per_actor: int = Field(1, ge=1, description="environments stepped in lockstep, one batched policy call")
    fragment_length: int = Field(1, ge=1, description="steps per environment in one fragment sent to the replay")
    candidates: int = Field(1, ge=1, description="best-of-N acting: actions sampled per state, the argmax of "
                                                 "min(Q1, Q2) is executed (1: plain sampling)")
    exploration_noise: FiniteFloat = Field(0.0, ge=0, description="std of Gaussian noise added to executed actions "
                                                                  "while training, as a fraction of each action's "
                                                                  "half-range")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources each rollout actor needs, e.g. {rollout: 1} to land "
                                          "on nodes started with --resources '{\"rollout\": N}'")
    max_restarts: int = Field(10, ge=0, description="restarts of each rollout actor, and of the evaluator, after "
                                                    "it dies (each death is counted in actors/restarts or "
                                                    "eval/restarts); one more death stops the run, exit 1, its "
                                                    "checkpoints kept")


class ReplayConfig(_Section):
    capacity: int = Field(1_000_000, ge=1, description="transitions kept (a ring buffer)")
    updates_per_step: FiniteFloat = Field(1.0, gt=0, description="gradient updates per environment step (the UTD "
                                                                 "ratio), held by a rate limiter whatever the "
                                                                 "number of actors")
    ratio_tolerance: FiniteFloat | None = Field(
        None, gt=0, description="how many updates the learner may run ahead of or behind the ratio before it or "
                                "the actors wait (Reverb's error_buffer); default: the smallest deadlock-free value")


class LearnerConfig(_Section):
    learning_starts: int = Field(5000, ge=1, description="env steps of uniform random actions before updates")
    checkpoint_every: int = Field(10_000, ge=1, description="updates between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoint sets kept (the newest); a damaged newest set "
                                                       "falls back to the one before it")
    publish_every: int = Field(50, ge=1, description="updates between weight broadcasts to the actors")
    batches_per_request: int = Field(16, ge=1, description="batches fetched from the replay actor per request "
                                                           "(two requests are kept in flight; a request costs a "
                                                           "few ms of Ray transport whatever its size)")
    num_cpus: FiniteFloat = Field(1.0, ge=0, description="CPUs Ray reserves for the learner actor; torch uses "
                                                         "ceil(num_cpus) threads in it (in serial mode, in the one "
                                                         "process)")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources the learner needs (the replay actor and the "
                                          "evaluator go beside it), e.g. {learner: 1}")
    compile: Literal["none", "default", "reduce-overhead"] = Field(
        "none", description="torch.compile the update (learner/compile.py): none (eager), default (Inductor), "
                            "reduce-overhead (and CUDA graphs on a GPU)")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs for the learner: 'auto' takes one when the machine or cluster has one, 0 runs on "
                            "the CPU; more than 0 with no GPU is an error")

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _auto_or_non_negative(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                               and math.isfinite(value)):
            return value
        raise ValueError("must be 'auto' or a finite number >= 0")


class EvalConfig(_Section):
    every_steps: int = Field(10_000, ge=1, description="env steps between evaluations")
    episodes: int = Field(5, ge=0, description="deterministic episodes per evaluation (0: none)")


class ExperimentConfig(_Section):
    name: str = Field("experiment", description="run name; the run directory is <storage or runs>/<name>-<time>")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds the networks, the replay sampling and the envs")
    total_env_steps: int = Field(100_000, ge=1)
    log_every_steps: int = Field(1000, ge=1, description="env steps between metric reports")
    env: EnvConfig
    algorithm: AnyAlgorithmConfig
    actors: ActorsConfig = ActorsConfig()
    replay: ReplayConfig = ReplayConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()
    storage: str | None = Field(
        None, description="directory under which run directories are created when --run-dir is not given (default "
                          "runs/ in the working directory); on a cluster a shared filesystem path such as "
                          "/nfs/softflow-runs, so that a Ray job's runs outlive its temporary working directory. "
                          "Cloud URIs (s3://, gs://) are not supported: mount the bucket and give its path")

    @field_validator("storage")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError("cloud URIs are not supported (checkpoints and metrics are written as files); mount "
                             "the bucket or share a filesystem and give its path, e.g. /nfs/softflow-runs")
        if value is not None and not value.strip():
            raise ValueError("must be a directory path, not empty")
        return value

    @field_validator("name")
    @classmethod
    def _a_file_name(cls, value: str) -> str:
        if not re.fullmatch(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,99}", value):
            raise ValueError("must be 1 to 100 characters without '/', '\\' or control characters, not starting "
                             "with '.' (it names the run directory)")
        return value


# pydantic puts the chosen union member in error locations; an unknown key is named against that member
_UNION_TAGS = {"lqr": "the LQR environment", "gym": "a gymnasium environment, which takes only id and kwargs",
               **{name: f"algorithm '{name}'" for name in ALGORITHMS}}
_TAG_MODELS = {"lqr": LQREnvConfig, "gym": GymEnvConfig, **{name: cls.Config for name, cls in ALGORITHMS.items()}}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(type, constraints) of an annotation: Annotated metadata (and Field(...) in it) flattened, Optional dropped."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, metadata


def _field_at(loc: tuple) -> tuple[Any, list[Any]]:
    """(type, constraints) of the experiment field at an error location; (None, []) when it is not one."""
    annotation, metadata = ExperimentConfig, []
    for i, part in enumerate(loc):
        if i == 1 and part in _TAG_MODELS:
            annotation, metadata = _TAG_MODELS[part], []
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            field = annotation.model_fields[part]
            annotation, metadata = _unwrap(field.annotation)
            metadata = [*field.metadata, *metadata]
        elif get_origin(annotation) in (list, dict):
            annotation, metadata = _unwrap(get_args(annotation)[-1])
        else:
            return None, []
    return annotation, metadata


def _number(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def valid_range(bounds: dict[str, Any], integer: bool = False) -> str:
    """'in (0, 1]', '>= 1', '< 0.5': the interval that ``gt``/``ge``/``lt``/``le`` bounds describe."""
    if integer and isinstance(bounds.get("gt"), int):
        bounds = {k: v for k, v in bounds.items() if k != "gt"} | {"ge": bounds["gt"] + 1}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (bounds["lt"], ")") if "lt" in bounds else (bounds["le"], "]") if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {_number(low[1])}"
    if high:
        return f"{'<' if high[1] == ')' else '<='} {_number(high[0])}"
    return ""


def _range_message(item: dict[str, Any]) -> str:
    """'must be >= 1', 'must be in (0, 1)', 'must be a finite number > 0' for a bound or finiteness error."""
    annotation, metadata = _field_at(item["loc"])
    bounds = {name: getattr(m, name) for m in metadata for name in ("gt", "ge", "lt", "le")
              if isinstance(m, annotated_types.BaseMetadata) and hasattr(m, name)}
    if not bounds:
        bounds = {k: v for k, v in item.get("ctx", {}).items() if k in ("gt", "ge", "lt", "le")}
    integer = annotation is int
    interval = valid_range(bounds, integer)
    if item["type"] == "finite_number":
        return f"must be {'an integer' if integer else 'a finite number'}{' ' + interval if interval else ''}"
    return f"must be {interval}"


def _key(loc: list[Any]) -> str:
    """algorithm.flow.hidden[0]: dotted keys, list positions in brackets."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f"{'.' if key else ''}{part}"
    return key or "(top level)"


def _format_validation_error(error: ValidationError) -> str:
    parts: dict[str, list[str]] = {}  # message -> keys; unknown keys of one section share one message
    for item in error.errors():
        tags = [p for i, p in enumerate(item["loc"]) if i == 1 and p in _UNION_TAGS]
        loc = [p for i, p in enumerate(item["loc"]) if not (i == 1 and p in _UNION_TAGS)]
        key = _key(loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            owner = f" for {_UNION_TAGS[tags[0]]}" if tags and len(loc) == 2 else ""
            message = f"unknown key{owner} (check the spelling; see the documented fields of this section)"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] in _RANGE_ERRORS:
            message = _range_message(item)
        elif item["type"] == "multiple_of":
            message = f"must be a multiple of {_number(item['ctx']['multiple_of'])}"
        elif item["type"] == "too_short":
            message = f"must have at least {item['ctx']['min_length']} item(s)"
        if "input" in item and item["type"] not in ("missing", "extra_forbidden") and not isinstance(
                item["input"], dict):
            message += f" (got {item['input']!r})"
        parts.setdefault(message, []).append(key)
    lines = []
    for message, keys in parts.items():
        if len(keys) > 1:
            message = message.replace("unknown key", "unknown keys")
        lines.append(f"{', '.join(keys)}: {message}")
    return "; ".join(lines)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The one-line problem of a YAML error (``str(exc)`` spans several lines with context and a caret)."""
    return getattr(exc, "problem", None) or " ".join(str(exc).split())


def set_override(tree: dict[str, Any], assignment: str) -> None:
    """Applies ``dotted.key=value`` to a nested dict; the value is parsed as YAML (``[[0.0],[1.0]]``, ``1e-3``)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key=value, e.g. algorithm.q_lr=1e-3")
    key, text = assignment.split("=", 1)
    if not all(key.split(".")):
        raise ConfigError(f"override '{assignment}': the key before '=' must be a dotted name without empty "
                          f"parts, e.g. algorithm.q_lr=1e-3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: the value '{text}' is not valid YAML ({_yaml_problem(exc)})") from None
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or ConfigError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file '{path}' not found (give the path to a YAML file, "
                          f"e.g. cluster/experiments/lqr-isfm.yaml)")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {_yaml_problem(exc)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (env:, algorithm:, ...)")
    return tree


def parse_experiment(tree: dict[str, Any]) -> ExperimentConfig:
    """Validates a config tree: types and keys, then the checks that span sections."""
    try:
        config = ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    try:
        check_algorithm(config.algorithm)
        if isinstance(config.env, LQREnvConfig):
            e = config.env
            check_lqr_system(e.A, e.B, e.Q, e.R, e.W, config.algorithm.gamma)
        else:
            check_env_id(config.env.id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config


def check_algorithm(algorithm: Any) -> None:
    """ValueError for algorithm settings that are fine one by one but not together."""
    flow = getattr(algorithm, "flow", None)
    if flow is not None and flow.velocity == "decoded" and flow.d_model % flow.heads:
        raise ValueError(f"algorithm.flow.d_model must be a multiple of algorithm.flow.heads for the decoded "
                         f"velocity (got d_model {flow.d_model}, heads {flow.heads})")
    if algorithm.name == "sac" and not algorithm.log_std_min < algorithm.log_std_max:
        raise ValueError(f"algorithm.log_std_min must be below algorithm.log_std_max (got {algorithm.log_std_min:g} "
                         f"and {algorithm.log_std_max:g})")


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Reads an experiment YAML, applies ``key=value`` overrides and validates the result."""
    tree = read_yaml(path)
    for assignment in overrides:
        set_override(tree, assignment)
    return parse_experiment(tree)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def checkpoint_meta(config: ExperimentConfig, obs_dim: int, low, high) -> dict[str, Any]:
    """What a checkpoint stores besides the learner state, so that it loads as a policy on its own."""
    return {"config": config.model_dump(mode="json"),
            "spaces": {"obs_dim": int(obs_dim), "low": [float(x) for x in low], "high": [float(x) for x in high]}}
