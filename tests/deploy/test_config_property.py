"""Property: any ``key=value`` overrides drawn from the config schema either load (and the algorithm they configure
builds, acts and takes an update) or end with one ``softflow: error:`` line, exit code 2, no traceback and nothing
written. Overrides go through ``softflow train`` in process, as typed on the command line, with the training itself
replaced by a stub that builds the algorithm (so that a value the schema accepts is one the code can run with)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import types
import typing
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from softflow.actors.envs import LQREnvConfig
from softflow.algorithms import ALGORITHMS, make_algorithm
from softflow.deploy.cli import USAGE_ERROR, main
from softflow.deploy.config import ExperimentConfig

EXPERIMENT = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-isfm.yaml"
# the LQR matrices have their own tests (tests/actors/test_lqr.py), storage paths theirs (tests/deploy/test_storage.py);
# W&B and the GPU are not used here
SKIP = {"env", "env.id", "env.A", "env.B", "env.Q", "env.R", "env.W", "wandb", "algorithm.name", "learner.num_gpus",
        "storage"}
WRONG_TYPES = {"number": ["abc", [1], {"x": 1}], "list": ["abc", {"x": 1}], "dict": ["abc", [1]],
               "str": [[1], {"x": 1}]}


def unwrap(annotation: typing.Any) -> tuple[typing.Any, list, bool]:
    """(type, constraints, optional) with Annotated metadata flattened and None split off."""
    metadata, optional = [], False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                metadata.extend(getattr(item, "metadata", [item]) if hasattr(item, "metadata") else [item])
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
            optional = True
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation, metadata, optional


def leaves(model: type[BaseModel], prefix: str = ""):
    """(dotted key, type, constraints, optional) of every leaf field of a config model."""
    for key, field in model.model_fields.items():
        annotation, metadata, optional = unwrap(field.annotation)
        if f"{prefix}{key}" in SKIP:
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaves(annotation, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", annotation, [*field.metadata, *metadata], optional


def bound(metadata: list, name: str):
    return next((getattr(m, name) for m in metadata if hasattr(m, name) and getattr(m, name) is not None), None)


def numbers(kind: type, metadata: list) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of an int or float field with these constraints; valid sizes are kept small."""
    gt, ge, lt, le = (bound(metadata, n) for n in ("gt", "ge", "lt", "le"))
    low = ge if ge is not None else gt
    high = le if le is not None else lt
    invalid = [st.just(math.inf), st.just(-math.inf), st.just(math.nan), st.just("1e400")]
    if low is not None:
        invalid.append(st.just(low - 1) if kind is int else st.floats(low - 100, low, exclude_max=ge is not None))
    if high is not None:
        invalid.append(st.just(high + 1) if kind is int else st.floats(high, high + 100, exclude_min=le is not None))
    if kind is int:
        step = bound(metadata, "multiple_of") or 1
        first = (low if ge is not None else low + 1) if low is not None else -5
        last = high if le is not None else (high - 1 if high is not None else first + 6)
        valid = st.integers(first, min(last, first + 6)).filter(lambda v: v % step == 0)
        invalid += [st.just(0.5 + first)] + ([st.just(first + 1)] if step > 1 else [])
    else:
        first = low if low is not None else -5.0
        valid = st.floats(first, high if high is not None else first + 3.0, exclude_min=gt is not None,
                          exclude_max=lt is not None, allow_nan=False, allow_infinity=False)
    return valid, st.one_of(invalid)


def values(annotation, metadata: list, optional: bool) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of one leaf field."""
    origin = typing.get_origin(annotation)
    wrong = WRONG_TYPES["number"]
    if annotation in (int, float):
        valid, invalid = numbers(annotation, metadata)
    elif annotation is bool:
        valid, invalid = st.booleans(), st.sampled_from(["maybe", 2])
    elif origin is typing.Literal:
        valid, invalid = st.sampled_from(typing.get_args(annotation)), st.just("no-such-choice")
    elif origin is list:
        item, item_metadata, _ = unwrap(typing.get_args(annotation)[0])
        good, bad = values(item, item_metadata, False)
        size = bound(metadata, "min_length") or 0
        valid = st.lists(good, min_size=size, max_size=3)
        invalid = st.lists(bad, min_size=1, max_size=2) | (st.just([]) if size else st.nothing())
        wrong = WRONG_TYPES["list"]
    elif origin is dict:
        good, bad = values(*unwrap(typing.get_args(annotation)[1]))
        valid, invalid = st.dictionaries(st.sampled_from(["a", "b"]), good, max_size=2), st.fixed_dictionaries(
            {"a": bad})
        wrong = WRONG_TYPES["dict"]
    elif annotation is str:
        valid = st.text("abcXYZ019_-=", min_size=1, max_size=12)
        invalid, wrong = st.sampled_from(["", "../up", "a/b", ".hidden", "x" * 101]), WRONG_TYPES["str"]
    else:
        raise AssertionError(f"no strategy for {annotation}")
    if optional:
        valid = valid | st.none()
    return valid, invalid | st.sampled_from(wrong)


def schema(algorithm: str) -> list[tuple[str, st.SearchStrategy, st.SearchStrategy]]:
    fields = [leaf for leaf in leaves(ExperimentConfig) if not leaf[0].startswith("algorithm")]
    fields += leaves(LQREnvConfig, "env.")
    fields += [(f"algorithm.{key}", *rest) for key, *rest in leaves(ALGORITHMS[algorithm].Config)]
    return [(key, *values(annotation, metadata, optional)) for key, annotation, metadata, optional in fields]


SCHEMAS = {name: schema(name) for name in ALGORITHMS}


@st.composite
def overrides(draw) -> tuple[list[str], bool]:
    """Overrides of the tiny experiment: an algorithm, then a few leaves each set to a valid or an invalid value;
    True when one of them is invalid on its own."""
    algorithm = draw(st.sampled_from(sorted(ALGORITHMS)))
    assignments = [f"algorithm={{name: {algorithm}, gamma: 0.9}}", "algorithm.critic.kind=quadratic"]
    fields = draw(st.lists(st.sampled_from(SCHEMAS[algorithm]), min_size=1, max_size=4, unique_by=lambda f: f[0]))
    any_invalid = False
    for key, valid, invalid in fields:
        bad = draw(st.booleans())
        value = draw(invalid if bad else valid)
        any_invalid |= bad
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()
        assignments.append(f"{key}={text}")
    return assignments, any_invalid


def build_and_step(config, run_dir, **kwargs):
    """The stand-in for training: builds the configured algorithm on the LQR's 2 states and 1 action, acts, and
    takes one update on a random batch."""
    algorithm = make_algorithm(config.algorithm, 2, np.array([-1.0]), np.array([1.0]))
    obs = np.zeros((3, 2), dtype=np.float32)
    assert algorithm.act(obs, explore=True, candidates=config.actors.candidates).shape == (3, 1)
    batch = {"obs": torch.randn(4, 2), "actions": torch.rand(4, 1) * 2 - 1, "rewards": torch.randn(4),
             "next_obs": torch.randn(4, 2), "terminated": torch.zeros(4)}
    algorithm.update(batch)
    return {}


@pytest.mark.filterwarnings("ignore")  # numerical warnings of valid but extreme settings are not the point here
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_drawn_overrides_load_or_fail_with_one_line(drawn):
    assignments, any_invalid = drawn
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, mock.patch("softflow.deploy.run.driver.train", build_and_step):
        run_dir = Path(tmp) / "run"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            returncode = main(["train", str(EXPERIMENT), *assignments, "--run-dir", str(run_dir), "--no-progress"])
        assert list(Path(tmp).iterdir()) == []
    stderr = err.getvalue()
    assert "Traceback" not in stderr + out.getvalue()
    if returncode == 0:
        assert not any_invalid, f"{assignments} loaded"
        assert stderr == ""
    else:
        assert returncode == USAGE_ERROR, (assignments, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("softflow: error: "), (assignments, stderr)
