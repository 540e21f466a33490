"""Tests for the ``softflow train`` command: a bad experiment or override must end with exit code 2 and exactly one
``softflow: error: ...`` line on stderr that names the key and the problem, no traceback, and no run directory.

Every bad input goes through ``main()`` in-process (cheap); a few go through the installed ``softflow`` script in a
real subprocess (about 4 s each, mostly importing torch) to prove the exit code and the bare stderr end to end:
nothing else may print to stderr on the way (imports, warnings, notices)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softflow.deploy.cli import USAGE_ERROR, main

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "cluster" / "experiments" / "lqr-isfm.yaml"
SCRIPT = Path(sys.executable).with_name("softflow")  # the console script pip installed next to this python

# Experiment files written into tmp_path by name; any other name is used as is (relative names do not exist).
FILES = {
    "broken.yaml": b"name: broken\nseed: 0\nenv: id: LQR\n",
    "binary.yaml": b"\xff\xfe\x00binary",
    "list.yaml": b"- env\n- algorithm\n",
}

# (id, experiment, overrides, the start of the error line after "softflow: error: "; {tmp} is tmp_path)
BAD_INPUTS = [
    ("missing-file", "nope.yaml", [], "experiment file '{tmp}/nope.yaml' not found"),
    ("directory", ".", [], "experiment file '{tmp}' not found"),
    ("invalid-yaml", "broken.yaml", [],
     "{tmp}/broken.yaml: invalid YAML at line 3, column 8: mapping values are not allowed here"),
    ("not-utf8", "binary.yaml", [], "{tmp}/binary.yaml: not a UTF-8 text file"),
    ("not-a-mapping", "list.yaml", [], "{tmp}/list.yaml: the top level must be a mapping"),
    ("unknown-top-level-key", EXPERIMENT, ["seeed=1"], "seeed: unknown key (check the spelling"),
    ("unknown-nested-key", EXPERIMENT, ["algorithm.lrr=1"], "algorithm.lrr: unknown key for algorithm 'isfm'"),
    ("unknown-deep-key", EXPERIMENT, ["algorithm.flow.stepz=3"], "algorithm.flow.stepz: unknown key"),
    ("unknown-section-key", EXPERIMENT, ["replay.capacty=10"], "replay.capacty: unknown key"),
    ("wrong-type-int", EXPERIMENT, ["algorithm.batch_size=abc"],
     "algorithm.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    ("wrong-type-matrix", EXPERIMENT, ["env.A=abc"], "env.A: Input should be a valid list (got 'abc')"),
    ("wrong-type-section", EXPERIMENT, ["learner=3"], "learner: Input should be a valid dictionary"),
    ("out-of-range", EXPERIMENT, ["replay.updates_per_step=0"],
     "replay.updates_per_step: must be > 0 (got 0)"),
    ("gamma-not-discounted", EXPERIMENT, ["algorithm.gamma=1.0"], "algorithm.gamma: must be in (0, 1) (got 1.0)"),
    ("gamma-above-one", EXPERIMENT, ["algorithm.gamma=1.5"], "algorithm.gamma: must be in (0, 1) (got 1.5)"),
    ("negative-seed", EXPERIMENT, ["seed=-1"], "seed: must be in [0, 4294967295] (got -1)"),
    ("zero-policy-frequency", EXPERIMENT, ["algorithm.policy_frequency=0"],
     "algorithm.policy_frequency: must be >= 1 (got 0)"),
    ("infinite-ratio", EXPERIMENT, ["replay.updates_per_step=.inf"],
     "replay.updates_per_step: must be a finite number > 0 (got inf)"),
    ("nan-learning-rate", EXPERIMENT, ["algorithm.q_lr=.nan"], "algorithm.q_lr: must be a finite number > 0 (got nan)"),
    ("negative-width", EXPERIMENT, ["algorithm.flow.hidden=[-1]"], "algorithm.flow.hidden[0]: must be >= 1 (got -1)"),
    ("no-widths", EXPERIMENT, ["algorithm.flow.hidden=[]"], "algorithm.flow.hidden: must have at least 1 item(s)"),
    ("zero-batch-size", EXPERIMENT, ["algorithm.batch_size=0"], "algorithm.batch_size: must be >= 1 (got 0)"),
    ("odd-time-embedding", EXPERIMENT, ["algorithm.flow.time_dim=33"],
     "algorithm.flow.time_dim: must be a multiple of 2 (got 33)"),
    ("tau-zero", EXPERIMENT, ["algorithm.tau=0"], "algorithm.tau: must be in (0, 1] (got 0)"),
    ("infinite-matrix-entry", EXPERIMENT, ["env.W=[[.inf,0],[0,1]]"], "env.W[0][0]: must be a finite number (got inf)"),
    ("negative-resource", EXPERIMENT, ["learner.resources={gpu_node: -1}"],
     "learner.resources.gpu_node: must be >= 0 (got -1)"),
    ("infinite-gpus", EXPERIMENT, ["learner.num_gpus=.inf"],
     "learner.num_gpus: must be 'auto' or a finite number >= 0"),
    ("heads-do-not-divide", EXPERIMENT, ["algorithm.flow={velocity: decoded, d_model: 10, heads: 3}"],
     "algorithm.flow.d_model must be a multiple of algorithm.flow.heads"),
    ("name-escapes-runs", EXPERIMENT, ["name=../../elsewhere"], "name: must be 1 to 100 characters without '/'"),
    ("string-for-number", EXPERIMENT, ["algorithm.gamma=high"], "algorithm.gamma: Input should be a valid number"),
    ("shape-B-rows", EXPERIMENT, ["env.B=[[0.0],[1.0],[2.0]]"], "env.B has 3 rows but must have n = 2 rows"),
    ("shape-A-not-square", EXPERIMENT, ["env.A=[[1.0,0.1]]"], "env.A has shape (1, 2) but must be square"),
    ("shape-Q", EXPERIMENT, ["env.Q=[[1.0]]"], "env.Q has shape (1, 1) but must be 2x2"),
    ("not-stabilisable", EXPERIMENT, ["env.A=[[2,0],[0,1]]", "env.B=[[0],[1]]"],
     "env.A, env.B: (A, B) is not stabilisable at gamma=0.9: the mode of A with eigenvalue 2 is unstable"),
    ("R-not-positive-definite", EXPERIMENT, ["env.R=[[-1]]"],
     "env.R must be positive definite (every action must cost something) but its smallest eigenvalue is -1"),
    ("override-without-equals", EXPERIMENT, ["algorithm.q_lr=1e-3", "seed"],
     "override 'seed' must look like key=value"),
    ("override-empty-key", EXPERIMENT, ["=5"], "override '=5': the key before '=' must be a dotted name"),
    ("override-bad-yaml", EXPERIMENT, ["env.A=[[1.0,0.1],[0.0,0.9]"],
     "override env.A: the value '[[1.0,0.1],[0.0,0.9]' is not valid YAML (expected ',' or ']'"),
    ("override-into-a-value", EXPERIMENT, ["seed.x=1"], "override seed.x: seed is a value, not a section"),
    ("unknown-algorithm", EXPERIMENT, ["algorithm.name=foo"], "algorithm: Input tag 'foo' found using 'name'"),
    ("algorithm-switch-by-name", EXPERIMENT, ["algorithm.name=sac"],
     "algorithm.num_candidates, algorithm.improve_at, algorithm.flow: unknown keys for algorithm 'sac'"),
    ("bad-num-gpus", EXPERIMENT, ["learner.num_gpus=gpu"],
     "learner.num_gpus: must be 'auto' or a finite number >= 0 (got 'gpu')"),
    ("unknown-gym-id", EXPERIMENT, ["env={id: NoSuchEnv-v0}"], "env.id: unknown environment 'NoSuchEnv-v0'"),
]


def experiment_path(tmp_path: Path, experiment: str | Path) -> Path:
    if isinstance(experiment, Path):
        return experiment
    if experiment in FILES:
        (tmp_path / experiment).write_bytes(FILES[experiment])
    return tmp_path / experiment


def expected_line(expected: str, tmp_path: Path) -> str:
    return "softflow: error: " + expected.replace("{tmp}", str(tmp_path))


def check_usage_error(returncode: int, stdout: str, stderr: str, tmp_path: Path, run_dir: Path) -> str:
    """Exit 2, one ``softflow: error:`` line on stderr, nothing on stdout, no traceback, nothing created."""
    output = stdout + stderr
    assert "Traceback" not in output, output
    assert returncode == USAGE_ERROR == 2, output
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), repr(stderr)
    line = lines[0]
    assert line.startswith("softflow: error: ") and line.removeprefix("softflow: error: ").strip(), line
    assert stdout == "", stdout
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()  # nor a default run directory
    return line


@pytest.mark.filterwarnings("error")  # a warning would be a second stderr line in a real run
@pytest.mark.parametrize("experiment, overrides, expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_in_process(tmp_path, monkeypatch, capsys, experiment, overrides, expected):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    argv = ["train", str(experiment_path(tmp_path, experiment)), *overrides, "--run-dir", str(run_dir),
            "--no-progress"]
    returncode = main(argv)
    captured = capsys.readouterr()
    line = check_usage_error(returncode, captured.out, captured.err, tmp_path, run_dir)
    assert line.startswith(expected_line(expected, tmp_path)), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error(tmp_path, monkeypatch, capsys):
    # A valid name for a device that is not there: caught by train() before it creates the run directory.
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    returncode = main(["train", str(EXPERIMENT), "learner.num_gpus=1", "--run-dir", str(run_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert captured.out.startswith("softflow: training 'lqr-isfm'")  # the banner comes before train()
    check_usage_error(returncode, "", captured.err, tmp_path, run_dir)
    assert captured.err.startswith("softflow: error: learner.num_gpus=1 but no CUDA device")


def run_cli(tmp_path: Path, experiment: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs the installed ``softflow train`` from ``tmp_path`` with ``--run-dir`` inside it."""
    run_dir = tmp_path / "run"
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "train", str(experiment), *overrides, "--run-dir", str(run_dir), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return result, run_dir


# One real process per kind of failure: before validation (reading the file; overrides fail at the same point),
# pydantic validation, the LQR checks (numpy/scipy), and the gymnasium registry (importing gymnasium_robotics
# prints a notice to stderr, which the in-process test cannot see once the module is imported).
SUBPROCESS_CASES = ["missing-file", "unknown-nested-key", "not-stabilisable", "unknown-gym-id"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_subprocess(tmp_path, name):
    (experiment, overrides, expected), = [case[1:] for case in BAD_INPUTS if case[0] == name]
    result, run_dir = run_cli(tmp_path, experiment_path(tmp_path, experiment), *overrides)
    line = check_usage_error(result.returncode, result.stdout, result.stderr, tmp_path, run_dir)
    assert line.startswith(expected_line(expected, tmp_path)), line


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:1", "softflow: error: --address 127.0.0.1:1: no Ray cluster answers there"),
    ("localhost:notaport", "softflow: error: --address localhost:notaport: no Ray cluster answers there"),
])
def test_an_address_with_no_cluster_behind_it_is_a_usage_error(tmp_path, monkeypatch, address, expected):
    """Fails in seconds (Ray itself would retry for minutes), before any run directory is written. ('auto' is not
    tested: it joins whatever Ray happens to run on the machine.)"""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ip = REPO / "cluster" / "experiments" / "inverted-pendulum.yaml"
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    run_dir = tmp_path / "run"
    result = subprocess.run([*command, "train", str(ip), "--address", address, "--run-dir", str(run_dir),
                             "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    line = check_usage_error(result.returncode, "", result.stderr, tmp_path, run_dir)
    assert line.startswith(expected), line
