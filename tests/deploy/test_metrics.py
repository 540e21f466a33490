"""Tests for the run's metrics (metrics.jsonl, real offline W&B runs, end-of-run files) and its terminal view.

Every W&B run here is a real offline run in ``tmp_path``; no network is needed. ``HOME`` points at ``tmp_path`` and
the W&B environment variables are cleared, so the user's ``~/.netrc`` and settings play no part.
"""

from __future__ import annotations

import io
import json
import math
import shlex

import pytest
from rich.console import Console

from softflow.deploy.run import metrics
from softflow.deploy.run.metrics import (
    MetricsLogger,
    WandbConfig,
    drop_rewound_records,
    offline_run_dirs,
    read_metrics,
    resolve_wandb_mode,
)
from softflow.deploy.run.progress import TrainingProgress, format_value, print_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"seed": 3, "algorithm": {"name": "sac", "lr": 0.0003}}


@pytest.fixture(autouse=True)
def isolated_wandb_env(tmp_path, monkeypatch):
    """No API key, no .netrc and no W&B settings from the user; WANDB_DIR points away from the run directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    return home


def offline_logger(run_dir, resume=False, **wandb_fields):
    return MetricsLogger(run_dir, "test-run", CONFIG, WandbConfig(mode="offline", **wandb_fields), resume=resume)


def all_offline_run_dirs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_run_writes_metrics_jsonl_and_a_wandb_run_in_the_run_dir(tmp_path, capfd):
    run_dir = tmp_path / "run"
    logged = [(100, {"train/episode_return": -5.5, "learner/updates": 7}),
              (200, {"train/episode_return": -2.25, "eval/episode_return": 1.5, "weights/version_lag": 1})]
    logger = offline_logger(run_dir, tags=["unit"], group="g")
    for env_steps, record in logged:
        logger.log(env_steps, record)

    assert read_metrics(run_dir / "metrics.jsonl") == [{"env_steps": s, **m} for s, m in logged]
    (offline_dir,) = all_offline_run_dirs(run_dir)
    assert offline_dir.name.endswith(logger.run_id)
    assert not (tmp_path / "elsewhere").exists(), "dir=run_dir must win over WANDB_DIR"
    assert (run_dir / "wandb_id.txt").read_text().strip() == logger.run_id

    info = (run_dir / "WANDB.txt").read_text()
    assert "W&B mode: offline" in info
    assert str(offline_dir.resolve()) in info
    command = next(line.strip() for line in info.splitlines() if line.strip().startswith("wandb sync"))
    assert shlex.split(command) == ["wandb", "sync", str(offline_dir.resolve())]

    logger.finish({"env_steps": 200})
    wandb_records = next(offline_dir.glob("*.wandb")).read_bytes()
    assert b"train/episode_return" in wandb_records and b"version_lag" in wandb_records
    assert b"algorithm" in wandb_records, "the run config goes to W&B"
    printed = capfd.readouterr()
    assert printed.out == "", "wandb must not write to stdout (the summary JSON goes there)"
    assert printed.err.strip() == logger.status_line, "the status line is all that goes to stderr"
    assert "W&B offline" in logger.status_line


def test_a_failed_online_start_falls_back_to_offline(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused, no network
    monkeypatch.setattr(metrics, "ONLINE_INIT_TIMEOUT_S", 1.0)
    logger = MetricsLogger(tmp_path, "r", CONFIG, WandbConfig(mode="auto"))
    logger.log(10, {"train/episode_return": 1.0})
    logger.finish({})

    assert logger.mode == "offline"
    info = (tmp_path / "WANDB.txt").read_text()
    assert "W&B mode: offline" in info and "Online start failed" in info
    (offline_dir,) = all_offline_run_dirs(tmp_path)
    assert logger.run_id in offline_dir.name and list(offline_dir.glob("*.wandb"))
    assert capfd.readouterr().err.strip() == logger.status_line, "wandb itself must not write to the terminal"


def test_metrics_lines_are_on_disk_before_finish(tmp_path):
    logger = MetricsLogger(tmp_path, "r", {}, WandbConfig(mode="disabled"))
    logger.log(10, {"train/episode_return": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"env_steps": 10, "train/episode_return": 1.0}
    logger.finish({})


def test_resume_reuses_the_run_id_and_appends_metrics(tmp_path):
    run_dir = tmp_path / "run"
    first = offline_logger(run_dir)
    first.log(100, {"train/episode_return": 1.0})
    first.log(200, {"train/episode_return": 2.0})
    first.finish({})

    second = offline_logger(run_dir, resume=True)
    second.log(150, {"train/episode_return": 3.0})
    second.finish({"env_steps": 150})

    assert second.run_id == first.run_id
    assert [r["env_steps"] for r in read_metrics(run_dir / "metrics.jsonl")] == [100, 200, 150]
    segments = all_offline_run_dirs(run_dir)
    assert len(segments) == 2 and all(first.run_id in d.name for d in segments)
    command = next(line.strip() for line in (run_dir / "WANDB.txt").read_text().splitlines()
                   if line.strip().startswith("wandb sync"))
    assert shlex.split(command) == ["wandb", "sync", "--id", first.run_id, *(str(d.resolve()) for d in segments)]


def test_offline_run_dirs_are_ordered_by_start_then_by_wandb_suffix(tmp_path):
    names = ["offline-run-20260102_000000-abc", "offline-run-20260101_000000-abc-1", "offline-run-20260101_000000-abc",
             "offline-run-20260101_000000-abc-10", "offline-run-20260101_000000-abc-2",
             "offline-run-20260101_000000-abcd", "run-20260101_000000-abc"]
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert [d.name for d in offline_run_dirs(tmp_path, "abc")] == [
        "offline-run-20260101_000000-abc", "offline-run-20260101_000000-abc-1", "offline-run-20260101_000000-abc-2",
        "offline-run-20260101_000000-abc-10", "offline-run-20260102_000000-abc"]


def test_without_resume_the_run_starts_afresh(tmp_path):
    first = offline_logger(tmp_path)
    first.log(100, {"train/episode_return": 1.0})
    first.finish({})
    second = offline_logger(tmp_path)
    second.log(5, {"train/episode_return": 9.0})
    second.finish({})
    assert second.run_id != first.run_id
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"env_steps": 5, "train/episode_return": 9.0}]


def test_resume_after_a_line_cut_short_keeps_every_complete_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"env_steps": 1, "a": 1}\n{"env_steps": 2, "a"')
    logger = MetricsLogger(tmp_path, "r", {}, WandbConfig(mode="disabled"), resume=True)
    logger.log(2, {"a": 2})
    logger.finish({})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"env_steps": 1, "a": 1}, {"env_steps": 2, "a": 2}]


def test_disabled_mode_starts_no_wandb_run(tmp_path):
    logger = MetricsLogger(tmp_path, "r", CONFIG, WandbConfig(mode="disabled"))
    logger.log(1, {"train/episode_return": 0.5})
    written = logger.finish({"env_steps": 1})
    assert not (tmp_path / "wandb").exists()
    assert not (tmp_path / "wandb_id.txt").exists()
    assert "W&B mode: disabled" in (tmp_path / "WANDB.txt").read_text()
    assert set(written) == {"summary", "learning_curve"}


def test_finish_writes_summary_and_a_real_learning_curve_png(tmp_path):
    logger = offline_logger(tmp_path)
    for step in range(100, 1100, 100):
        logger.log(step, {"train/episode_return": step / 10, "eval/episode_return": step / 5})
    summary = {"env_steps": 1000, "eval/episode_return": 200.0, "updates": 900}
    written = logger.finish(summary)

    assert json.loads(written["summary"].read_text()) == summary
    assert written["summary"] == tmp_path / "summary.json"
    png = written["learning_curve"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 5_000, "an axes with two curves, a title and labels is several kB"


def test_learning_curve_skips_absent_series(tmp_path):
    import matplotlib.image

    logger = MetricsLogger(tmp_path, "r", {}, WandbConfig(mode="disabled"))
    logger.log(1, {"learner/updates": 1})
    png_path = logger.finish({})["learning_curve"]
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_drop_rewound_records_keeps_the_resumed_segment():
    records = [{"env_steps": s, "x": i} for i, s in enumerate([100, 200, 200, 300, 150, 250])]
    assert [(r["env_steps"], r["x"]) for r in drop_rewound_records(records)] == [(100, 0), (150, 4), (250, 5)]


def test_read_metrics_skips_blank_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"env_steps": 1, "v": NaN}\n\n[1, 2]\n{"env_steps": 2, "v": 4')
    (record,) = read_metrics(path)
    assert record["env_steps"] == 1 and math.isnan(record["v"])


def test_numpy_scalars_are_logged_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    logger = MetricsLogger(tmp_path, "r", {}, WandbConfig(mode="disabled"))
    logger.log(np.int64(3), {"losses/q": np.float32(0.5)})
    logger.finish({"final": np.float64(1.25)})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"env_steps": 3, "losses/q": 0.5}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final": 1.25}


def test_resolve_mode_explicit_modes_are_kept(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    for mode in ("offline", "online", "disabled"):
        assert resolve_wandb_mode(WandbConfig(mode=mode)) == mode


def test_resolve_mode_auto_is_offline_without_a_key():
    assert resolve_wandb_mode(WandbConfig()) == "offline"


def test_resolve_mode_auto_is_online_with_an_env_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(WandbConfig()) == "online"


@pytest.mark.parametrize("machine, expected", [("api.wandb.ai", "online"), ("example.com", "offline")])
def test_resolve_mode_auto_reads_the_netrc_in_home(isolated_wandb_env, machine, expected):
    netrc_file = isolated_wandb_env / ".netrc"
    netrc_file.write_text(f"machine {machine}\n  login user\n  password {'p' * 40}\n")
    netrc_file.chmod(0o600)
    assert resolve_wandb_mode(WandbConfig()) == expected


def test_resolve_mode_auto_ignores_an_unreadable_netrc(isolated_wandb_env):
    (isolated_wandb_env / ".netrc").write_text("machine api.wandb.ai\n  frobnicate x\n  password secret\n")
    assert resolve_wandb_mode(WandbConfig()) == "offline"


@pytest.mark.parametrize("env_mode, expected", [("disabled", "disabled"), ("dryrun", "offline"), ("bogus", "offline")])
def test_resolve_mode_auto_follows_wandb_mode_env(monkeypatch, env_mode, expected):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    assert resolve_wandb_mode(WandbConfig()) == expected


def test_wandb_config_rejects_unknown_fields_and_modes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        WandbConfig(projekt="x")
    with pytest.raises(ValidationError):
        WandbConfig(mode="sometimes")


def rendered_progress(metrics_seen: list[tuple[int, dict]], enabled: bool = True) -> str:
    console = Console(file=io.StringIO(), force_terminal=False, width=160)
    with TrainingProgress(total_env_steps=10_000, enabled=enabled, console=console) as progress:
        for env_steps, metrics in metrics_seen:
            progress.update(env_steps, metrics)
    return console.file.getvalue()


def test_progress_shows_steps_of_budget_and_latest_values():
    text = rendered_progress([
        (1_000, {"train/episode_return": -12.5, "learner/updates_per_s": 61.25}),
        (2_500, {"train/episode_return": 123.4, "weights/version_lag": 2}),
    ])
    assert "2500/10000" in text
    assert "train return 123.4" in text and "-12.5" not in text
    assert "updates/s 61.25" in text, "a value not reported again keeps its last value"
    assert "policy lag 2" in text
    assert "eval return -" in text and "env steps/s -" in text


def test_disabled_progress_prints_nothing():
    assert rendered_progress([(500, {"train/episode_return": 1.0})], enabled=False) == ""


def test_format_value():
    assert [format_value(v) for v in (None, 3, 12_345, 0.123456, 98_765.4, float("nan"))] == \
        ["-", "3", "12,345", "0.1235", "98,765", "nan"]


def test_print_summary_lists_scalar_metrics():
    console = Console(file=io.StringIO(), force_terminal=False, width=100)
    print_summary({"env_steps": 40_000, "eval/episode_return": -3.25, "nested": {"a": 1}}, console=console)
    rows = console.file.getvalue()
    assert "Run summary" in rows
    assert any("env_steps" in line and "40,000" in line for line in rows.splitlines())
    assert any("eval/episode_return" in line and "-3.25" in line for line in rows.splitlines())
    assert "nested" not in rows


def test_a_resumed_run_waits_for_a_held_wandb_run_id_then_takes_a_new_one(tmp_path, monkeypatch, capsys):
    """After a SIGKILLed driver, its W&B service can hold the run id a while ("run ID ... is in use"): the logger
    retries until RUN_ID_WAIT_S, then logs to a new W&B run, stores its id and says so in one line."""
    from types import SimpleNamespace

    from softflow.deploy.run import metrics as metrics_module

    monkeypatch.setattr(metrics_module.time, "sleep", lambda s: None)
    calls = []

    def held_twice(config, wandb_config, mode):
        calls.append(logger.run_id)
        if len(calls) <= 2:
            raise RuntimeError(f"run ID {logger.run_id} is in use")
        return "run"

    logger = SimpleNamespace(run_id="abcd1234", run_dir=tmp_path, _init_wandb=held_twice)
    assert metrics_module.MetricsLogger._init_held_id(logger, {}, None, "offline") == "run"
    assert calls == ["abcd1234"] * 3 and capsys.readouterr().err == ""

    def held_for_good(config, wandb_config, mode):
        calls.append(logger.run_id)
        if logger.run_id == "abcd1234":
            raise RuntimeError("run ID abcd1234 is in use")
        return "run"

    calls.clear()
    monkeypatch.setattr(metrics_module, "RUN_ID_WAIT_S", -1.0)
    logger.run_id, logger._init_wandb = "abcd1234", held_for_good
    assert metrics_module.MetricsLogger._init_held_id(logger, {}, None, "offline") == "run"
    assert calls[0] == "abcd1234" and logger.run_id != "abcd1234" and len(logger.run_id) == 8
    assert (tmp_path / metrics_module.WANDB_ID_FILE).read_text().strip() == logger.run_id
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("softflow: warning: W&B run abcd1234 is still held")
