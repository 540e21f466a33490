"""``softflow serve``: a trained policy answers action queries over gRPC (deploy/serve/proto/policy_service.proto).

One gRPC server (grpc.aio's, on an event loop in a thread of its own) runs:

- ``softflow.v1.PolicyService``: ``Act`` (observations in, best-of-N actions out, as ``softflow.load_policy(...)
  .act`` computes them) and ``Info``; and the standard health service ``grpc.health.v1.Health``.
- The :class:`~softflow.deploy.serve.policy.Batcher`, which turns concurrent ``Act`` calls into few policy calls.
- A checkpoint watcher: every ``reload_interval_s`` it looks at the checkpoint file (a run directory's newest
  whole checkpoint set, which training switches in atomically); a new file is loaded beside the one
  serving and swapped in between two batches, so no request is dropped or answered by half of each.

``softflow serve`` (:func:`serve_forever`) also settles Python's garbage collector once the server is up, which
raised the batched throughput by a tenth to a fifth (:func:`settle_garbage_collector`).

Hostile input: each request is checked before it is queued (deploy/serve/policy.py says which status each fault
gets, work over ``max_request_work`` rows x candidates included); messages over ``max_message_bytes`` get
RESOURCE_EXHAUSTED from gRPC itself, and ``Act`` calls beyond ``max_concurrent_rpcs`` in progress get it from the
handler (grpc.aio's own limit would hold them back instead); calls without the right bearer token get
UNAUTHENTICATED; actions with NaN or inf are never sent (INTERNAL). Each refusal is one line naming what is wrong,
and the server goes on. Who may listen where, and with which token and TLS, is deploy/serve/security.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from softflow.deploy.config import ConfigError
from softflow.deploy.policies import checkpoint_path
from softflow.deploy.serve.policy import (
    Batcher,
    CheckpointChanged,
    RequestError,
    ServerStopping,
    file_signature,
    load_served,
    parse_act_request,
)
from softflow.deploy.serve.proto import (
    SERVICE_NAME,
    ActResponse,
    InfoRequest,
    InfoResponse,
    Space,
    read_token,
    to_tensor,
)
from softflow.deploy.serve.security import (
    TOKEN_ENV,
    BearerTokenAuth,
    ServeOptions,
    check_can_listen,
    host_port,
    token_from_environment,
)

log = logging.getLogger("softflow.serve")
Status = grpc.StatusCode
GC_YOUNG_THRESHOLD = 5_000  # objects allocated (net) that set off a collection of the youngest generation


class PolicyServer:
    """The gRPC policy server for a run directory or checkpoint file: ``start`` (returns the port) and ``stop``,
    or ``with PolicyServer(path, options) as server: PolicyClient(server.address)``.

    The server is grpc.aio's, on an event loop in its own thread: each call is a coroutine on that loop, and the
    :class:`Batcher`'s task gathers them into policy calls, which run one at a time in an inference thread, so
    that health checks and ``Info`` answer at once while the policy is busy (docs/serving.md).
    """

    def __init__(self, path: str | Path, options: ServeOptions):
        options.check()
        self.path = Path(path)
        self.options = options
        self.served = load_served(self.path, options.torch_device)
        self.port: int | None = None
        self.batcher = Batcher(lambda: self.served, options.batching, options.max_batch_rows,
                               options.max_batch_wait_ms, options.max_batch_work)
        self._calls = 0  # Act calls in progress, against max_concurrent_rpcs
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._grace = 2.0
        self._thread = threading.Thread(target=self._run_loop, name="softflow-serve", daemon=True)
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="softflow-reload", daemon=True)

    @property
    def address(self) -> str:
        return host_port(self.options.host, self.port)

    def start(self) -> int:
        """Binds, starts serving, and returns the port (the one the OS chose for port 0)."""
        check_can_listen(self.options.host, self.options.port)
        self._thread.start()
        self.port = self._started.result()  # or the ConfigError of a failed bind
        warning = self.options.insecure_warning(self.address)
        if warning:
            log.warning(warning)
        if self.options.reload_interval_s > 0:
            self._watcher.start()
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        """NOT_SERVING for health checks, ``grace`` seconds for calls in progress, then everything stops."""
        self._grace = grace
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_requested.set)
            self._thread.join()
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(0.5)

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # before start() has its port, it raises this; after, the log has it
            if not self._started.done():
                self._started.set_exception(exc)
            else:
                log.exception("the server's event loop failed")

    async def _serve(self) -> None:
        """The event loop's life: bind and start, serve until ``stop``, then shut down gracefully."""
        o = self.options
        self._loop, self._stop_requested = asyncio.get_running_loop(), asyncio.Event()
        server = grpc.aio.server(
            interceptors=[BearerTokenAuth(o.token)] if o.token else [],
            options=[("grpc.max_receive_message_length", o.max_message_bytes),
                     ("grpc.max_send_message_length", o.max_message_bytes), ("grpc.so_reuseport", 0)])
        # raw bytes in, parsed in the handler: a request that is not an ActRequest gets INVALID_ARGUMENT, not the
        # INTERNAL that a failing generated deserializer would give
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Act": grpc.unary_unary_rpc_method_handler(self._act, response_serializer=ActResponse.SerializeToString),
            "Info": grpc.unary_unary_rpc_method_handler(self._info, request_deserializer=InfoRequest.FromString,
                                                        response_serializer=InfoResponse.SerializeToString)})])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = host_port(o.host, o.port)
        try:
            if o.tls_cert is not None:
                port = server.add_secure_port(address, grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)]))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            self._started.set_exception(ConfigError(f"cannot listen on {address}: {exc}"))
            return
        await server.start()
        batcher = asyncio.create_task(self.batcher.run())
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._started.set_result(port)
        await self._stop_requested.wait()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(self._grace)
        batcher.cancel()
        await asyncio.gather(batcher, return_exceptions=True)

    async def _act(self, raw: bytes, context: grpc.aio.ServicerContext) -> ActResponse:
        if self._calls >= self.options.max_concurrent_rpcs:
            await context.abort(Status.RESOURCE_EXHAUSTED, f"{self._calls} Act calls in progress is this server's "
                                                           f"limit (--max-concurrent-rpcs); retry later")
        self._calls += 1
        try:
            query = parse_act_request(raw, self.served, self.options)
            actions, served = await self.batcher.submit(query)
        except RequestError as exc:
            code, message = exc.code, exc.message
        except ServerStopping as exc:
            code, message = Status.UNAVAILABLE, str(exc)
        except Exception as exc:
            code, message = Status.INTERNAL, f"inference failed ({type(exc).__name__}); the server's log has why"
        else:
            return ActResponse(actions=to_tensor(actions), checkpoint_version=served.version,
                               candidates=query.candidates)
        finally:
            self._calls -= 1
        await context.abort(code, message)

    async def _info(self, request: InfoRequest, context: grpc.aio.ServicerContext) -> InfoResponse:
        s, o = self.served, self.options
        return InfoResponse(
            env_id=s.env_id, algorithm=s.algorithm, observation_space=Space(shape=[s.obs_dim]),
            action_space=Space(shape=[s.act_dim], low=s.low, high=s.high), checkpoint_version=s.version,
            checkpoint_updates=s.updates, default_candidates=s.policy.candidates,
            max_request_rows=o.max_request_rows, max_candidates=o.max_candidates,
            max_request_work=o.max_request_work, max_batch_work=o.max_batch_work,
            max_message_bytes=o.max_message_bytes, device=str(s.policy.algorithm.device),
            max_batch_rows=o.max_batch_rows if o.batching else 1,
            max_batch_wait_ms=o.max_batch_wait_ms if o.batching else 0.0)

    def _watch(self) -> None:
        """Swaps in a new checkpoint when the file changes; a checkpoint that fails to load, or that has other
        spaces, is logged once and the serving one stays."""
        refused = None
        while not self._stopping.wait(self.options.reload_interval_s):
            try:
                signature = file_signature(checkpoint_path(self.path))
            except (ConfigError, OSError):
                continue
            if signature in (self.served.signature, refused):
                continue
            try:
                new = load_served(self.path, self.options.torch_device)
            except CheckpointChanged:
                continue
            except Exception as exc:
                refused = signature
                log.warning("not reloading %s: %s: %s", self.path, type(exc).__name__, exc)
                continue
            old = self.served
            if (new.obs_dim, new.low, new.high) != (old.obs_dim, old.low, old.high):
                refused = new.signature
                log.warning("not reloading %s: its spaces differ from those being served", new.file)
                continue
            self.served = new
            log.info("reloaded %s: version %d -> %d", new.file, old.version, new.version)


def add_serve_arguments(parser) -> None:
    """The ``softflow serve`` flags (deploy/cli.py)."""
    d = ServeOptions()
    parser.allow_abbrev = False  # or `--token SECRET` would pass for --token-file, with the secret in `ps`
    parser.add_argument("path", help="a run directory (its newest checkpoint, reloaded as training writes new ones) "
                                     "or a checkpoint file")
    parser.add_argument("--host", default=d.host, help="address to listen on (default loopback; any other needs "
                                                       "a token and TLS, or --insecure)")
    parser.add_argument("--port", type=int, default=d.port, help="0 picks a free port (printed at start)")
    parser.add_argument("--token-file", help=f"file holding the bearer token clients must send (default: "
                                             f"${TOKEN_ENV} when set)")
    parser.add_argument("--tls-cert", help="PEM certificate (chain) for TLS; needs --tls-key")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without a token or TLS: unauthenticated, unencrypted "
                             "inference open to the network")
    parser.add_argument("--no-batching", action="store_true", help="one policy call per request (the baseline)")
    parser.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows, help="most rows per policy call")
    parser.add_argument("--max-batch-wait-ms", type=float, default=d.max_batch_wait_ms,
                        help="longest a batch stays open for more requests after its first (0: only what is queued)")
    parser.add_argument("--max-request-rows", type=int, default=d.max_request_rows, help="most rows per request")
    parser.add_argument("--max-candidates", type=int, default=d.max_candidates, help="most candidates per state")
    parser.add_argument("--max-request-work", type=int, default=d.max_request_work,
                        help="most rows x candidates per request; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-batch-work", type=int, default=d.max_batch_work,
                        help="most rows x candidates gathered into one batch (a request alone may reach "
                             "--max-request-work)")
    parser.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="largest request")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs,
                        help="Act calls in progress at once; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--reload-interval", type=float, default=d.reload_interval_s,
                        help="seconds between looks for a new checkpoint (0: never reload)")
    parser.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                        help="inference device (auto: CUDA when visible)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def options_from_args(args) -> ServeOptions:
    """ServeOptions from the ``softflow serve`` flags, reading the token and TLS files; ConfigError if unreadable."""
    def read(path: str | None, what: str) -> bytes | None:
        try:
            return None if path is None else Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None

    try:
        token = token_from_environment() if args.token_file is None else read_token(args.token_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ServeOptions(
        host=args.host, port=args.port, token=token, tls_cert=read(args.tls_cert, "--tls-cert"),
        tls_key=read(args.tls_key, "--tls-key"), insecure=args.insecure, batching=not args.no_batching,
        max_batch_rows=args.max_batch_rows, max_batch_wait_ms=args.max_batch_wait_ms,
        max_request_rows=args.max_request_rows, max_candidates=args.max_candidates,
        max_request_work=args.max_request_work, max_batch_work=args.max_batch_work,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs, reload_interval_s=args.reload_interval, device=args.device)


def settle_garbage_collector() -> None:
    """Makes Python's cyclic garbage collector cheap for a long-lived server: everything allocated so far (torch,
    grpc, the loaded policy; none of it garbage) is frozen, so that no collection walks it again, and the youngest
    generation is collected at ``GC_YOUNG_THRESHOLD`` objects instead of 700, which the calls of one batch alone
    outnumber. Measured on 2 cores at 64 clients: collections took 0.03 ms of the 0.23 ms of CPU a batched request
    cost, and 0.002 ms after (docs/serving.md). Frozen objects are still freed when their last reference
    goes (the policy a reload replaces is); only reference cycles among them would stay."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def serve_forever(path: str | Path, options: ServeOptions, torch_threads: int = 0) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully (calls in progress get a moment to finish)."""
    logging.basicConfig(level=os.environ.get("SOFTFLOW_LOG_LEVEL", "INFO"),
                        format="softflow serve %(asctime)s %(levelname)s %(message)s")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    server = PolicyServer(path, options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    settle_garbage_collector()
    s, o = server.served, options
    scheme = "TLS" if o.tls_cert else "plaintext"
    auth = "token required" if o.token else "no token"
    batching = (f"batching up to {o.max_batch_rows} rows, {o.max_batch_wait_ms:g} ms wait" if o.batching
                else "no batching")
    print(f"softflow: serving {s.file} ({s.algorithm} on {s.env_id}, version {s.version}, "
          f"{s.policy.algorithm.device}; {scheme}, {auth}, {batching}) at {server.address}", flush=True)
    while not stop.wait(0.2):  # a timed wait: the signal may reach another thread, and only this one runs handlers
        pass
    server.stop()
