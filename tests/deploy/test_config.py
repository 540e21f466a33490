"""Tests for softflow.deploy.config: loading the shipped experiment, dotted overrides, round trips, and the
one-line ``ConfigError`` every bad input must raise (naming the offending key and the problem)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from softflow.actors.envs import LQREnvConfig
from softflow.actors.lqr import soft_lqr_solution
from softflow.deploy.config import (
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_experiment,
    parse_experiment,
    read_yaml,
)

EXPERIMENT = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-isfm.yaml"


def config_error(call, *args) -> str:
    """Runs ``call(*args)``, which must raise ConfigError, and returns its message checked to be one line."""
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert message and message == message.strip(), repr(message)
    assert "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message
    return message


# --- the shipped experiment and overrides -----------------------------------------------------------------------


def test_shipped_experiment_loads_with_the_values_of_its_file():
    config = load_experiment(EXPERIMENT)
    raw = yaml.safe_load(EXPERIMENT.read_text())
    assert isinstance(config, ExperimentConfig) and isinstance(config.env, LQREnvConfig)
    resolved = config.model_dump(mode="json")

    def check(expected, got, key):
        if isinstance(expected, dict):
            for name, value in expected.items():
                check(value, got[name], f"{key}.{name}")
        else:
            assert got == expected, key

    check(raw, resolved, "experiment")
    assert config.learner.num_gpus == "auto"  # a default: the file has no learner.num_gpus
    e = config.env
    solution = soft_lqr_solution(e.A, e.B, e.Q, e.R, config.algorithm.gamma, config.algorithm.alpha)
    assert np.all(np.isfinite(solution.K)) and solution.K.shape == (1, 2)


def test_overrides_are_parsed_as_yaml_and_applied():
    config = load_experiment(EXPERIMENT, [
        "algorithm.q_lr=1e-3", "env.B=[[0.0],[1.0]]", "seed=3", "algorithm.flow.steps=3",
        "learner.num_gpus=0", "name=renamed", "algorithm.autotune_alpha=true",
    ])
    assert isinstance(config.algorithm.q_lr, float) and config.algorithm.q_lr == 0.001
    assert config.env.B == [[0.0], [1.0]]
    assert isinstance(config.seed, int) and config.seed == 3
    assert config.algorithm.flow.steps == 3
    assert config.algorithm.flow.hidden == [64, 64]  # siblings of an overridden key are kept
    assert config.learner.num_gpus == 0 and config.learner.learning_starts == 1000
    assert config.name == "renamed"
    assert config.algorithm.autotune_alpha is True
    # Untouched keys keep the file's values.
    assert config.env.A == [[1.0, 0.1], [0.0, 0.9]] and config.algorithm.policy_lr == 1e-3


def test_later_override_wins_and_value_may_contain_equals_sign():
    config = load_experiment(EXPERIMENT, ["seed=1", "seed=5", "name=a=b"])
    assert config.seed == 5
    assert config.name == "a=b"


def test_config_is_frozen():
    config = load_experiment(EXPERIMENT)
    with pytest.raises(ValidationError):
        config.seed = 1
    with pytest.raises(ValidationError):
        config.algorithm.q_lr = 1.0
    with pytest.raises(ValidationError):
        config.env.horizon = 7
    with pytest.raises(ValidationError):
        config.replay.capacity = 7
    assert config.seed == 0 and config.algorithm.q_lr == yaml.safe_load(EXPERIMENT.read_text())["algorithm"]["q_lr"]


@pytest.mark.parametrize("overrides", [[], ["algorithm.q_lr=1e-3", "env.B=[[0.0],[1.0]]", "seed=3"]])
def test_dump_config_round_trips(overrides):
    config = load_experiment(EXPERIMENT, overrides)
    text = dump_config(config)
    again = parse_experiment(yaml.safe_load(text))
    assert again == config
    assert dump_config(again) == text


def test_dump_config_round_trips_for_sac(tmp_path):
    from softflow.algorithms.sac import SACConfig

    tree = read_yaml(EXPERIMENT)
    tree["algorithm"] = {k: v for k, v in tree["algorithm"].items() if k in SACConfig.model_fields}
    tree["algorithm"]["name"] = "sac"
    config = parse_experiment(tree)
    assert config.algorithm.name == "sac" and config.algorithm.hidden == [256, 256]
    path = tmp_path / "sac.yaml"
    path.write_text(dump_config(config))
    assert load_experiment(path) == config


# --- bad files ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(load_experiment, missing)
    assert str(missing) in message and "not found" in message
    # A directory is not an experiment file either.
    assert "not found" in config_error(load_experiment, tmp_path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nseed: 0\nenv: id: LQR\nalgorithm: {name: isfm}\n")
    message = config_error(load_experiment, path)
    assert str(path) in message and "invalid YAML" in message
    assert "line 3, column 8" in message and "mapping values are not allowed" in message
    # An unclosed flow sequence opened on line 3 is noticed at the first ':' on line 4.
    path.write_text("name: broken\nseed: 0\nenv: [1, 2\nalgorithm: {name: isfm}\n")
    message = config_error(load_experiment, path)
    assert re.search(r"invalid YAML at line 4, column \d+: expected ',' or '\]'", message), message


@pytest.mark.parametrize("text", ["- env\n- algorithm\n", "just a string\n", "", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    message = config_error(load_experiment, path)
    assert str(path) in message and "mapping" in message


def test_top_level_typo_in_file(tmp_path):
    tree = read_yaml(EXPERIMENT)
    tree["sed"] = tree.pop("seed")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(tree))
    message = config_error(load_experiment, path)
    assert "sed: unknown key" in message


def test_missing_required_section():
    tree = read_yaml(EXPERIMENT)
    del tree["algorithm"]
    message = config_error(parse_experiment, tree)
    assert "algorithm: required key is missing" in message


# --- bad overrides ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("algorithm.lrr=1", "algorithm.lrr"),
    ("seeed=1", "seeed"),
    ("env.horizn=10", "env.horizn"),
    ("algorithm.flow.stepz=3", "algorithm.flow.stepz"),
])
def test_unknown_key(override, key):
    message = config_error(load_experiment, EXPERIMENT, [override])
    assert message.startswith(f"{key}: unknown key"), message


@pytest.mark.parametrize("override, key, shown", [
    ("algorithm.batch_size=abc", "algorithm.batch_size", "'abc'"),
    ("algorithm.q_lr=[1]", "algorithm.q_lr", "[1]"),
    ("seed=1.5", "seed", "1.5"),
    ("algorithm.gamma=abc", "algorithm.gamma", "'abc'"),
    ("algorithm.flow.integrator=rk4", "algorithm.flow.integrator", "'rk4'"),
])
def test_wrong_type(override, key, shown):
    message = config_error(load_experiment, EXPERIMENT, [override])
    assert message.startswith(f"{key}: "), message
    assert f"(got {shown})" in message


def test_unknown_algorithm_name():
    message = config_error(load_experiment, EXPERIMENT, ["algorithm.name=foo"])
    assert message.startswith("algorithm"), message
    assert "'foo'" in message and "'sac'" in message and "'isfm'" in message


@pytest.mark.parametrize("overrides, key, words", [
    (["env.B=[[0.0,1.0,2.0]]"], "env.B", "rows"),
    (["env.B=[[0.0],[1.0],[2.0]]"], "env.B", "has 3 rows but must have n = 2 rows"),
    (["env.A=[[1.0,0.1]]"], "env.A", "square"),
    (["env.A=[[1.0,0.1],[0.0]]"], "env.A", "2-D matrix"),
    (["env.Q=[[1.0]]"], "env.Q", "2x2"),
    (["env.R=[[0.1,0.0],[0.0,0.1]]"], "env.R", "1x1"),
    (["env.W=[[0.01]]"], "env.W", "2x2"),
    (["env.A=[[1.0,0.1,0.0],[0.0,0.9,0.0],[0.0,0.0,0.5]]"], "env.B", "rows"),
])
def test_inconsistent_matrix_shapes(overrides, key, words):
    message = config_error(load_experiment, EXPERIMENT, overrides)
    assert message.startswith(key), message
    assert words in message


def test_not_stabilisable_integer_matrices():
    # YAML integers are accepted as floats; with B = [[0],[1]] only the second state is actuated.
    message = config_error(load_experiment, EXPERIMENT, ["env.A=[[2,0],[0,1]]", "env.B=[[0],[1]]"])
    assert message.startswith("env.A, env.B: (A, B) is not stabilisable at gamma=0.9: the mode of A with "
                              "eigenvalue 2 is unstable"), message
    # With the modes swapped the unstable mode is the actuated one, and the marginal mode 1 is discounted-stable.
    config = load_experiment(EXPERIMENT, ["env.A=[[1,0],[0,2]]", "env.B=[[0],[1]]"])
    assert config.env.A == [[1.0, 0.0], [0.0, 2.0]] and config.env.B == [[0.0], [1.0]]


def test_not_stabilisable():
    overrides = ["env.A=[[1.5,0],[0,0.5]]", "env.B=[[0],[1]]"]
    message = config_error(load_experiment, EXPERIMENT, overrides)
    assert "env.A" in message and "env.B" in message and "not stabilisable" in message
    assert "1.5" in message  # the unreachable mode
    # The check is the discounted one: with gamma = 0.4, sqrt(0.4) * 1.5 < 1 and the same pair is acceptable.
    config = load_experiment(EXPERIMENT, [*overrides, "algorithm.gamma=0.4"])
    assert config.env.A == [[1.5, 0.0], [0.0, 0.5]]


@pytest.mark.parametrize("R", ["[[-1.0]]", "[[0.0]]"])
def test_R_not_positive_definite(R):
    message = config_error(load_experiment, EXPERIMENT, [f"env.R={R}"])
    assert message.startswith("env.R") and "positive definite" in message


def test_Q_not_symmetric_and_W_not_psd():
    message = config_error(load_experiment, EXPERIMENT, ["env.Q=[[1.0,0.5],[0.0,0.1]]"])
    assert message.startswith("env.Q") and "symmetric" in message
    message = config_error(load_experiment, EXPERIMENT, ["env.W=[[0.01,0.0],[0.0,-0.01]]"])
    assert message.startswith("env.W") and "positive semi-definite" in message


def test_non_finite_matrix_entry():
    message = config_error(load_experiment, EXPERIMENT, ["env.A=[[.nan,0.1],[0.0,0.9]]"])
    assert message == "env.A[0][0]: must be a finite number (got nan)"


@pytest.mark.parametrize("gamma", ["1.0", "0", "1.5", "-0.1"])
def test_gamma_out_of_range(gamma):
    message = config_error(load_experiment, EXPERIMENT, [f"algorithm.gamma={gamma}"])
    assert message.startswith("algorithm.gamma"), message


def test_unknown_gymnasium_id():
    tree = read_yaml(EXPERIMENT)
    tree["env"] = {"id": "NoSuchEnv-v0"}
    message = config_error(parse_experiment, tree)
    assert message.startswith("env.id") and "'NoSuchEnv-v0'" in message


def test_gym_env_with_lqr_keys_names_them():
    tree = read_yaml(EXPERIMENT)
    tree["env"]["id"] = "Pendulum-v1"
    message = config_error(parse_experiment, tree)
    # The unknown keys of one section are listed once, with the reason they are unknown.
    assert message.startswith("env.A, env.B, env.Q, env.R, env.W, env.horizon, env.init_std: unknown keys for a "
                              "gymnasium environment, which takes only id and kwargs"), message
    assert message.count("unknown key") == 1


def test_switching_algorithm_by_name_alone_names_the_foreign_keys():
    # algorithm.name=sac keeps the file's ISFM-only keys, which SAC does not have.
    message = config_error(load_experiment, EXPERIMENT, ["algorithm.name=sac"])
    assert message.startswith("algorithm.num_candidates, algorithm.improve_at, algorithm.flow: unknown keys for "
                              "algorithm 'sac'"), message


def test_switching_algorithm_by_replacing_the_section():
    # A whole section is one override whose value is a YAML flow mapping; later dotted overrides apply on top.
    config = load_experiment(EXPERIMENT, [
        "algorithm={name: sac, gamma: 0.9, alpha: 0.05, autotune_alpha: false, hidden: [32, 32]}",
        "algorithm.batch_size=16",
    ])
    algo = config.algorithm
    assert algo.name == "sac" and algo.hidden == [32, 32] and algo.batch_size == 16
    assert (algo.gamma, algo.alpha, algo.autotune_alpha) == (0.9, 0.05, False)
    assert algo.q_lr == 1e-3  # the SAC default: nothing of the file's ISFM section is kept
    assert not hasattr(algo, "num_candidates")


def test_nested_unknown_key_inside_a_union_member_names_the_section_only():
    message = config_error(load_experiment, EXPERIMENT, ["algorithm.flow.stepz=3", "algorithm.lrr=1"])
    assert "algorithm.flow.stepz: unknown key (check the spelling" in message, message
    assert "algorithm.lrr: unknown key for algorithm 'isfm'" in message, message


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("0", 0), ("1", 1), ("0.5", 0.5)])
def test_learner_num_gpus_accepted(value, expected):
    assert load_experiment(EXPERIMENT, [f"learner.num_gpus={value}"]).learner.num_gpus == expected


@pytest.mark.parametrize("value", ["gpu", "-1", "true", "''", ".inf", ".nan"])
def test_learner_num_gpus_rejected(value):
    # Caught when the config is read, not after the run directory exists.
    message = config_error(load_experiment, EXPERIMENT, [f"learner.num_gpus={value}"])
    assert message.startswith("learner.num_gpus: must be 'auto' or a finite number >= 0 (got "), message


def test_registered_gymnasium_id_is_accepted():
    tree = read_yaml(EXPERIMENT)
    tree["env"] = {"id": "Pendulum-v1", "kwargs": {"g": 9.81}}
    config = parse_experiment(tree)
    assert config.env.id == "Pendulum-v1" and config.env.kwargs == {"g": 9.81}


@pytest.mark.parametrize("override, words", [
    ("seed", "key=value"),
    ("algorithm.q_lr", "key=value"),
    ("algorithm.q_lr=[1", "algorithm.q_lr"),
    ("seed.x=1", "seed is a value"),
    ("=5", "key before '='"),
    ("algorithm..q_lr=1", "without empty parts"),
    ("algorithm.=1", "without empty parts"),
])
def test_malformed_override(override, words):
    message = config_error(load_experiment, EXPERIMENT, [override])
    assert words in message
    assert override.split("=")[0] in message


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    message = config_error(load_experiment, path)
    assert message == f"{path}: not a UTF-8 text file (byte 0: invalid start byte)"


def test_control_character_is_a_one_line_yaml_error(tmp_path):
    # yaml's ReaderError has no problem_mark and a multi-line str(); the message must still be one line.
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"name: a\x00b\n")
    message = config_error(load_experiment, path)
    assert message.startswith(f"{path}: invalid YAML: unacceptable character #x0000"), message


def test_unreadable_file_is_a_config_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.yaml"
    path.write_text("name: x\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # chmod 000 does not stop root
    message = config_error(load_experiment, path)
    assert message == f"{path}: cannot be read (Permission denied)"
