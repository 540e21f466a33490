"""Smoke test of ``softflow bench serve`` at a small scale (real server processes, a short load and fuzz run):
every field present, every rate and latency positive, ratios equal to their parts, the fuzz run survived with
only the expected statuses. Timings are not compared with thresholds (docs/benchmarks.md)."""

from __future__ import annotations

import math
import shutil

import pytest
from helpers import train_tiny_run

from softflow.deploy.bench.serve import bench_serve
from softflow.deploy.config import ConfigError

pytestmark = [pytest.mark.grpc, pytest.mark.usefixtures("one_torch_thread")]

needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None,
                                  reason="h2load not installed (apt-get install nghttp2-client; .ci/run installs it)")


@needs_h2load
def test_smoke_bench_serve_reports_load_and_fuzz(tmp_path):
    report = bench_serve(train_tiny_run(tmp_path / "run"), [], seconds=0.3, clients="1,4", fuzz=200, rounds=2)
    assert (report["env"], report["algorithm"], report["candidates"], report["device"]) == (
        "InvertedPendulum-v5", "isfm", 4, "cpu")
    assert report["params"]["clients"] == [1, 4] and report["params"]["connections"] == 1
    assert report["params"]["load_generator"].startswith("h2load nghttp2/")
    rows = {(row["mode"], row["clients"], row["round"]): row for row in report["load"]}
    assert set(rows) == {(mode, n, r) for mode in ("batched", "unbatched") for n in (1, 4) for r in (0, 1)}
    for row in rows.values():
        assert row["requests"] > 0 and row["errors"] == {}
        assert 0 < row["p50_ms"] <= row["p99_ms"] and math.isfinite(row["requests_per_s"])
    summary = {(row["mode"], row["clients"]): row for row in report["summary"]}
    for n in (1, 4):
        ratios = [rows[("batched", n, r)]["requests_per_s"] / rows[("unbatched", n, r)]["requests_per_s"]
                  for r in (0, 1)]
        assert report["batched_over_unbatched_by_round"][str(n)] == ratios
        assert math.isclose(report["batched_over_unbatched_throughput"][str(n)], sum(ratios) / 2)  # median of 2
        for mode in ("batched", "unbatched"):
            rates = [rows[(mode, n, r)]["requests_per_s"] for r in (0, 1)]
            assert math.isclose(summary[(mode, n)]["requests_per_s"], sum(rates) / 2)
            assert summary[(mode, n)]["requests"] == sum(rows[(mode, n, r)]["requests"] for r in (0, 1))
    ceiling = report["transport_ceiling"]
    assert ceiling["clients"] == 4 and ceiling["info_requests_per_s"] > 0
    assert math.isclose(ceiling["over_unbatched_act"],
                        ceiling["info_requests_per_s"] / summary[("unbatched", 4)]["requests_per_s"])
    fuzz = report["fuzz"]
    assert fuzz["requests"] == sum(fuzz["statuses"].values()) == 200 and fuzz["unexpected_statuses"] == {}
    assert fuzz["server_alive"] and fuzz["valid_request_answered_after"]
    assert fuzz["rss_mb_before"] > 0 and len(fuzz["rss_mb_samples"]) == 11


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": "1,x"}, "--clients must be comma-separated integers"),
    ({"clients": "0"}, "--seconds, --connections, --rounds and every --clients level must be positive"),
    ({"rounds": 0}, "--seconds, --connections, --rounds and every --clients level must be positive"),
    ({"clients": "1,8", "connections": 2}, r"every --clients level must be a multiple of --connections \(2\)"),
    ({"fuzz": -1}, "--fuzz at least 0"),
])
def test_bench_serve_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bench_serve("no/such/run", [], **kwargs)


@needs_h2load
def test_h2load_counts_refused_calls_as_errors_not_answers(tmp_path):
    """h2load sees HTTP 200 for every gRPC call; a refused call carries no response message, so the size check
    must count it as an error: calls beyond a concurrency limit of 1 among answered ones, and calls that every
    answer refuses (rows one value too wide), under the status of the refusal."""
    from softflow.deploy.bench.serve import ServerProcess, closed_loop
    from softflow.deploy.policies import checkpoint_path

    with ServerProcess(checkpoint_path(train_tiny_run(tmp_path / "run")), ["--max-concurrent-rpcs", "1"]) as server:
        server.wait_ready()
        crowded = closed_loop(server, 8, 1, 0.5)
        server.info.observation_space.shape[0] += 1  # the load generator now sends rows one value too wide
        refused = closed_loop(server, 2, 1, 0.3)
    assert crowded["requests"] > 0 and crowded["errors"]["refused_or_short_answer"] > 0
    assert set(crowded["errors"]) == {"refused_or_short_answer"}
    assert refused["requests"] == 0 and refused["p50_ms"] > 0 and list(refused["errors"]) == ["INVALID_ARGUMENT"]
