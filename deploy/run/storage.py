"""Where run directories are created: the experiment's ``storage`` directory, or ``runs/`` in the working directory.

A run submitted as a Ray job with ``--working-dir`` runs in the copy of that directory that Ray unpacks under its
temporary directory (``<ray temp>/session_*/runtime_resources/working_dir_files/...``) and deletes later, so a run
directory there is lost. ``storage`` (a shared filesystem path: NFS, EFS, a mounted bucket) puts runs where they
outlive the job; :func:`ray_temp_warning` names the setting when a run directory would land in Ray's temporary
directory anyway. Cloud URIs (``s3://``, ``gs://``) are not supported: checkpoints and metrics are written as files.
"""

from __future__ import annotations

import os
from pathlib import Path

from softflow.deploy.config import ConfigError, ExperimentConfig
from softflow.deploy.run.failures import check_writable

DEFAULT_ROOT = Path("runs")
EXAMPLE = "storage=/nfs/softflow-runs"


def run_root(config: ExperimentConfig) -> Path:
    """The directory new runs go under: ``storage``, checked (a directory or creatable, writable; one line,
    ConfigError, nothing created otherwise), or ``runs/``."""
    if config.storage is None:
        return DEFAULT_ROOT
    root = Path(config.storage).expanduser()
    try:
        check_writable(root, "storage:")
    except ConfigError as exc:
        raise ConfigError(f"{exc} under which runs are created, e.g. {EXAMPLE}") from None
    return root


def ray_temp_dir() -> Path:
    """Ray's temporary directory on this machine (``$RAY_TMPDIR/ray``, ``$TMPDIR/ray`` or ``/tmp/ray``, as Ray
    chooses it)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def in_ray_temp(run_dir: Path) -> bool:
    """Whether ``run_dir`` lies in a directory Ray deletes: a job's unpacked ``runtime_resources`` or a Ray
    session directory."""
    resolved = Path(os.path.realpath(run_dir))
    if "runtime_resources" in resolved.parts:
        return True
    temp = Path(os.path.realpath(ray_temp_dir()))
    return resolved.is_relative_to(temp) and any(part.startswith("session_")
                                                   for part in resolved.relative_to(temp).parts)


def ray_temp_warning(run_dir: Path) -> str | None:
    """One warning line when ``run_dir`` would be deleted with Ray's temporary working directory, else None."""
    if not in_ray_temp(run_dir):
        return None
    return (f"softflow: warning: the run directory {run_dir} is inside Ray's temporary working directory "
            f"({os.path.realpath(run_dir)}), which Ray deletes after the job; set storage to a directory on "
            f"shared storage (e.g. {EXAMPLE}) or give --run-dir outside it")
