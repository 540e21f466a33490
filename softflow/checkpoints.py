"""Checkpoints as consistent sets: everything a run needs to continue, written together and switched in at once.

A run directory's ``checkpoints/`` holds sets named ``step-<env steps, 12 digits>``. Each set is written into a
staging directory (``.staging-<env steps>``) by the processes that own the state: the learner's ``learner.pt``
(networks, optimisers, alpha, counters, RNG state, the driver's counters, the config and spaces) and the replay
actor's ``replay.npz`` and ``limiter.json``. :func:`commit_set` then fsyncs every file, writes ``manifest.json``
(the env steps and updates, and each file's size and SHA-256), fsyncs the directory, renames it to its final name
(an atomic switch on one filesystem) and removes all but the newest ``keep`` sets. A crash or a full disk while
writing leaves at most a staging directory behind; the sets before it stay whole.

Reading: :func:`newest_set` returns the newest set whose manifest checks out (every file present, sizes and digests
matching) and a line for each newer set that does not, so that a damaged latest set falls back to the previous one
with a warning. Checkpoint files are loaded with ``torch.load(..., weights_only=True)``: a file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

SET_PREFIX = "step-"
STAGING_PREFIX = ".staging-"
MANIFEST = "manifest.json"
LEARNER_FILE = "learner.pt"


def set_name(env_steps: int) -> str:
    return f"{SET_PREFIX}{env_steps:012d}"


def staging_path(checkpoints: Path, env_steps: int) -> Path:
    """Where the set of ``env_steps`` is written before it is sealed (the writers create it)."""
    return checkpoints / f"{STAGING_PREFIX}{env_steps:012d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_set(staging: Path, env_steps: int, updates: int, keep: int) -> Path:
    """Seals ``staging`` (module docstring) as the set of ``env_steps`` and keeps the newest ``keep`` sets; returns
    the set's path. An ``OSError`` (a full disk) leaves the earlier sets as they were."""
    files = {}
    for path in sorted(staging.iterdir()):
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = staging / MANIFEST
    manifest.write_text(json.dumps({"env_steps": env_steps, "updates": updates, "files": files}, indent=2))
    _fsync(manifest)
    _fsync(staging)
    final = staging.parent / set_name(env_steps)
    if final.exists():  # a set of the same step (a checkpoint again at the end): the newer replaces it
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync(staging.parent)
    for old in sorted(p for p in staging.parent.iterdir() if p.name.startswith(SET_PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in staging.parent.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def set_problem(path: Path) -> str | None:
    """Why the set at ``path`` cannot be used, or None when its manifest checks out."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest ({type(exc).__name__})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None if LEARNER_FILE in files else f"the manifest lists no {LEARNER_FILE}"


def newest_set(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The newest whole set under ``checkpoints`` (None if there is none) and one line per newer, damaged set."""
    skipped = []
    if checkpoints.is_dir():
        for path in sorted((p for p in checkpoints.iterdir() if p.name.startswith(SET_PREFIX)), reverse=True):
            problem = set_problem(path)
            if problem is None:
                return path, skipped
            skipped.append(f"checkpoint {path} is damaged ({problem})")
    return None, skipped


class CheckpointError(pickle.UnpicklingError):
    """A file that does not load as a checkpoint without running code; the message is one line."""


def _problem(exc: Exception) -> str:
    """The gist of a load error in one line (torch's weights-only errors span paragraphs)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = next(line for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() + [""] if line.strip())
        detail = detail.split(" Please use ", 1)[0].strip().rstrip(".") or "an instruction it does not allow"
        return (f"it holds something other than tensors, numbers, strings, lists and dicts, and was refused "
                f"without running it ({detail})")
    return f"{type(exc).__name__}: {' '.join(text.split())[:300]}"


def load(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """A learner checkpoint file, loaded without running code (``weights_only``): tensors, numbers, strings,
    lists and dicts only. OSError if it cannot be read, CheckpointError if it is not such a file."""
    import torch

    try:
        with warnings.catch_warnings():  # a pickle of another protocol: a note on stderr before the refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # the unpickler and the zip reader raise many types for a file that is not one
        raise CheckpointError(_problem(exc)) from None
