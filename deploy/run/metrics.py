"""Run metrics: ``metrics.jsonl`` in the run directory, the W&B run, and the end-of-run files.

``MetricsLogger`` is the only code in softflow that talks to W&B; the run driver owns one per run. Every
``log(env_steps, metrics)`` call appends one JSON line to ``run_dir/metrics.jsonl`` and sends the same record to W&B,
so a run can be read and plotted with no W&B account. ``finish(summary)`` writes ``summary.json`` and
``learning_curve.png`` and closes the W&B run.

W&B mode. ``WandbConfig.mode="auto"`` logs online when an API key is configured (``WANDB_API_KEY`` or a ``.netrc``
entry for the W&B server) and offline otherwise; an explicit ``WANDB_MODE`` in the environment wins over the guess.
Offline runs land in ``run_dir/wandb/offline-run-*``; ``run_dir/WANDB.txt`` gives the ``wandb sync`` command that
uploads them later. If an online start fails (no network, bad key) the logger falls back to offline after
``ONLINE_INIT_TIMEOUT_S`` seconds instead of stopping the run.

Step handling. The step axis is ``env_steps`` (docs/architecture.md, Metrics). It is logged as an ordinary field
and declared
the x-axis of every metric with ``define_metric("*", step_metric="env_steps")``; ``wandb.log(..., step=...)`` is not
used. W&B drops any record whose ``step`` is not larger than the last one, and a run resumed from a checkpoint
re-logs env steps it had already reported before it was killed, so ``step=env_steps`` would silently lose the resumed
part of the curve. W&B's own ``_step`` counter stays monotonic whatever ``env_steps`` does.

Resuming. The W&B run id is kept in ``run_dir/wandb_id.txt``. ``resume=True`` reuses it (``resume="allow"``, so an
online run reattaches to the same W&B run) and appends to ``metrics.jsonl``; without it both start afresh. Offline,
each start of the run writes its own ``offline-run-*`` directory with the same id; ``wandb sync --id <id>`` uploads
them in order into one W&B run. The learning curve keeps, after a rewind in ``env_steps``, only the records logged
after it (see ``drop_rewound_records``).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import secrets
import shlex
import string
import sys
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LEARNING_CURVE_FILE = "learning_curve.png"
WANDB_INFO_FILE = "WANDB.txt"
WANDB_ID_FILE = "wandb_id.txt"

# Hosts whose .netrc entry `wandb login` writes: the classic W&B API and, from wandb 0.31, its CoreWeave Forge address.
WANDB_API_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
# Seconds an online start may take before the logger gives up and logs offline.
ONLINE_INIT_TIMEOUT_S = 30.0
RUN_ID_WAIT_S = 60.0  # how long a resumed run waits for a killed run's W&B service to let go of its run id
# Series drawn in learning_curve.png, with their legend labels.
CURVE_SERIES = {"train/episode_return": "training episodes", "eval/episode_return": "evaluation episodes"}
# Metrics whose W&B summary is their maximum over the run (the final value is in ``<name>_final``).
MAX_SUMMARY = ("eval/episode_return",)
# Legacy values of the WANDB_MODE environment variable and what they mean today.
_WANDB_MODE_ALIASES = {"online": "online", "offline": "offline", "disabled": "disabled",
                       "run": "online", "dryrun": "offline"}


class WandbConfig(BaseModel):
    """Where and how a run is recorded in Weights & Biases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "offline", "online", "disabled"] = Field(
        "auto", description="'auto': online when a W&B API key is configured, else offline; "
                            "'disabled': metrics.jsonl only")
    project: str = Field("softflow", description="W&B project the run belongs to")
    entity: str | None = Field(None, description="W&B user or team; None: the API key's default entity")
    group: str | None = Field(None, description="W&B group, e.g. one per sweep, so its runs are shown together")
    tags: list[str] = Field(default_factory=list, description="W&B tags of the run")


def resolve_wandb_mode(config: WandbConfig) -> str:
    """Returns the mode to start W&B in: 'online', 'offline' or 'disabled'.

    An explicit mode is returned as is. 'auto' follows ``WANDB_MODE`` when the environment sets it, and otherwise
    is 'online' when an API key is configured and 'offline' when not.
    """
    if config.mode != "auto":
        return config.mode
    env_mode = _WANDB_MODE_ALIASES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env_mode:
        return env_mode
    return "online" if _api_key_configured() else "offline"


def _api_key_configured() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY`` or a ``.netrc`` entry for a W&B API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    hosts = list(WANDB_API_HOSTS)
    if base_url := os.environ.get("WANDB_BASE_URL"):
        hosts.append(urlsplit(base_url).netloc)
    return _netrc_has_password(_netrc_path(), hosts)


def _netrc_path() -> Path:
    """The ``.netrc`` file W&B reads: ``$NETRC`` when set, else ``~/.netrc``."""
    return Path(os.environ["NETRC"]) if os.environ.get("NETRC") else Path.home() / ".netrc"


def _netrc_has_password(path: Path, hosts: list[str]) -> bool:
    """Whether the netrc file at ``path`` holds a password for one of ``hosts``; an unreadable file holds none."""
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entry := entries.authenticators(host)) and entry[2] for host in hosts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order; blank lines and a line cut short by a kill are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "env_steps" in record:
            records.append(record)
    return records


def drop_rewound_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that describe the run as it finally went, for a run that was resumed from a checkpoint.

    A record whose ``env_steps`` is lower than the one before it starts a resumed segment: the records logged
    earlier at that many env steps or more are replaced by it and what follows.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        if kept and record["env_steps"] < kept[-1]["env_steps"]:
            kept = [old for old in kept if old["env_steps"] < record["env_steps"]]
        kept.append(record)
    return kept


def plot_learning_curve(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Draws the training and evaluation episode returns against env steps into a PNG at ``path``.

    A series with no finite values is left out. Uses matplotlib's Agg canvas directly, so it needs no display and
    leaves pyplot's global state alone.
    """
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label in CURVE_SERIES.items():
        points = [(r["env_steps"], r[key]) for r in records if _is_finite_number(r.get(key))]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=label)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no episode returns logged", ha="center", va="center", transform=axes.transAxes)
    axes.set_title(title)
    axes.set_xlabel("environment steps")
    axes.set_ylabel("episode return")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return Path(path)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_scalar(value: Any) -> Any:
    """JSON encoder fallback for numpy and torch scalars, which have ``.item()``."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _open_metrics_file(path: Path, resume: bool):
    """Opens ``metrics.jsonl`` for appending when resuming (after ending a line a kill cut short), else truncates it."""
    if not resume:
        return path.open("w")
    cut_short = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    file = path.open("a")
    if cut_short:
        file.write("\n")
    return file


def _run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id: the stored one when resuming and there is one, else a new one, which is stored."""
    id_file = run_dir / WANDB_ID_FILE
    stored = id_file.read_text().strip() if resume and id_file.exists() else ""
    if stored:
        return stored
    run_id = _new_run_id()
    id_file.write_text(run_id + "\n")
    return run_id


def _new_run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, the form W&B generates itself."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def offline_run_dirs(run_dir: Path, run_id: str) -> list[Path]:
    """The offline run directories of this W&B run id, oldest first.

    W&B names them ``offline-run-<YYYYMMDD_HHMMSS>-<id>``, adding ``-1``, ``-2``, ... to a name already taken by a
    start in the same second.
    """
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*"):
        if match := pattern.fullmatch(path.name):
            found.append(((match[1], int(match[2] or 0)), path))
    return [path for _, path in sorted(found)]


def sync_command(offline_dirs: list[Path], run_id: str) -> str:
    """The shell command that uploads the offline run directories into one W&B run."""
    paths = " ".join(shlex.quote(str(d.resolve())) for d in offline_dirs)
    if len(offline_dirs) > 1:
        return f"wandb sync --id {shlex.quote(run_id)} {paths}"
    return f"wandb sync {paths}"


class MetricsLogger:
    """Writes a run's metrics to ``metrics.jsonl`` and to W&B, and its end-of-run files.

    ``run_dir``: the run directory (created if missing). ``run_name``: the W&B run name and the plot title.
    ``config``: the resolved experiment config, stored as the W&B run config. ``resume``: continue the run recorded in
    ``run_dir`` (same W&B run id, metrics appended) instead of starting afresh.
    """

    def __init__(self, run_dir: Path, run_name: str, config: dict, wandb_config: WandbConfig, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name
        self.metrics_path = self.run_dir / METRICS_FILE
        self._metrics_file = _open_metrics_file(self.metrics_path, resume)
        self.mode = resolve_wandb_mode(wandb_config)
        self.run_id: str | None = None
        self._run = None
        fallback_reason = None
        if self.mode != "disabled":
            self.run_id = _run_id(self.run_dir, resume)
            self._run, self.mode, fallback_reason = self._start_wandb(config, wandb_config, self.mode)
        info_lines, self.status_line = self._describe(fallback_reason)
        (self.run_dir / WANDB_INFO_FILE).write_text("\n".join(info_lines) + "\n")
        print(self.status_line, file=sys.stderr)

    def _start_wandb(self, config: dict, wandb_config: WandbConfig, mode: str):
        """Starts the W&B run; returns it, the mode it runs in, and why online fell back to offline (or None)."""
        import wandb  # here, not at the top: importing wandb costs a second that only W&B runs should pay

        try:
            return self._init_held_id(config, wandb_config, mode), mode, None
        except wandb.Error as error:
            if mode != "online":
                raise
            reason = str(error).splitlines()[0]
            wandb.teardown()  # the failed start keeps the run id taken until the W&B service process stops
            return self._init_held_id(config, wandb_config, "offline"), "offline", reason

    def _init_held_id(self, config: dict, wandb_config: WandbConfig, mode: str):
        """:meth:`_init_wandb`, waiting while the run id is still "in use": a run resumed after its driver was
        SIGKILLed finds the dead driver's W&B service still holding the id until that process notices and exits.
        After ``RUN_ID_WAIT_S`` the resumed run logs to a new W&B run (its id stored) rather than stopping."""
        import wandb

        deadline = time.monotonic() + RUN_ID_WAIT_S
        while True:
            try:
                return self._init_wandb(config, wandb_config, mode)
            except Exception as error:  # wandb's ServerResponseError is no wandb.Error
                if "in use" not in str(error):
                    raise
                wandb.teardown()
                if time.monotonic() > deadline:
                    old, self.run_id = self.run_id, _run_id(self.run_dir, resume=False)
                    print(f"softflow: warning: W&B run {old} is still held by a process of the run before; "
                          f"logging to W&B run {self.run_id} instead", file=sys.stderr)
                    return self._init_wandb(config, wandb_config, mode)
                time.sleep(1.0)

    def _init_wandb(self, config: dict, wandb_config: WandbConfig, mode: str):
        import wandb

        # Global settings first: they silence wandb's terminal messages from before the run exists (the login line).
        wandb.setup(settings=wandb.Settings(silent=True))
        settings = wandb.Settings(
            silent=True,
            console="off",  # the terminal belongs to the progress display; no stdout capture into the W&B run
            init_timeout=ONLINE_INIT_TIMEOUT_S,
        )
        run = wandb.init(
            mode=mode, dir=self.run_dir, id=self.run_id, resume="allow", name=self.run_name, config=config,
            project=wandb_config.project, entity=wandb_config.entity, group=wandb_config.group,
            tags=list(wandb_config.tags), settings=settings,
        )
        run.define_metric("env_steps")
        run.define_metric("*", step_metric="env_steps")
        for name in MAX_SUMMARY:
            run.define_metric(name, step_metric="env_steps", summary="max")
        return run

    def _describe(self, fallback_reason: str | None) -> tuple[list[str], str]:
        """The lines of ``WANDB.txt`` and the one status line printed to the terminal."""
        info_path = self.run_dir / WANDB_INFO_FILE
        if self.mode == "disabled":
            return (["W&B mode: disabled", f"No W&B run; the metrics are in {self.metrics_path.resolve()}"],
                    f"W&B disabled; metrics in {self.metrics_path}")
        lines = [f"W&B mode: {self.mode}", f"W&B run id: {self.run_id}"]
        if fallback_reason:
            lines.append(f"Online start failed, logging offline instead: {fallback_reason}")
        if self.mode == "online":
            lines += [f"Run page: {self._run.url}", f"Local copy: {Path(self._run.dir).parent.resolve()}"]
            return lines, f"W&B online: {self._run.url}"
        offline_dirs = offline_run_dirs(self.run_dir, self.run_id)
        command = sync_command(offline_dirs, self.run_id)
        lines += ["Offline run directories, one per start of this run, oldest first:",
                  *(f"  {d.resolve()}" for d in offline_dirs),
                  "Upload them to W&B (needs network and `wandb login`) with:", f"  {command}"]
        return lines, f"W&B offline: {Path(self._run.dir).parent} (to upload later see {info_path})"

    def log(self, env_steps: int, metrics: dict[str, Any]) -> None:
        """Records ``metrics`` (docs/architecture.md names: ``train/episode_return``, ...) at ``env_steps``."""
        record = {"env_steps": env_steps, **metrics}
        self._metrics_file.write(json.dumps(record, default=_json_scalar) + "\n")
        self._metrics_file.flush()
        if self._run is not None:
            self._run.log(record)

    def abort(self) -> None:
        """Closes the metrics file and marks the W&B run failed (a run that stopped early); metrics.jsonl keeps
        every record written so far."""
        self._metrics_file.close()
        if self._run is not None:
            self._run.finish(exit_code=1)
            self._run = None

    def finish(self, summary: dict[str, Any]) -> dict[str, Path]:
        """Writes ``summary.json`` and ``learning_curve.png``, closes the W&B run; returns the paths written."""
        self._metrics_file.close()
        summary_path = self.run_dir / SUMMARY_FILE
        summary_path.write_text(json.dumps(summary, indent=2, default=_json_scalar) + "\n")
        records = drop_rewound_records(read_metrics(self.metrics_path))
        curve_path = plot_learning_curve(records, self.run_dir / LEARNING_CURVE_FILE,
                                         f"{self.run_name}: episode return")
        if self._run is not None:
            final = json.loads(summary_path.read_text())
            self._run.summary.update({f"{k}_final" if k in MAX_SUMMARY else k: v for k, v in final.items()})
            self._run.finish()
            self._run = None
        return {"summary": summary_path, "learning_curve": curve_path}
