"""``softflow.deploy.PolicyClient``: asks a ``softflow serve`` server for actions.

Needs numpy and grpcio only (no torch), so it runs on the robot or simulator side::

    from softflow.deploy import PolicyClient

    with PolicyClient("127.0.0.1:50051", token_file="serve.token") as client:
        client.info()                    # env, spaces, algorithm, checkpoint version, server limits
        action = client.act(obs)         # (obs_dim,) -> (act_dim,); (B, obs_dim) -> (B, act_dim)

Server refusals raise ``grpc.RpcError``: ``err.code()`` is the status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
UNAUTHENTICATED, ...), ``err.details()`` the server's one-line reason.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from softflow.deploy.serve.proto import (
    SERVICE_NAME,
    TOKEN_ENV,
    ActRequest,
    InfoRequest,
    PolicyServiceStub,
    bearer,
    from_tensor,
    message_to_dict,
    read_token,
    to_tensor,
)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What ``Act`` returned: (rows, act_dim) actions, the checkpoint version that computed them, the candidates."""

    actions: np.ndarray
    checkpoint_version: int
    candidates: int


class PolicyClient:
    """A channel to a policy server at ``address`` (host:port).

    ``token`` or ``token_file``: the server's bearer token. ``tls_cert``: a PEM file the server's certificate
    must chain to (its own certificate when self-signed); without it the channel is plaintext. ``timeout``: seconds
    per call.
    """

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None,
                 token_file: str | Path | None = None, tls_cert: str | Path | None = None, timeout: float = 10.0,
                 max_message_bytes: int = 64 * 1024 * 1024):
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token_file is not None:
            token = read_token(token_file)
        self._metadata = bearer(token) if token else ()
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_cert is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = PolicyServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def query(self, obs: np.ndarray, candidates: int = 0, deterministic: bool = False,
              seed: int | None = None) -> Answer:
        """Actions for a (rows, obs_dim) batch with the version that computed them. ``candidates`` 0 is the
        checkpoint's best-of-N; ``deterministic`` the zero-noise action (one candidate); ``seed`` makes the answer
        equal ``torch.manual_seed(seed); softflow.load_policy(checkpoint).act(obs)`` on a CPU server."""
        request = ActRequest(observations=to_tensor(np.asarray(obs)), candidates=candidates,
                             deterministic=deterministic, seed=seed)
        response = self._stub.Act(request, timeout=self.timeout, metadata=self._metadata)
        return Answer(from_tensor(response.actions), response.checkpoint_version, response.candidates)

    def act(self, obs: np.ndarray, candidates: int = 0, deterministic: bool = False,
            seed: int | None = None) -> np.ndarray:
        """Like ``softflow.load_policy(...).act``: (obs_dim,) -> (act_dim,), (rows, obs_dim) -> (rows, act_dim)."""
        obs = np.asarray(obs)
        single = obs.ndim == 1
        actions = self.query(obs[None] if single else obs, candidates, deterministic, seed).actions
        return actions[0] if single else actions

    def info(self) -> dict:
        """What the server serves: env_id, algorithm, observation_space, action_space, checkpoint_version, ..."""
        return message_to_dict(self._stub.Info(InfoRequest(), timeout=self.timeout, metadata=self._metadata))

    def health(self, service: str = SERVICE_NAME) -> str:
        """The standard health service's status: 'SERVING', 'NOT_SERVING', ..."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_act_arguments(parser) -> None:
    """The ``softflow act`` flags (deploy/cli.py)."""
    parser.add_argument("--address", default="127.0.0.1:50051", help="the server's host:port")
    parser.add_argument("--obs", help="observations as JSON: one [..] or a batch [[..], ..]; without it, the "
                                      "server's Info is printed")
    parser.add_argument("--candidates", type=int, default=0, help="best-of-N (0: the checkpoint's)")
    parser.add_argument("--deterministic", action="store_true", help="the zero-noise action, one candidate")
    parser.add_argument("--seed", type=int, help="seed this request's sampling")
    parser.add_argument("--token-file", help=f"file holding the server's bearer token (default: ${TOKEN_ENV} "
                                             f"when set)")
    parser.add_argument("--tls-cert", help="PEM certificate the server's must chain to (its own if self-signed)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")


def act_command(args) -> dict:
    """``softflow act``: the answer (or the server's Info) as a JSON-ready dict; ValueError with one line when the
    observations cannot be read or the server refuses."""
    import json

    try:
        obs = None if args.obs is None else np.asarray(json.loads(args.obs), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"--obs is not a JSON list of numbers or of equal-length lists ({exc})") from None
    if obs is not None and obs.ndim not in (1, 2):
        raise ValueError(f"--obs must be one observation [..] or a batch [[..], ..] (got {obs.ndim} levels)")
    try:
        token = (os.environ.get(TOKEN_ENV, "").strip() or None) if args.token_file is None else None
        with PolicyClient(args.address, token=token, token_file=args.token_file, tls_cert=args.tls_cert,
                          timeout=args.timeout) as client:
            if obs is None:
                return client.info()
            answer = client.query(obs[None] if obs.ndim == 1 else obs, args.candidates, args.deterministic,
                                  args.seed)
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except grpc.RpcError as exc:
        raise ValueError(f"{args.address} answered {exc.code().name}: {exc.details()}") from None
    actions = answer.actions[0] if obs.ndim == 1 else answer.actions
    return {"actions": actions.tolist(), "checkpoint_version": answer.checkpoint_version,
            "candidates": answer.candidates}
