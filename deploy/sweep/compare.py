"""``softflow report RUN_OR_SWEEP_DIR... [--out DIR]``: the comparison sweeps exist for.

Each path is a run directory (it holds config.yaml) or a directory holding runs (a sweep directory, or any folder of
runs, searched below it). Runs are grouped by (algorithm, task) from their config.yaml; the task is ``env.id``, with
``:<n>task`` for FrankaKitchen's ``tasks_to_complete``. Per run: the final evaluation return (summary.json's, else the
last evaluation in metrics.jsonl), the best one (the maximum of all its evaluations), the same for
``eval/task_fraction`` where logged, the wall-clock seconds (a sweep trial's trial.json, else the time from
config.yaml's writing to summary.json's) and the env steps/s over them (the last env step over the wall time; the
mean of the logged ``actors/env_steps_per_s`` when the wall time is unknown).

Per group the report gives the IQM of the runs' final and best returns with 95 % stratified-bootstrap confidence
intervals (stats.py; the runs of a group in the order found, the paths as given and the runs below one sorted, which
with ``--seed`` fixes the draws), and the mean wall time and env steps/s. The out directory gets ``report.md`` (that
table), ``report.csv`` (the same, one column per number), ``curves.png`` (the IQM of eval/episode_return against env
steps per group, runs interpolated onto the union of their evaluation steps, with a bootstrap band), ``final.png``
(final and best IQM with their intervals) and ``profile.png`` (per algorithm, the fraction of its runs whose final
return, min-max normalised per task over all runs of that task, exceeds tau, with a band).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from softflow.deploy.config import ConfigError
from softflow.deploy.run.metrics import drop_rewound_records, read_metrics
from softflow.deploy.sweep import stats

RETURN, FRACTION, RATE = "eval/episode_return", "eval/task_fraction", "actors/env_steps_per_s"
_SKIP = {"wandb", "tune", "checkpoints", "report"}


@dataclass
class Run:
    """What the report needs of one run directory."""

    path: Path
    algorithm: str
    task: str
    curve: list[tuple[int, float]]
    final: float
    best: float
    fraction: tuple[float, float] | None = None  # final and best eval/task_fraction
    rate: float | None = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories at or below ``paths``; ConfigError for a path that does not exist or holds no run."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory (give run or sweep directories)")
        if (path / "config.yaml").is_file():
            found.append(path)
            continue
        runs = sorted(p.parent for p in path.rglob("config.yaml") if not _SKIP & set(p.relative_to(path).parts[:-1]))
        if not runs:
            raise ConfigError(f"{path}: no runs found (a run directory holds config.yaml and metrics.jsonl)")
        found += runs
    return list(dict.fromkeys(found))


def task_of(config: dict[str, Any]) -> str:
    env = config.get("env") or {}
    tasks = (env.get("kwargs") or {}).get("tasks_to_complete")
    return f"{env.get('id', '?')}:{len(tasks)}task" if tasks else str(env.get("id", "?"))


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_run(path: Path) -> Run:
    """One run directory; ConfigError (one line) when it has no metrics or no evaluation return."""
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    metrics = path / "metrics.jsonl"
    records = drop_rewound_records(read_metrics(metrics)) if metrics.is_file() else []
    if not records:
        raise ConfigError(f"{path}: a run without metrics (metrics.jsonl missing or empty)")
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    curve = [(r["env_steps"], v) for r in records if (v := _number(r.get(RETURN))) is not None]
    final = _number(summary.get(RETURN))
    if final is not None:
        curve = [p for p in curve if p[0] < summary.get("env_steps", math.inf)] + [(summary["env_steps"], final)]
    if not curve:
        raise ConfigError(f"{path}: no {RETURN} in metrics.jsonl or summary.json (the run never evaluated)")
    fractions = [v for r in records if (v := _number(r.get(FRACTION))) is not None]
    if _number(summary.get(FRACTION)) is not None:
        fractions.append(float(summary[FRACTION]))
    rates = [v for r in records if (v := _number(r.get(RATE))) is not None]
    wall_s = None
    if (path / "trial.json").is_file():
        wall_s = _number(json.loads((path / "trial.json").read_text()).get("wall_s"))
    elif summary_file.is_file():
        wall_s = summary_file.stat().st_mtime - (path / "config.yaml").stat().st_mtime
    steps = summary.get("env_steps", records[-1]["env_steps"])
    rate = steps / wall_s if wall_s else float(np.mean(rates)) if rates else None
    return Run(path, str((config.get("algorithm") or {}).get("name", "?")), task_of(config), curve, curve[-1][1],
               max(v for _, v in curve), (fractions[-1], max(fractions)) if fractions else None, rate, wall_s)


def summarise(runs: list[Run], reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (algorithm, task): runs, IQM and interval of the final and best return (and task fraction), the
    mean wall time and env steps/s."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.algorithm, run.task)].append(run)
    rows = []
    for (algorithm, task), members in sorted(groups.items()):
        row: dict[str, Any] = {"algorithm": algorithm, "task": task, "runs": len(members)}
        series = {"final": [r.final for r in members], "best": [r.best for r in members]}
        if all(r.fraction for r in members):
            series |= {"task_fraction_final": [r.fraction[0] for r in members],
                       "task_fraction_best": [r.fraction[1] for r in members]}
        for name, values in series.items():
            row[f"{name}_iqm"], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = stats.interval([values], reps=reps,
                                                                                              seed=seed)
        for name, values in (("wall_s", [r.wall_s for r in members]), ("env_steps_per_s", [r.rate for r in members])):
            known = [v for v in values if v is not None]
            row[name] = float(np.mean(known)) if known else None
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], name: str) -> str:
    if row.get(f"{name}_iqm") is None:
        return "-"
    return f"{row[f'{name}_iqm']:.4g} [{row[f'{name}_ci_low']:.4g}, {row[f'{name}_ci_high']:.4g}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report table: IQM [95 % CI] of the final and best return (and task fraction where any group has it)."""
    fraction = any("task_fraction_final_iqm" in row for row in rows)
    head = ["algorithm", "task", "runs", "final return IQM [95% CI]", "best return IQM [95% CI]"]
    head += ["final task fraction IQM [95% CI]", "best task fraction IQM [95% CI]"] if fraction else []
    head += ["wall s", "env steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["algorithm"], row["task"], str(row["runs"]), _cell(row, "final"), _cell(row, "best")]
        cells += [_cell(row, "task_fraction_final"), _cell(row, "task_fraction_best")] if fraction else []
        cells += [f"{row[k]:.0f}" if row[k] is not None else "-" for k in ("wall_s", "env_steps_per_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def report(paths: list[str | Path], out: Path, reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Reads the runs, writes report.md, report.csv and the PNGs into ``out``, prints the table; returns the rows."""
    from softflow.deploy.sweep.plots import plot_curves, plot_final, plot_profile

    runs = [read_run(path) for path in find_runs(paths)]
    rows = summarise(runs, reps, seed)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "report.md").write_text(f"# softflow report\n\n{len(runs)} runs in {len(rows)} groups (algorithm, "
                                   f"task); IQM over runs with 95 % stratified-bootstrap confidence intervals "
                                   f"({reps} resamples, seed {seed}).\n\n{table}\n"
                                   "![learning curves](curves.png)\n![final and best](final.png)\n"
                                   "![performance profile](profile.png)\n")
    write_csv(rows, out / "report.csv")
    plot_curves(runs, out / "curves.png", seed)
    plot_final(rows, out / "final.png")
    plot_profile(runs, out / "profile.png", seed)
    print(table, end="")
    print(f"report: {out / 'report.md'}, {out / 'report.csv'}, curves.png, final.png, profile.png in {out}")
    return rows
