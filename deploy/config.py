"""Experiment files: the frozen config tree, loading YAML with ``key=value`` overrides, and one-line errors.

One experiment file describes one run. Each component takes its own sub-config (``env``, ``algorithm``, ``actors``,
``replay``, ``learner``, ``eval``); this module composes them and checks what spans several of them (an LQR system
against ``algorithm.gamma``). Any problem raises ``ConfigError`` with one line that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from softflow.actors.envs import EnvConfig, LQREnvConfig, check_env_id
from softflow.actors.lqr import check_lqr_system
from softflow.algorithms import ALGORITHMS, AnyAlgorithmConfig
from softflow.deploy.run.metrics import WandbConfig


class ConfigError(Exception):
    """A bad experiment file or override; the message is one line meant for the user."""


class RunStopped(Exception):
    """A run that cannot go on (e.g. its learner died); the message says how to continue it. Exit code 1."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActorsConfig(_Section):
    count: int = Field(2, ge=0, description="rollout actors (Ray processes); 0 runs everything in this process "
                                           "without Ray (serial mode, for debugging and the LQR case study)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per rollout actor (fractions share a core)")
    envs_per_actor: int = Field(1, ge=1, description="environments stepped in lockstep, one batched policy call")
    fragment_length: int = Field(1, ge=1, description="steps per environment in one fragment sent to the replay")
    candidates: int = Field(1, ge=1, description="best-of-N acting: actions sampled per state, the argmax of "
                                                 "min(Q1, Q2) is executed (1: plain sampling)")
    exploration_noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to executed actions while "
                                                            "training, as a fraction of each action's half-range")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each rollout actor needs, e.g. {rollout: 1} to land "
                                          "on nodes started with --resources '{\"rollout\": N}'")


class ReplayConfig(_Section):
    capacity: int = Field(1_000_000, ge=1, description="transitions kept (a ring buffer)")
    updates_per_step: float = Field(1.0, gt=0, description="gradient updates per environment step (the UTD ratio), "
                                                           "held by a rate limiter whatever the number of actors")
    ratio_tolerance: float | None = Field(
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
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for the learner actor; torch "
                                           "uses ceil(num_cpus) threads in it (in serial mode, in the "
                                           "one process)")
    resources: dict[str, float] = Field(
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
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("must be 'auto' or a number >= 0")


class EvalConfig(_Section):
    every_steps: int = Field(10_000, ge=1, description="env steps between evaluations")
    episodes: int = Field(5, ge=0, description="deterministic episodes per evaluation (0: none)")


class ExperimentConfig(_Section):
    name: str = Field("experiment", description="run name; the run directory is runs/<name>-<time>")
    seed: int = 0
    total_env_steps: int = Field(100_000, ge=1)
    log_every_steps: int = Field(1000, ge=1, description="env steps between metric reports")
    env: EnvConfig
    algorithm: AnyAlgorithmConfig
    actors: ActorsConfig = ActorsConfig()
    replay: ReplayConfig = ReplayConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()


# pydantic puts the chosen union member in error locations; an unknown key is named against that member
_UNION_TAGS = {"lqr": "the LQR environment", "gym": "a gymnasium environment, which takes only id and kwargs",
               **{name: f"algorithm '{name}'" for name in ALGORITHMS}}


def _format_validation_error(error: ValidationError) -> str:
    parts: dict[str, list[str]] = {}  # message -> keys; unknown keys of one section share one message
    for item in error.errors():
        tags = [p for i, p in enumerate(item["loc"]) if i == 1 and p in _UNION_TAGS]
        loc = [str(p) for i, p in enumerate(item["loc"]) if not (i == 1 and p in _UNION_TAGS)]
        key = ".".join(loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            owner = f" for {_UNION_TAGS[tags[0]]}" if tags and len(loc) == 2 else ""
            message = f"unknown key{owner} (check the spelling; see the documented fields of this section)"
        elif item["type"] == "missing":
            message = "required key is missing"
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
        if isinstance(config.env, LQREnvConfig):
            e = config.env
            check_lqr_system(e.A, e.B, e.Q, e.R, e.W, config.algorithm.gamma)
        else:
            check_env_id(config.env.id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config


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
