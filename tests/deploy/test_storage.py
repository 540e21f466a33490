"""The experiment's ``storage``: runs go under it when --run-dir is not given, a bad one is refused with one line
(exit 2, nothing written), and a run directory inside Ray's temporary working directory gets a warning naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import tiny_experiment

from softflow.deploy.cli import main
from softflow.deploy.config import dump_config
from softflow.deploy.run.storage import in_ray_temp

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """A tiny serial experiment file (120 env steps) in ``tmp_path``, the working directory of the test."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "experiment.yaml"
    path.write_text(dump_config(tiny_experiment(total_env_steps=120)))
    return path


def train(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``softflow train`` in this process: (exit code, stdout, stderr lines)."""
    code = main(["train", *args, "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err.strip().splitlines()


def test_runs_go_under_storage(tmp_path, capsys, experiment):
    storage = tmp_path / "nfs" / "softflow-runs"
    code, out, err = train(capsys, str(experiment), f"storage={storage}")
    runs = list(storage.iterdir())
    assert code == 0 and len(runs) == 1 and runs[0].name.startswith("tiny-")
    assert (runs[0] / "summary.json").is_file() and (runs[0] / "checkpoints").is_dir()
    assert out.splitlines()[0].endswith(f"run directory {runs[0]}") and not (tmp_path / "runs").exists()
    assert not any("warning" in line for line in err)


@pytest.mark.parametrize("where", ["a file", "under a file", "a URI"])
def test_a_bad_storage_is_refused_with_one_line_and_nothing_written(tmp_path, capsys, experiment, where):
    (tmp_path / "file").write_text("x")
    storage = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "runs",
               "a URI": "s3://bucket/softflow-runs"}[where]
    before = sorted(tmp_path.rglob("*"))
    code, out, err = train(capsys, str(experiment), f"storage={storage}")
    assert code == 2 and len(err) == 1 and err[0].startswith("softflow: error: storage:"), err
    assert ("cloud URIs are not supported" if where == "a URI" else "is a file, not a directory") in err[0]
    assert sorted(tmp_path.rglob("*")) == before and out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the file cases cover this")
def test_a_read_only_storage_is_refused(tmp_path, capsys, experiment):
    storage = tmp_path / "read-only"
    storage.mkdir(mode=0o555)
    code, _, err = train(capsys, str(experiment), f"storage={storage}")
    assert code == 2 and len(err) == 1 and "cannot be written" in err[0] and not any(storage.iterdir())


def test_a_run_directory_in_rays_temporary_working_directory_is_warned_about(tmp_path, capsys, experiment,
                                                                             monkeypatch):
    """As in a Ray job submitted with --working-dir: the working directory is unpacked under the session's
    runtime_resources, and runs/ there is deleted with it."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    job_dir = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1" / "runtime_resources" / "working_dir_files"
    run_dir = job_dir / "_ray_pkg_0123456789abcdef" / "runs" / "tiny"
    code, _, err = train(capsys, str(experiment), "--run-dir", str(run_dir))
    warnings = [line for line in err if line.startswith("softflow: warning:")]
    assert code == 0 and len(warnings) == 1 and (run_dir / "summary.json").is_file()
    assert f"the run directory {run_dir} is inside Ray's temporary working directory" in warnings[0]
    assert "storage=/nfs/softflow-runs" in warnings[0]


def test_what_counts_as_rays_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "t"))
    assert in_ray_temp(tmp_path / "t" / "ray" / "session_latest" / "runs" / "x")
    assert in_ray_temp(tmp_path / "elsewhere" / "runtime_resources" / "working_dir_files" / "runs")
    assert not in_ray_temp(tmp_path / "t" / "ray" / "runs")
    assert not in_ray_temp(tmp_path / "nfs" / "softflow-runs" / "x")


def test_a_sweep_without_a_sweep_dir_goes_under_its_experiments_storage(tmp_path, monkeypatch):
    from softflow.deploy.sweep.tune import default_sweep_dir

    monkeypatch.chdir(tmp_path)
    stored = tiny_experiment().model_copy(update={"storage": str(tmp_path / "nfs")})
    assert default_sweep_dir("seeds", stored).parent == tmp_path / "nfs"
    assert default_sweep_dir("seeds", tiny_experiment()).parent == Path("runs")
    assert default_sweep_dir("seeds", stored).name.startswith("seeds-")
