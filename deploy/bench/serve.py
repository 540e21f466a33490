"""``softflow bench serve``: the gRPC policy server under load, batched against unbatched, and under fuzzing.

1. Load: ``softflow serve`` runs twice as real processes on loopback (one torch thread each, no reload), batched
   (the default flags) and with ``--no-batching``. For each number of concurrent clients (1, 8, 64 by default),
   in ``rounds`` rounds, each server in turn gets ``seconds`` of closed-loop load after a warm-up: every client
   sends batch-1 ``Act`` requests one after the other. The clients are h2load's streams (nghttp2's HTTP/2 load
   generator, written in C): ``clients`` streams over ``connections`` connections (1 by default, as ghz does).
   A Python load generator (grpc's own client, completion callbacks) took 0.1-0.2 ms of CPU per call from the 2
   cores it measured, which held the batches at 64 clients to 26 requests. Reported per round: p50 and p99 latency,
   requests per second, the server's CPU time per request (steadier than throughput on a shared machine); their
   medians over rounds; and batched over unbatched throughput at each level, the median of the rounds' ratios
   (the issue's target: >= 4 at 64 clients). Then the transport's ceiling: the batched server's ``Info`` calls
   (no parsing, no inference) under the largest client count, over unbatched ``Act``.
2. Fuzz: ``fuzz`` requests to the batched server, 16 in flight: random bytes, random shapes and dtypes, NaN and
   inf, wrong widths, mutated valid requests, oversized messages and batches, random candidates and seeds, and
   valid requests between them. Reported: the count of each status, that the server process is alive and answers
   a valid request afterwards, and its resident memory before, during and after.

The policy is the Quickstart experiment's (its network sizes and best-of-N), trained for a few hundred steps in
serial mode unless a run directory or checkpoint is given. Ratios are the result; absolute figures move with the
machine's load (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import numpy as np

from softflow.deploy.bench.timing import Stopwatch
from softflow.deploy.config import ConfigError, load_experiment
from softflow.deploy.policies import checkpoint_path
from softflow.deploy.serve.proto import (
    ACT_METHOD,
    INFO_METHOD,
    ActRequest,
    InfoRequest,
    PolicyServiceStub,
    Tensor,
    to_tensor,
)

TRAIN_OVERRIDES = ["actors.count=0", "total_env_steps=500", "learner.learning_starts=250", "eval.episodes=0",
                   "wandb.mode=disabled"]
WARMUP_S = 1.0  # at most: a load level's warm-up is min(WARMUP_S, seconds)
FUZZ_IN_FLIGHT = 16
RSS_SAMPLES = 10


def bench_serve(source: str | Path, overrides: list[str], seconds: float = 2.0, clients: str = "1,8,64",
                connections: int = 1, fuzz: int = 10_000, max_batch_wait_ms: float | None = None,
                rounds: int = 9) -> dict:
    """Both measurements for ``source`` (an experiment file to train briefly, a run directory or a checkpoint);
    one JSON-ready dict."""
    try:
        levels = [int(n) for n in clients.split(",")]
    except ValueError:
        raise ConfigError(f"--clients must be comma-separated integers (got {clients!r})") from None
    if seconds <= 0 or connections < 1 or rounds < 1 or fuzz < 0 or not levels or min(levels) < 1:
        raise ConfigError("--seconds, --connections, --rounds and every --clients level must be positive, --fuzz "
                          "at least 0")
    if any(n % connections for n in levels):
        raise ConfigError(f"every --clients level must be a multiple of --connections ({connections}): the clients "
                          f"are spread evenly over the connections")
    require_h2load()
    with tempfile.TemporaryDirectory(prefix="softflow-bench-serve-") as scratch:
        checkpoint = prepare_checkpoint(source, overrides, Path(scratch))
        batched_flags = [] if max_batch_wait_ms is None else ["--max-batch-wait-ms", str(max_batch_wait_ms)]
        with contextlib.ExitStack() as servers:
            batched, plain = (servers.enter_context(ServerProcess(checkpoint, flags))
                              for flags in (batched_flags, ["--no-batching"]))
            for server in (batched, plain):
                server.wait_ready()
            info = batched.info
            load, by_round = [], {}
            for n in levels:
                by_round[str(n)] = []
                for round_ in range(rounds):  # alternating, so that a slow spell of the machine hits both modes
                    rows = {mode: {"mode": mode, "clients": n, "round": round_,
                                   **closed_loop(server, n, connections, seconds)}
                            for mode, server in (("unbatched", plain), ("batched", batched))}
                    load.extend(rows.values())
                    by_round[str(n)].append(rows["batched"]["requests_per_s"] / rows["unbatched"]["requests_per_s"])
            summary = summarise(load)
            top = max(levels)
            info_load = closed_loop(batched, top, connections, seconds, method=INFO_METHOD)
            unbatched_top = next(row for row in summary if row["mode"] == "unbatched" and row["clients"] == top)
            ceiling = {"clients": top, "info_requests_per_s": info_load["requests_per_s"],
                       "server_cpu_ms_per_request": info_load["server_cpu_ms_per_request"],
                       "over_unbatched_act": info_load["requests_per_s"] / unbatched_top["requests_per_s"]}
            fuzzed = run_fuzz(batched, fuzz) if fuzz else None
    return {
        "benchmark": "serve", "source": str(source), "overrides": overrides,
        "env": info.env_id, "algorithm": info.algorithm, "candidates": info.default_candidates,
        "device": info.device, "cpus": os.cpu_count(),
        "params": {"seconds": seconds, "warmup_s": min(WARMUP_S, seconds), "rounds": rounds, "clients": levels,
                   "load_generator": subprocess.run([require_h2load(), "--version"], capture_output=True,
                                                    text=True).stdout.strip(),
                   "connections": connections, "rows_per_request": 1,
                   "max_batch_rows": info.max_batch_rows, "max_batch_wait_ms": info.max_batch_wait_ms,
                   "server_torch_threads": 1},
        "summary": summary,
        "batched_over_unbatched_throughput": {n: statistics.median(ratios) for n, ratios in by_round.items()},
        "batched_over_unbatched_by_round": by_round,
        "load": load, "transport_ceiling": ceiling, "fuzz": fuzzed,
    }


def summarise(load: list[dict]) -> list[dict]:
    """Per mode and client count, the median over rounds of each figure."""
    keys = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in load:
        groups.setdefault((row["mode"], row["clients"]), []).append(row)
    return [{"mode": mode, "clients": n, "requests": sum(row["requests"] for row in rows),
             **{key: statistics.median(row[key] for row in rows) for key in keys}}
            for (mode, n), rows in groups.items()]


def prepare_checkpoint(source: str | Path, overrides: list[str], scratch: Path) -> Path:
    """The checkpoint to serve: ``source`` itself, or that of a short serial run of the experiment ``source``."""
    if Path(source).suffix not in (".yaml", ".yml"):
        return checkpoint_path(source)
    from softflow.deploy.run.driver import train

    config = load_experiment(source, [*TRAIN_OVERRIDES, *overrides])
    with contextlib.redirect_stdout(sys.stderr):
        train(config, scratch / "run", progress=False)
    return checkpoint_path(scratch / "run")


class ServerProcess:
    """``softflow serve CHECKPOINT --port 0 --torch-threads 1 --reload-interval 0 FLAGS`` as a subprocess, started
    on entering, stopped (SIGTERM) on leaving; ``wait_ready`` reads the address from its first line."""

    def __init__(self, checkpoint: Path, flags: list[str]):
        self.command = [sys.executable, "-m", "softflow.deploy.cli", "serve", str(checkpoint), "--port", "0",
                        "--torch-threads", "1", "--reload-interval", "0", *flags]

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SOFTFLOW_LOG_LEVEL": "WARNING"}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        return self

    def wait_ready(self) -> None:
        """Waits for the server's first line, which names its address, and asks for its Info."""
        match = re.search(r" at (\S+)$", self.process.stdout.readline().strip())
        if match is None:
            self.process.wait(timeout=30)
            self.log.seek(0)
            raise RuntimeError(f"softflow serve did not start: {self.log.read().decode()[-2000:]}")
        self.address = match.group(1)
        with grpc.insecure_channel(self.address) as channel:
            self.info = PolicyServiceStub(channel).Info(InfoRequest(), timeout=30)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def require_h2load() -> str:
    """The path of h2load; ConfigError with the install command when it is missing."""
    path = shutil.which("h2load")
    if path is None:
        raise ConfigError("bench serve drives the servers with h2load, nghttp2's HTTP/2 load generator (in C, so that "
                          "it takes little of the CPU it measures): install it, e.g. apt-get install nghttp2-client")
    return path


def grpc_frame(message: bytes) -> bytes:
    """A message as a gRPC body: uncompressed flag, big-endian length, bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def closed_loop(server: ServerProcess, clients: int, connections: int, seconds: float,
                method: str = ACT_METHOD) -> dict:
    """h2load's closed loop: ``clients`` concurrent streams over ``connections`` connections, each sending the next
    batch-1 ``Act`` request (or an empty ``Info`` request, ``method=INFO_METHOD``) when its last is answered, for a
    warm-up run and then ``seconds``; latency percentiles (h2load's per-request log), throughput and the server's
    CPU time per request over the measured run. h2load sees HTTP statuses only, so the answers are checked by size:
    an OK answer carries the response message (its size is that of an answer fetched first), a refusal none; when
    that first answer is itself refused, every call is counted under its status."""
    obs_dim = server.info.observation_space.shape[0]
    request = (ActRequest(observations=to_tensor(np.zeros((1, obs_dim), np.float32))) if method == ACT_METHOD
               else InfoRequest()).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        try:
            answer_bytes, refusal = len(grpc_frame(channel.unary_unary(method)(request, timeout=30))), None
        except grpc.RpcError as exc:  # every call of the load will be refused the same way
            answer_bytes, refusal = None, exc.code().name
    with tempfile.TemporaryDirectory(prefix="softflow-h2load-") as folder:
        body, log = Path(folder, "request.bin"), Path(folder, "requests.tsv")
        body.write_bytes(grpc_frame(request))
        command = [require_h2load(), "-c", str(connections), "-m", str(clients // connections), "-d", str(body),
                   "-H", "content-type: application/grpc", "-H", "te: trailers",
                   f"http://{server.address}{method}"]
        warmup_ms = round(min(WARMUP_S, seconds) * 1e3)
        subprocess.run([*command, "-D", f"{warmup_ms}ms"], capture_output=True, check=True, timeout=warmup_ms + 60)
        cpu_at_start = server.cpu_seconds()
        run = subprocess.run([*command, "-D", f"{round(seconds * 1e3)}ms", "--log-file", str(log)],
                             capture_output=True, text=True, check=True, timeout=seconds + 60)
        cpu = server.cpu_seconds() - cpu_at_start
        durations = sorted(int(line.split("\t")[2]) / 1e3 for line in log.read_text().splitlines() if line)
    counts = {name: int(n) for n, name in re.findall(r"(\d+) (succeeded|failed|errored|timeout)", run.stdout)}
    data = int(re.search(r"\((\d+)\) data", run.stdout).group(1))
    answered = 0 if answer_bytes is None else min(counts["succeeded"], data // answer_bytes)
    errors = {name: n for name, n in [(refusal or "refused_or_short_answer", counts["succeeded"] - answered),
                                      *((k, counts[k]) for k in ("failed", "errored", "timeout"))] if n}
    return {"requests": answered, "requests_per_s": answered / seconds,
            "p50_ms": statistics.median(durations) if durations else None,
            "p99_ms": durations[min(len(durations) - 1, int(0.99 * len(durations)))] if durations else None,
            "server_cpu_ms_per_request": cpu / answered * 1e3 if answered else None, "errors": errors}


def fuzz_request(rng: np.random.Generator, obs_dim: int, max_message_bytes: int) -> bytes:
    """One hostile (or, one time in eight, valid) serialised request."""
    def valid(rows: int) -> ActRequest:
        return ActRequest(observations=to_tensor(rng.standard_normal((rows, obs_dim), dtype=np.float32)))

    kind = int(rng.integers(9))
    if kind == 0:  # random bytes
        return rng.bytes(int(rng.integers(0, 512)))
    if kind == 1:  # random shape, dtype and data length
        shape = [int(x) for x in rng.choice([-1, 0, 1, 2, obs_dim, 7, 1 << 31, 1 << 62], int(rng.integers(0, 5)))]
        dtype = str(rng.choice(["float32", "float64", "int64", "", "f4", "<f4", rng.bytes(6).hex()]))
        tensor = Tensor(dtype=dtype, shape=shape, data=rng.bytes(int(rng.integers(0, 256))))
        return ActRequest(observations=tensor).SerializeToString()
    if kind == 2:  # NaN and inf among finite values
        request = valid(int(rng.integers(1, 8)))
        obs = np.frombuffer(request.observations.data, np.float32).copy()
        obs[rng.integers(len(obs))] = rng.choice([np.nan, np.inf, -np.inf])
        request.observations.data = obs.tobytes()
        return request.SerializeToString()
    if kind == 3:  # wrong width
        width = int(rng.choice([1, obs_dim + 1, 3 * obs_dim]))
        return ActRequest(observations=to_tensor(np.zeros((2, width), np.float32))).SerializeToString()
    if kind == 4:  # random candidates, deterministic flag and seed
        request = valid(int(rng.integers(1, 4)))
        request.candidates = int(rng.choice([0, 1, 2, 64, 257, (1 << 32) - 1]))
        request.deterministic = bool(rng.integers(2))
        if rng.integers(2):
            request.seed = int(rng.integers(0, 1 << 63))
        return request.SerializeToString()
    if kind == 5:  # a valid request with its bytes mutated
        data = bytearray(valid(2).SerializeToString())
        for i in rng.integers(0, len(data), int(rng.integers(1, 8))):
            data[i] = int(rng.integers(256))
        return bytes(data)
    if kind == 6:  # an empty batch, or more rows than the server takes
        rows = int(rng.choice([0, 1025, 1 << 40]))
        return ActRequest(observations=Tensor(dtype="float32", shape=[rows, obs_dim])).SerializeToString()
    if kind == 7 and rng.random() < 0.02:  # a message over the size limit
        return ActRequest(observations=Tensor(dtype="float32", shape=[1, obs_dim],
                                              data=bytes(max_message_bytes + 1))).SerializeToString()
    return valid(1).SerializeToString()


def run_fuzz(server: ServerProcess, requests: int, seed: int = 0) -> dict:
    """Sends ``requests`` fuzzed requests to ``server``, ``FUZZ_IN_FLIGHT`` at a time; statuses, survival and
    resident memory."""
    rng = np.random.default_rng(seed)
    obs_dim = server.info.observation_space.shape[0]
    statuses: dict[str, int] = {}
    rss = [server.rss_mb()]
    in_flight = threading.BoundedSemaphore(FUZZ_IN_FLIGHT)
    lock = threading.Lock()

    def count(future: grpc.Future) -> None:
        code = "OK" if future.exception() is None else future.exception().code().name
        with lock:
            statuses[code] = statuses.get(code, 0) + 1
        in_flight.release()

    with Stopwatch() as watch, grpc.insecure_channel(server.address) as channel:
        act = channel.unary_unary(ACT_METHOD)
        for i in range(requests):
            raw = fuzz_request(rng, obs_dim, server.info.max_message_bytes)
            in_flight.acquire()
            act.future(raw, timeout=30).add_done_callback(count)
            if (i + 1) % max(1, requests // RSS_SAMPLES) == 0:
                rss.append(server.rss_mb())
        for _ in range(FUZZ_IN_FLIGHT):  # the last calls have finished
            in_flight.acquire()
    alive = server.process.poll() is None
    answer = None
    if alive:
        with grpc.insecure_channel(server.address) as channel:
            request = ActRequest(observations=to_tensor(np.zeros((3, obs_dim), np.float32)))
            answer = PolicyServiceStub(channel).Act(request, timeout=30)
    valid_after = answer is not None and list(answer.actions.shape) == [3, server.info.action_space.shape[0]]
    return {"requests": requests, "seconds": watch.seconds, "statuses": dict(sorted(statuses.items())),
            "unexpected_statuses": {k: v for k, v in statuses.items()
                                    if k not in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")},
            "server_alive": alive, "valid_request_answered_after": valid_after,
            "rss_mb_before": rss[0], "rss_mb_after": rss[-1], "rss_mb_samples": rss}


def from_args(args) -> dict:
    """``softflow bench serve``'s flags (deploy/cli.py) to :func:`bench_serve`."""
    return bench_serve(args.experiment, args.overrides, seconds=args.seconds, clients=args.clients,
                       connections=args.connections, fuzz=args.fuzz, max_batch_wait_ms=args.max_batch_wait_ms,
                       rounds=args.rounds)
