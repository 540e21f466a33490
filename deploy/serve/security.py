"""What ``softflow serve`` accepts and who may ask: the server's options, the off-loopback rule, TLS and tokens.

Off loopback the server needs both a bearer token and TLS, or ``--insecure``, whose warning says what it exposes.
The token is read from ``$SOFTFLOW_SERVE_TOKEN`` or a file (``--token-file``), never from a command-line value,
which ``ps`` would show to every user of the machine; calls are checked against it in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
import socket
import ssl
import tempfile
from pathlib import Path

import grpc
import torch

from softflow.deploy.config import ConfigError
from softflow.deploy.serve.proto import AUTH_HEADER, TOKEN_ENV

Status = grpc.StatusCode


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server listens, what it accepts, and how it batches (the ``softflow serve`` flags).

    Work is counted in rows x candidates: each candidate of each row is one pass of the policy and one critic
    evaluation. ``max_request_work`` caps one request, ``max_batch_work`` one gathered batch."""

    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    insecure: bool = False
    batching: bool = True
    max_batch_rows: int = 256
    max_batch_wait_ms: float = 5.0
    max_request_rows: int = 1024
    max_candidates: int = 256
    max_request_work: int = 65_536
    max_batch_work: int = 65_536
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 256
    reload_interval_s: float = 2.0
    device: str = "auto"

    def check(self) -> None:
        """ConfigError for contradictory or unsafe settings."""
        for name in ("max_batch_rows", "max_request_rows", "max_candidates", "max_request_work", "max_batch_work",
                     "max_message_bytes", "max_concurrent_rpcs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_batch_wait_ms < 0 or self.reload_interval_s < 0:
            raise ConfigError("--max-batch-wait-ms and --reload-interval cannot be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key, or neither")
        if self.tls_cert is not None:
            check_tls_pair(self.tls_cert, self.tls_key)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible here; use auto or cpu")
        missing = self.missing_protection()
        if missing and not self.insecure:
            raise ConfigError(f"--host {self.host} is reachable from other machines: give {' and '.join(missing)}, "
                              f"or --insecure to serve unauthenticated, unencrypted inference to the network")

    def missing_protection(self) -> list[str]:
        """What an off-loopback server lacks of a token and TLS (nothing on loopback)."""
        if is_loopback(self.host):
            return []
        return [what for what, given in ((f"a token (--token-file or ${TOKEN_ENV})", self.token),
                                         ("TLS (--tls-cert and --tls-key)", self.tls_cert)) if not given]

    def insecure_warning(self, address: str) -> str | None:
        """The one-line warning of an ``--insecure`` server that lacks a token or TLS off loopback, else None."""
        exposed = [what for what, given in (("unauthenticated", self.token), ("unencrypted", self.tls_cert))
                   if not given]
        if not self.insecure or not self.missing_protection():
            return None
        return (f"--insecure: {' and '.join(exposed)} inference is open to the network at "
                f"{address}: anyone who reaches it can query the policy"
                f"{' and read observations and actions in transit' if not self.tls_cert else ''}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def check_tls_pair(cert: bytes, key: bytes) -> None:
    """ConfigError when the PEM certificate (chain) and private key do not load as a pair; gRPC would only log its
    reason and fail to bind."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="softflow-tls-") as folder:  # ssl loads files only; 0700, removed after
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError:
            raise ConfigError("--tls-cert and --tls-key do not load as a PEM certificate and its private key: is "
                              "each a PEM file, and is the key the certificate's?") from None


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_can_listen(host: str, port: int) -> None:
    """ConfigError with the system's reason when ``host:port`` cannot be bound (taken, or not this machine's);
    gRPC's own bind error is a multi-line log."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host_port(host, port)}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_from_environment() -> str | None:
    """``$SOFTFLOW_SERVE_TOKEN`` (surrounding whitespace stripped), or None when unset; ConfigError when empty."""
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"${TOKEN_ENV} is set but empty; unset it or give it the token")
    return token.strip()


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call but health checks that lacks ``authorization: Bearer <token>``
    (compared in constant time)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(AUTH_HEADER)
        if sent is not None and hmac.compare_digest(str(sent).encode(), self._expected):
            return await continuation(details)
        message = ("no token: send the metadata 'authorization: Bearer <token>'" if sent is None
                   else "wrong token in the 'authorization' metadata")

        async def refuse(request, context):
            await context.abort(Status.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(refuse)

