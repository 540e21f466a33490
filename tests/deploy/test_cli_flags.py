"""Every flag of every ``softflow`` subcommand is checked where it enters: an out-of-range value ends with one
``softflow: error: --flag: ...`` line naming the valid range, exit code 2, and nothing written. Also: the config
schema keeps its bounds in subclasses, and every number field of it has a domain."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import BaseModel

from softflow.algorithms import ALGORITHMS
from softflow.algorithms.base import AlgorithmConfig
from softflow.deploy.cli import USAGE_ERROR, build_parser, main

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "cluster" / "experiments" / "lqr-isfm.yaml"

# (argv, the start of the error line after "softflow: error: "); {tmp} is tmp_path, RUN a run that does not exist
BAD_FLAGS = [
    (["evaluate", "RUN", "--seed", "-1"], "--seed: must be an integer in [0, 4294967295] (got '-1')"),
    (["evaluate", "RUN", "--episodes", "0"], "--episodes: must be an integer >= 1 (got '0')"),
    (["evaluate", "RUN", "--episodes", "many"], "--episodes: must be an integer >= 1 (got 'many')"),
    (["evaluate", "RUN"], "no checkpoint at RUN"),
    (["serve", "RUN", "--port", "70000"], "--port: must be an integer in [0, 65535] (got '70000')"),
    (["serve", "RUN", "--port", "-1"], "--port: must be an integer in [0, 65535] (got '-1')"),
    (["serve", "RUN", "--max-batch-rows", "0"], "--max-batch-rows: must be an integer >= 1 (got '0')"),
    (["serve", "RUN", "--max-batch-wait-ms", "-5"], "--max-batch-wait-ms: must be a finite number >= 0"),
    (["serve", "RUN", "--max-request-rows", "0"], "--max-request-rows: must be an integer >= 1"),
    (["serve", "RUN", "--max-candidates", "-3"], "--max-candidates: must be an integer >= 1"),
    (["serve", "RUN", "--max-message-bytes", "0"], "--max-message-bytes: must be an integer >= 1"),
    (["serve", "RUN", "--max-concurrent-rpcs", "0"], "--max-concurrent-rpcs: must be an integer >= 1"),
    (["serve", "RUN", "--reload-interval", "nan"], "--reload-interval: must be a finite number >= 0 (got 'nan')"),
    (["serve", "RUN", "--torch-threads", "-1"], "--torch-threads: must be an integer >= 0"),
    (["serve", "RUN", "--token-file", "{tmp}/none"], "--token-file: must be an existing file"),
    (["serve", "RUN", "--tls-cert", "{tmp}"], "--tls-cert: must be an existing file (got '{tmp}': a directory)"),
    (["serve", "RUN", "--tls-key", "{tmp}/none"], "--tls-key: must be an existing file"),
    (["serve", "RUN", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["serve", "RUN"], "no checkpoint at RUN"),
    (["act", "--address", "localhost"], "--address: must be host:port with a port in [1, 65535]"),
    (["act", "--address", "localhost:0"], "--address: must be host:port with a port in [1, 65535]"),
    (["act", "--candidates", "-1"], "--candidates: must be an integer >= 0 (got '-1')"),
    (["act", "--seed", "-1"], "--seed: must be an integer in [0, 18446744073709551615] (got '-1')"),
    (["act", "--timeout", "-1"], "--timeout: must be a finite number > 0 (got '-1')"),
    (["act", "--timeout", "inf"], "--timeout: must be a finite number > 0 (got 'inf')"),
    (["act", "--token-file", "{tmp}/none"], "--token-file: must be an existing file"),
    (["act", "--tls-cert", "{tmp}/none"], "--tls-cert: must be an existing file"),
    (["act", "--obs", "[1, "], "--obs is not a JSON list"),
    (["sweep", "{tmp}/none.yaml"], "sweep file '{tmp}/none.yaml' not found"),
    (["sweep", "{tmp}/none.yaml", "--sweep-dir", str(EXPERIMENT)], "--sweep-dir: must be a directory, not a file"),
    (["bench", "what"], "WHAT: invalid choice: 'what'"),
    (["bench", "learner", "--batch-sizes", "0,256"], "--batch-sizes: must be comma-separated integers >= 1"),
    (["bench", "learner", "--batch-sizes", "a"], "--batch-sizes: must be comma-separated integers >= 1"),
    (["bench", "learner", "--compile", "fast"], "--compile: must be comma-separated names out of none, default"),
    (["bench", "learner", "--updates", "0"], "--updates: must be an integer >= 1 (got '0')"),
    (["bench", "learner", "--repeats", "-2"], "--repeats: must be an integer >= 1 (got '-2')"),
    (["bench", "learner", "--device", "gpu"], "--device: invalid choice: 'gpu'"),
    (["bench", "runtime", "--seconds", "-1"], "--seconds: must be a finite number > 0 (got '-1')"),
    (["bench", "runtime", "{tmp}/none.yaml"], "experiment file '{tmp}/none.yaml' not found"),
    (["bench", "rllib", "--seconds", "0"], "--seconds: must be a finite number > 0 (got '0')"),
    (["bench", "rllib", "--batch-size", "0"], "--batch-size: must be an integer >= 1 (got '0')"),
    (["bench", "rllib", "--updates-per-step", "inf"], "--updates-per-step: must be a finite number > 0"),
    (["bench", "rllib", "--env", "NoSuchEnv-v0"], "--env: unknown environment 'NoSuchEnv-v0'"),
    (["bench", "serve", "--seconds", "-0.5"], "--seconds: must be a finite number > 0"),
    (["bench", "serve", "--clients", "1,0"], "--clients: must be comma-separated integers >= 1"),
    (["bench", "serve", "--connections", "0"], "--connections: must be an integer >= 1"),
    (["bench", "serve", "--rounds", "0"], "--rounds: must be an integer >= 1"),
    (["bench", "serve", "--fuzz", "-1"], "--fuzz: must be an integer >= 0"),
    (["bench", "serve", "--max-batch-wait-ms", "-1"], "--max-batch-wait-ms: must be a finite number >= 0"),
    (["bench", "act", "--candidates", "0"], "--candidates: must be an integer >= 1"),
    (["bench", "act", "--repeats", "0"], "--repeats: must be an integer >= 1"),
    (["bench", "gradients", "--env-steps", "1000"], "--env-steps: must be an integer >= 1001"),
    (["bench", "gradients", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["bench", "gradients", "--plot", "{tmp}/none/figure.png"], "--plot: must be a file path in an existing"),
    (["bench", "gradients", "--env", "NoSuchEnv-v0"], "--env: unknown environment 'NoSuchEnv-v0'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["evaluate"], "the following arguments are required: path"),
]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("argv, expected", BAD_FLAGS, ids=[" ".join(argv[:4]) for argv, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    returncode = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert returncode == USAGE_ERROR and captured.out == "", captured
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), repr(captured.err)
    assert captured.err.startswith("softflow: error: " + expected.replace("{tmp}", str(tmp_path))), captured.err
    assert sorted(tmp_path.iterdir()) == before


def test_run_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("a file")
    returncode = main(["train", str(EXPERIMENT), "--run-dir", str(readme), "--no-progress"])
    captured = capsys.readouterr()
    assert returncode == USAGE_ERROR and captured.err.count("\n") == 1
    assert captured.err.startswith(f"softflow: error: --run-dir {readme} is a file, not a directory")
    assert readme.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


# flags whose values are free text checked later (a host, JSON observations, key=value overrides, Ray's address)
FREE_TEXT = {"experiment", "overrides", "path", "sweep", "run_dir", "resume", "address", "host", "obs", "help"}


def subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, f"{prefix} {name}".strip())
    yield prefix, parser


def test_every_flag_that_takes_a_value_has_a_checked_type_or_choices():
    unchecked = []
    for name, parser in subcommands(build_parser()):
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._SubParsersAction) or action.choices:
                continue
            if not getattr(action.type, "checked", False) and not (
                    action.dest in FREE_TEXT and (action.type is None or getattr(action.type, "checked", False))):
                unchecked.append(f"softflow {name} {action.option_strings or action.dest}")
    assert unchecked == []


# --- the config schema -------------------------------------------------------------------------------------------


def bounds(field) -> dict:
    return {name: getattr(m, name) for m in field.metadata for name in ("gt", "ge", "lt", "le", "multiple_of")
            if hasattr(m, name)}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_configs_keep_the_bounds_of_their_parents(name):
    config = ALGORITHMS[name].Config
    for parent in config.__mro__[1:]:
        if not (isinstance(parent, type) and issubclass(parent, AlgorithmConfig)):
            continue
        for key, field in parent.model_fields.items():
            mine = config.model_fields[key]
            assert bounds(mine) == bounds(field), f"{config.__name__}.{key} drops {parent.__name__}'s bounds"
            assert mine.annotation == field.annotation, f"{config.__name__}.{key} changes its type"


def number_fields(model: type[BaseModel], prefix: str = ""):
    """Every float and int field of a config model and its sub-models, with its field info."""
    for key, field in model.model_fields.items():
        annotation = field.annotation
        members = [annotation, *getattr(annotation, "__args__", ())]
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel):
                yield from number_fields(member, f"{prefix}{key}.")
        if annotation in (int, float) or set(members) in ({int, type(None)}, {float, type(None)}):
            yield f"{prefix}{key}", field


# number fields whose whole finite range is valid
UNBOUNDED = {"target_entropy", "target_entropy_per_dim", "log_std_min", "log_std_max"}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_number_field_of_an_algorithm_has_a_domain(name):
    for key, field in number_fields(ALGORITHMS[name].Config):
        finite = any(getattr(m, "allow_inf_nan", True) is False for m in field.metadata)
        if field.annotation is float or float in getattr(field.annotation, "__args__", ()):
            assert finite, f"{key} takes inf and nan"
        assert bounds(field) or key.rsplit(".", 1)[-1] in UNBOUNDED, f"{key} has no bounds"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_defaults_are_inside_their_own_domains(name):
    config = ALGORITHMS[name].Config
    assert config.model_validate(config().model_dump()) == config()
