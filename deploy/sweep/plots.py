"""The figures of ``softflow report`` (compare.py): learning curves, final and best IQM, performance profiles."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from softflow.deploy.sweep import stats


def _figure(panels: int, width: float = 4.8, height: float = 3.6) -> tuple[Figure, list]:
    figure = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def plot_curves(runs: list, path: Path, seed: int = 0, reps: int = 200) -> Path:
    """One panel per task: per algorithm, the IQM over its runs of eval/episode_return at the union of their
    evaluation steps (each run interpolated within its own range) and a 95 % bootstrap band."""
    tasks = sorted({r.task for r in runs})
    figure, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        groups: dict[str, list] = defaultdict(list)
        for run in runs:
            if run.task == task:
                groups[run.algorithm].append(run)
        for algorithm, members in sorted(groups.items()):
            steps = np.unique([s for r in members for s, _ in r.curve])
            middle, low, high = [], [], []
            for step in steps:
                values = [float(np.interp(step, *zip(*r.curve))) for r in members if r.curve[0][0] <= step]
                point, lo, hi = stats.interval([values], reps=reps, seed=seed)
                middle.append(point), low.append(lo), high.append(hi)
            ax.plot(steps, middle, label=f"{algorithm} ({len(members)})")
            ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return (IQM)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def plot_final(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per task: final and best return IQM per algorithm with their 95 % intervals."""
    tasks = sorted({row["task"] for row in rows})
    figure, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        mine = [row for row in rows if row["task"] == task]
        for offset, name in ((-0.15, "final"), (0.15, "best")):
            xs = np.arange(len(mine)) + offset
            ys = [row[f"{name}_iqm"] for row in mine]
            errors = [[y - row[f"{name}_ci_low"] for y, row in zip(ys, mine)],
                      [row[f"{name}_ci_high"] - y for y, row in zip(ys, mine)]]
            ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=name)
        ax.set_xticks(range(len(mine)), [row["algorithm"] for row in mine], rotation=30)
        ax.set_title(task)
        ax.set_ylabel("eval return IQM, 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def plot_profile(runs: list, path: Path, seed: int = 0) -> Path:
    """Per algorithm, the fraction of its runs whose final return, min-max normalised per task over all runs of
    that task, is above tau; a 95 % band from the stratified bootstrap (runs resampled within tasks)."""
    by_task: dict[str, list] = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    normalised = stats.normalise({task: np.array([r.final for r in members]) for task, members in by_task.items()})
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, members in by_task.items():
        for run, score in zip(members, normalised[task]):
            scores[run.algorithm][task].append(float(score))
    taus = np.linspace(0, 1, 101)
    figure, (ax,) = _figure(1, 5.5, 4.0)
    for algorithm, tasks in sorted(scores.items()):
        point, low, high = stats.profile(list(tasks.values()), taus, seed=seed)
        ax.plot(taus, point, label=f"{algorithm} ({len(tasks)} tasks)")
        ax.fill_between(taus, low, high, alpha=0.2)
    ax.set_xlabel("normalised final return tau (per task: min-max over all runs)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path
