"""What a sweep leaves: each trial's metrics condensed to one number each, results.csv, results.json, sweep.png,
the printed table and the scaling efficiency (deploy/sweep/spec.py has the sweep file's format)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from softflow.deploy.config import RunStopped
from softflow.deploy.sweep.spec import SCALING, THROUGHPUT, SweepConfig, short_value

# Columns of the table after the swept keys and the metric, when reported and not the metric itself.
HEADLINE = [THROUGHPUT, "learner/updates_per_s", "eval/episode_return", "env_steps", "wall_s"]
# Keys Tune adds to every reported result; not ours.
_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
              "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
              "iterations_since_restore", "experiment_tag", "should_checkpoint"}


def condense_metrics(records: list[dict[str, Any]], learning_starts: int) -> dict[str, float]:
    """One number per metric of a run's metrics.jsonl: rates (``*_per_s``) are the mean over the reports whose
    window began at or after ``learner.learning_starts`` (the policy acting; before it, actions are uniform random
    and the learner idle), or over all reports when none did; any other metric is its last reported value."""
    last: dict[str, float] = {}
    rates: dict[str, list[float]] = defaultdict(list)
    all_rates: dict[str, list[float]] = defaultdict(list)
    previous = 0
    for record in records:
        for key, value in record.items():
            if key == "env_steps" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("_per_s"):
                all_rates[key].append(value)
                if previous >= learning_starts:
                    rates[key].append(value)
            else:
                last[key] = value
        previous = record["env_steps"]
    return last | {key: float(sum(v) / len(v)) for key, v in ((k, rates.get(k) or all_rates[k]) for k in all_rates)}


def scaling_efficiency(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Env steps/s with n actors over n/n0 x env steps/s with the fewest actors n0 (1 in the usual sweep), each the
    mean over the trials with that many actors; also written into each row."""
    by_count: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get(THROUGHPUT), (int, float)):
            by_count[int(row["actors.count"])].append(row[THROUGHPUT])
    if not by_count or min(by_count) < 1:
        return {}
    n0 = min(by_count)
    base = sum(by_count[n0]) / len(by_count[n0]) / n0  # steps/s per actor at the smallest count
    for row in rows:
        if isinstance(row.get(THROUGHPUT), (int, float)):
            row[SCALING] = row[THROUGHPUT] / (row["actors.count"] * base)
    return {n: sum(v) / len(v) / (n * base) for n, v in sorted(by_count.items())}


def scaling_by_envs(rows: list[dict[str, Any]]) -> dict[int | None, dict[int, float]]:
    """:func:`scaling_efficiency` within each ``actors.envs_per_actor`` swept (None when it is not): n actors with e
    envs each are compared with the fewest actors at the same e."""
    groups: dict[int | None, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        envs = row.get("actors.envs_per_actor")
        groups[None if envs is None else int(envs)].append(row)
    return {envs: found for envs, group in groups.items() if (found := scaling_efficiency(group))}


def collect_results(results: Any, keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid: the trial, its swept values, status (ok, error, or stopped: ended
    early by the scheduler) and every metric of its last report."""
    rows = []
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if k not in _TUNE_KEYS}
        name = metrics.pop("trial", None) or Path(result.path).name
        error = None if result.error is None else (str(result.error).strip().splitlines() or ["error"])[-1]
        status = "error" if error else "ok" if "wall_s" in metrics else "stopped"  # the last report has wall_s
        rows.append({"trial": name, **{k: result.config.get(k) for k in keys},
                     "status": status, "error": error, **metrics})
    return sorted(rows, key=lambda row: row["trial"])


def write_results(rows: list[dict[str, Any]], sweep: SweepConfig, keys: list[str], sweep_dir: Path,
                  best: str | None) -> None:
    """results.json (the sweep and every row) and results.csv (one row per trial, every metric a column)."""
    (sweep_dir / "results.json").write_text(json.dumps(
        {"sweep": sweep_dir.name, "metric": sweep.metric, "mode": sweep.mode, "best_trial": best,
         "space": {k: d.model_dump(exclude_none=True) for k, d in sweep.space.items()}, "trials": rows},
        indent=2, default=str))
    first = ["trial", *keys, sweep.metric, SCALING]
    last = ["status", "error", "run_dir"]
    middle = sorted({k for row in rows for k in row} - set(first) - set(last))
    columns = [c for c in first if any(c in row for row in rows)] + middle + last
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: short_value(row[c]) if isinstance(row.get(c), (list, dict)) else row.get(c)
                             for c in columns})


def plot_sweep(rows: list[dict[str, Any]], metric: str, key: str, path: Path) -> Path | None:
    """``metric`` (and the scaling efficiency, and the final evaluation return, when there) against ``key``: each
    trial a point, the mean per value a line; for env steps/s against actor count, linear scaling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in dict.fromkeys([metric, SCALING, "eval/episode_return"])
              if any(isinstance(row.get(m), (int, float)) for row in rows)]
    if not panels:
        return None
    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = list(dict.fromkeys(short_value(v) for v in values))
    xs = [v if numeric else labels.index(short_value(v)) for v in values]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        points = [(x, row[name]) for x, row in zip(xs, rows) if isinstance(row.get(name), (int, float))]
        means = defaultdict(list)
        for x, y in points:
            means[x].append(y)
        line = sorted((x, sum(ys) / len(ys)) for x, ys in means.items())
        ax.scatter(*zip(*points), alpha=0.5, s=18)
        ax.plot(*zip(*line), marker="o")
        if name == THROUGHPUT and key == "actors.count" and line[0][0] > 0:
            ax.plot([x for x, _ in line], [line[0][1] * x / line[0][0] for x, _ in line], "k--", lw=1,
                    label="linear scaling")
            ax.legend()
        if name == SCALING:
            ax.set_ylim(0, max(1.1, max(y for _, y in points) * 1.05))
        elif name.endswith("_per_s"):
            ax.set_ylim(bottom=0)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
        if numeric and len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        elif not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(key)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows: list[dict[str, Any]], keys: list[str], metric: str, title: str) -> None:
    """The trials as a rich table: swept values, the metric, the headline metrics, the scaling efficiency."""
    from rich.console import Console
    from rich.table import Table

    from softflow.deploy.run.progress import format_value

    columns = [c for c in dict.fromkeys([metric, SCALING, *HEADLINE]) if any(c in row for row in rows)]
    table = Table(title=title)
    for name in ["trial", *keys, *columns, "status"]:
        table.add_column(name, justify="left" if name in ("trial", "status") else "right")
    for row in rows:
        table.add_row(row["trial"], *(short_value(row.get(k)) for k in keys),
                      *(format_value(row.get(c)) for c in columns), row["status"])
    console = Console()
    (console if console.is_terminal else Console(width=300)).print(table)  # a file or pipe gets the whole table


def report(rows: list[dict[str, Any]], sweep: SweepConfig, keys: list[str], sweep_dir: Path) -> list[dict[str, Any]]:
    """Writes results.csv, results.json and sweep.png, prints the table (and the scaling efficiency); raises
    RunStopped when a trial failed."""
    efficiency = scaling_by_envs(rows) if "actors.count" in keys else {}
    scored = [row for row in rows if isinstance(row.get(sweep.metric), (int, float))
              and math.isfinite(row[sweep.metric])]
    best = (max if sweep.mode == "max" else min)(scored, key=lambda row: row[sweep.metric]) if scored else None
    write_results(rows, sweep, keys, sweep_dir, best and best["trial"])
    plot = plot_sweep(rows, sweep.metric, keys[0], sweep_dir / "sweep.png")
    print_table(rows, keys, sweep.metric, f"sweep {sweep_dir.name}: {sweep.metric} ({sweep.mode})")
    for envs, by_count in efficiency.items():
        n0 = min(by_count)
        per = "" if envs is None else f", {envs} envs per actor"
        print(f"scaling efficiency (env steps/s with n actors over {'n' if n0 == 1 else f'n/{n0}'} x with {n0}{per}): "
              + ", ".join(f"{n}: {e:.2f}" for n, e in by_count.items()))
    if best:
        print(f"best trial by {sweep.metric} ({sweep.mode}): {best['trial']} = {best[sweep.metric]:.4g}")
    elif rows:
        print(f"no trial reported {sweep.metric}")
    print(f"results: {sweep_dir / 'results.csv'}, {sweep_dir / 'results.json'}" + (f", {plot}" if plot else ""))
    failed = [row for row in rows if row["status"] == "error"]
    if failed:
        raise RunStopped(f"{len(failed)} of {len(rows)} trials failed (first: {failed[0]['trial']}: "
                         f"{failed[0]['error']}); results of the others are in {sweep_dir}")
    return rows
