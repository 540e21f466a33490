"""Checkpoint sets (softflow/checkpoints.py): sealed with a manifest, switched in whole, pruned to the newest
``keep``; a damaged newest set is skipped for the one before it; a full disk mid-write leaves the earlier sets whole;
checkpoint files load without running code."""

from __future__ import annotations

import json
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_set

from softflow import checkpoints


def test_a_committed_set_has_a_manifest_that_checks_out(tmp_path):
    path = write_set(tmp_path, 1200)
    assert path.name == "step-000000001200" and checkpoints.set_problem(path) is None
    manifest = json.loads((path / checkpoints.MANIFEST).read_text())
    assert (manifest["env_steps"], manifest["updates"]) == (1200, 600)
    assert manifest["files"]["replay.npz"]["bytes"] == 1000
    assert not list(tmp_path.glob(".staging-*"))


def test_only_the_newest_sets_are_kept(tmp_path):
    for steps in (100, 200, 300, 400):
        write_set(tmp_path, steps, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000300", "step-000000000400"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_newest_set_falls_back_to_the_previous_one(tmp_path, damage):
    write_set(tmp_path, 100)
    newest = write_set(tmp_path, 200)
    replay = newest / "replay.npz"
    if damage == "truncate":
        replay.write_bytes(replay.read_bytes()[:10])
    elif damage == "flip":
        replay.write_bytes(b"y" + replay.read_bytes()[1:])
    elif damage == "delete":
        replay.unlink()
    else:
        (newest / checkpoints.MANIFEST).write_text("{not json")
    found, skipped = checkpoints.newest_set(tmp_path)
    assert found == tmp_path / "step-000000000100"
    assert len(skipped) == 1 and str(newest) in skipped[0] and "\n" not in skipped[0]


def test_no_whole_set_is_none(tmp_path):
    assert checkpoints.newest_set(tmp_path / "absent") == (None, [])
    only = write_set(tmp_path, 100)
    (only / checkpoints.LEARNER_FILE).unlink()
    found, skipped = checkpoints.newest_set(tmp_path)
    assert found is None and len(skipped) == 1


def test_a_full_disk_while_writing_leaves_the_earlier_set_whole(tmp_path):
    """A child process whose files may not grow past 64 kB (RLIMIT_FSIZE, as a full disk) tries to write a set of
    1 MB: it fails with an OSError, and the set written before it is still the newest whole one."""
    write_set(tmp_path, 100)
    script = (f"import resource, signal, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (65536, {resource.RLIM_INFINITY}))\n"
              "from helpers import write_set\nfrom pathlib import Path\n"
              f"try:\n    write_set(Path({str(tmp_path)!r}), 200, payload=b'z' * 2**20)\n"
              "except OSError as exc:\n    print('OSError', exc.errno)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("OSError"), result.stdout + result.stderr
    assert checkpoints.newest_set(tmp_path) == (tmp_path / "step-000000000100", [])


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/softflow-pwned"),))


def test_a_crafted_pickle_does_not_run_when_loaded(tmp_path):
    crafted = tmp_path / "learner.pt"
    crafted.write_bytes(pickle.dumps({"algorithm": RunsCode()}))
    Path("/tmp/softflow-pwned").unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load(crafted)
    assert not Path("/tmp/softflow-pwned").exists()
