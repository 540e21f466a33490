"""Crafted checkpoints: a pickle whose unpickling would create a marker file, planted as a run's newest whole
checkpoint set, is refused by every path that loads one (``softflow evaluate``, ``softflow.load_policy``, the policy
server at start and on a hot reload) with one line, and the marker file is never created. Also the replay buffer's
file: no object arrays, no generator named by the file other than numpy's."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import softflow
from softflow import checkpoints
from softflow.actors.replay import ReplayBuffer
from softflow.deploy.cli import USAGE_ERROR, main
from softflow.deploy.config import ConfigError

SCRIPT = Path(sys.executable).with_name("softflow")


class TouchesMarker:
    """Unpickling this calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


class RunsShell:
    """Unpickling this runs ``touch marker`` in a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_bytes(kind: str, marker: Path) -> bytes:
    """A learner.pt-like payload: the real keys, with code hidden in ``algorithm``."""
    state = {"spaces": {"obs_dim": 4, "low": [-3.0], "high": [3.0]}, "config": {}, "algorithm": TouchesMarker(marker)}
    if kind == "pickle-2":
        return pickle.dumps(state, protocol=2)
    if kind == "pickle-5":
        return pickle.dumps({**state, "algorithm": RunsShell(marker)}, protocol=5)
    path = marker.with_name("crafted.pt")
    torch.save(state, path)
    data = path.read_bytes()
    path.unlink()
    return data


KINDS = ["pickle-2", "pickle-5", "torch-zip"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    import helpers

    return helpers.train_tiny_run(tmp_path_factory.mktemp("good") / "run")


def plant(run: Path, payload: bytes) -> Path:
    """Seals ``payload`` as the learner.pt of a set newer than any in ``run``; returns the file."""
    newest, _ = checkpoints.newest_set(run / "checkpoints")
    steps = int(newest.name.removeprefix(checkpoints.SET_PREFIX)) + 1000
    staging = checkpoints.staging_path(run / "checkpoints", steps)
    staging.mkdir()
    (staging / checkpoints.LEARNER_FILE).write_bytes(payload)
    final = checkpoints.commit_set(staging, steps, steps, keep=10)
    assert checkpoints.newest_set(run / "checkpoints") == (final, [])
    return final / checkpoints.LEARNER_FILE


@pytest.fixture(params=KINDS)
def crafted_run(request, good_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the good run with a crafted newest set, and the marker its unpickling would create."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "marker"
    plant(run, crafted_bytes(request.param, marker))
    return run, marker


def one_line(message: str) -> str:
    assert message and "\n" not in message.rstrip("\n") and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("kind", KINDS)
def test_the_loader_refuses_a_crafted_file_with_one_line(tmp_path, kind):
    marker = tmp_path / "marker"
    file = tmp_path / "learner.pt"
    file.write_bytes(crafted_bytes(kind, marker))
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load(file)
    assert one_line(str(info.value)).startswith("it holds something other than tensors"), info.value
    assert not marker.exists()
    if kind == "torch-zip":  # the payload is live: an unsafe load runs it
        torch.load(file, weights_only=False)
    else:
        pickle.loads(file.read_bytes())
    assert marker.exists()


def test_evaluate_refuses_it(crafted_run, capsys):
    run, marker = crafted_run
    assert main(["evaluate", str(run), "--episodes", "1"]) == USAGE_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("softflow: error: ") and "is not a softflow checkpoint" in captured.err
    assert not marker.exists()


def test_load_policy_refuses_it(crafted_run):
    run, marker = crafted_run
    with pytest.raises(ConfigError, match="is not a softflow checkpoint: it holds something other than") as info:
        softflow.load_policy(run)
    one_line(str(info.value))
    assert not marker.exists()


def test_the_server_refuses_it_at_start(crafted_run, capsys):
    from softflow.deploy.serve.policy import load_served

    run, marker = crafted_run
    with pytest.raises(ConfigError, match="is not a softflow checkpoint"):
        load_served(run, torch.device("cpu"))
    assert main(["serve", str(run), "--port", "0"]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a softflow checkpoint" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle-5", "torch-zip"])
def test_the_server_keeps_its_policy_when_a_crafted_checkpoint_appears(good_run, tmp_path, caplog, kind):
    from softflow.deploy.serve.server import PolicyServer, ServeOptions

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "marker"
    with caplog.at_level(logging.WARNING, logger="softflow.serve"), PolicyServer(
            run, ServeOptions(port=0, reload_interval_s=0.05)) as server:
        served = server.served
        crafted = plant(run, crafted_bytes(kind, marker))
        deadline = time.monotonic() + 30
        while "not reloading" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.served is served
    assert f"not reloading {run}" in caplog.text and "it holds something other than tensors" in caplog.text
    assert str(crafted.parent.name) not in str(served.file)
    assert not marker.exists()


def test_evaluate_refuses_it_in_a_real_process(good_run, tmp_path):
    """Nothing else reaches stderr (torch's note on the pickle protocol, a traceback)."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "marker"
    plant(run, crafted_bytes("pickle-5", marker))
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "softflow.deploy.cli"]
    result = subprocess.run([*command, "evaluate", str(run)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == USAGE_ERROR and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("softflow: error: "), result.stderr
    assert not marker.exists()


def test_a_checkpoint_with_safe_but_wrong_contents_is_one_line(tmp_path):
    for state in ([1, 2, 3], {"spaces": "x", "config": {}}, {"spaces": {}, "config": {"seed": -1}}):
        file = tmp_path / "learner.pt"
        torch.save(state, file)
        with pytest.raises(ConfigError) as info:
            softflow.load_policy(file)
        assert one_line(str(info.value)).startswith(str(file)), info.value


def test_replay_files_hold_no_objects_and_name_only_numpy_generators(tmp_path):
    buffer = ReplayBuffer(8, 2, 1)
    buffer.save(tmp_path / "replay.npz")
    with np.load(tmp_path / "replay.npz") as data:
        arrays = dict(data)
    crafted = tmp_path / "objects.npz"
    np.savez(crafted, **{**arrays, "rewards": np.array([TouchesMarker(tmp_path / "marker")], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        ReplayBuffer.load(crafted)
    meta = json.loads(str(arrays["meta"][()]))
    meta["rng_state"]["bit_generator"] = "seed"
    np.savez(tmp_path / "generator.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(ValueError, match="unknown bit generator 'seed'"):
        ReplayBuffer.load(tmp_path / "generator.npz")
    assert not (tmp_path / "marker").exists()
