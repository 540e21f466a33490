"""A sweep in W&B: its trials are one W&B run each, in the group named after the sweep directory (the sweep's name
and its start time, set in tune.py), with ``eval/episode_return``'s summary its maximum (deploy/run/metrics.py);
:func:`log_sweep_table` adds one more run to the group, ``<group>-results``, holding the sweep's results table.
Like the trials' runs it is offline without an API key (``wandb.mode: auto``) and absent with ``disabled``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from softflow.deploy.config import parse_experiment
from softflow.deploy.run.metrics import resolve_wandb_mode
from softflow.deploy.sweep.spec import SweepConfig, short_value


def table_data(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The columns (every key of any row, ``trial`` first) and one list per row: numbers as they are, anything
    else as short text, a missing value None."""
    columns = ["trial", *sorted({k for row in rows for k in row} - {"trial"})]

    def cell(value: Any) -> Any:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        return short_value(value)

    return columns, [[cell(row.get(c)) for c in columns] for row in rows]


def log_sweep_table(rows: list[dict[str, Any]], sweep: SweepConfig, bases: dict[str, dict[str, Any]],
                    sweep_dir: Path) -> str | None:
    """Logs the results table as the W&B run ``<group>-results`` (job type ``sweep``) in the sweep's group; returns
    the mode it logged in, or None (W&B disabled, or a failure, which is one warning line: the sweep's own files
    hold the same table)."""
    wandb_config = parse_experiment(next(iter(bases.values()))).wandb
    mode = resolve_wandb_mode(wandb_config)
    if mode == "disabled" or not rows:
        return None
    import wandb

    group = wandb_config.group or sweep_dir.name
    columns, data = table_data(rows)
    try:
        settings = wandb.Settings(silent=True, console="off", init_timeout=30.0)
        run = wandb.init(mode=mode, dir=sweep_dir, project=wandb_config.project, entity=wandb_config.entity,
                         group=group, name=f"{group}-results", job_type="sweep", settings=settings,
                         config=sweep.model_dump(mode="json", exclude_none=True))
        run.log({"results": wandb.Table(columns=columns, data=data)})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the table is a copy of results.csv; the sweep's outcome stands
        print(f"softflow: warning: the results table did not reach W&B ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
        return None
    print(f"softflow: W&B ({mode}) group {group}: the results table is in run {group}-results", flush=True)
    return mode
