"""The terminal view of a training run: a live progress display and an end-of-run summary table.

``TrainingProgress`` shows a bar of env steps out of the run's budget with the elapsed time, and under it the last
reported training and evaluation returns, learner updates/s, env steps/s and policy lag. The driver feeds it the
same metric dicts it logs (docs/architecture.md names); a value not reported yet shows as '-'. ``print_summary``
prints the
final report as a table.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Metrics shown under the bar, with their labels, in display order.
DISPLAYED_METRICS = {
    "train/episode_return": "train return",
    "eval/episode_return": "eval return",
    "learner/updates_per_s": "updates/s",
    "actors/env_steps_per_s": "env steps/s",
    "weights/version_lag": "policy lag",
}


def format_value(value: Any) -> str:
    """A metric value for display: '-' when missing, thousands separators for large numbers, 4 digits otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


class _MetricsLine:
    """A rich renderable that draws the latest metric values each time the live display refreshes."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def __rich__(self) -> Table:
        line = Table.grid(padding=(0, 3))
        line.add_row(*(f"{label} [bold]{format_value(self.values[key])}[/]"
                       for key, label in DISPLAYED_METRICS.items()))
        return line


class TrainingProgress:
    """Live progress of a training run, used as a context manager around the training loop.

    ``total_env_steps``: the run's budget, the bar's end. ``enabled``: False prints nothing (tests, batch jobs).
    ``console``: where to draw; rich's default console (the terminal) when None.
    """

    def __init__(self, total_env_steps: int, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self.latest: dict[str, Any] = dict.fromkeys(DISPLAYED_METRICS)
        self._progress = Progress(
            TextColumn("[bold]env steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        )
        self._task = self._progress.add_task("train", total=total_env_steps, start=False)
        self._live = Live(Group(self._progress, _MetricsLine(self.latest)), console=console, refresh_per_second=4)

    def __enter__(self) -> TrainingProgress:
        self._progress.start_task(self._task)
        if self.enabled:
            self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self._live.stop()

    def update(self, env_steps: int, metrics: dict[str, Any]) -> None:
        """Moves the bar to ``env_steps`` and keeps the last value seen of each displayed metric."""
        self.latest.update({key: metrics[key] for key in DISPLAYED_METRICS if key in metrics})
        self._progress.update(self._task, completed=env_steps)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """Prints the end-of-run table: every scalar entry of ``summary`` (nested values are left to summary.json)."""
    table = Table(title="Run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            table.add_row(key, format_value(value))
    (console or Console()).print(table)
