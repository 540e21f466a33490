"""The wire format of softflow's policy service, shared by the server (deploy/serve/server.py) and the client.

``policy_service.proto`` defines the service; ``policy_service_pb2*.py`` are generated from it and committed (the
command that regenerates them heads the .proto). This module adds what both sides need around the messages: arrays
to and from ``Tensor`` messages, the bearer-token header, and messages as plain dicts. It imports neither torch nor
the rest of softflow, so a robot or simulator can use the client with numpy and grpcio alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from softflow.deploy.serve.proto.policy_service_pb2 import (
    ActRequest,
    ActResponse,
    InfoRequest,
    InfoResponse,
    Space,
    Tensor,
)
from softflow.deploy.serve.proto.policy_service_pb2_grpc import PolicyServiceStub

SERVICE_NAME = "softflow.v1.PolicyService"
ACT_METHOD = f"/{SERVICE_NAME}/Act"
INFO_METHOD = f"/{SERVICE_NAME}/Info"
AUTH_HEADER = "authorization"
TOKEN_ENV = "SOFTFLOW_SERVE_TOKEN"  # the bearer token, where no token file is given (server and client alike)
TENSOR_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def to_tensor(array: np.ndarray) -> Tensor:
    """A float32 or float64 array as a Tensor message (other dtypes are sent as float32)."""
    array = np.asarray(array)
    name = array.dtype.name if array.dtype.name in TENSOR_DTYPES else "float32"
    data = np.ascontiguousarray(array, dtype=TENSOR_DTYPES[name]).tobytes()
    return Tensor(dtype=name, shape=list(array.shape), data=data)


def from_tensor(tensor: Tensor) -> np.ndarray:
    """The array a well-formed Tensor message holds (a writable copy); ValueError when it is not well-formed."""
    if tensor.dtype not in TENSOR_DTYPES:
        raise ValueError(f"dtype {tensor.dtype!r} is not supported; send one of {', '.join(TENSOR_DTYPES)}")
    dtype = TENSOR_DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shape {list(shape)} has a negative dimension")
    needed = math.prod(shape) * dtype.itemsize  # Python integers: a huge shape cannot overflow
    if needed != len(tensor.data):
        raise ValueError(f"shape {list(shape)} of {tensor.dtype} needs {needed} bytes of data but "
                         f"{len(tensor.data)} were sent")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).copy()


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that carries ``token``."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def read_token(path: str | Path) -> str:
    """The token in a file (surrounding whitespace stripped); ValueError when the file is missing or empty."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.__class__.__name__}: {exc}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def message_to_dict(message: Message) -> dict:
    """Every field of a message (set or not) as plain Python values; nested messages become dicts."""
    result = {}
    for field in message.DESCRIPTOR.fields:
        convert = message_to_dict if field.message_type is not None else (lambda v: v)
        v = getattr(message, field.name)
        result[field.name] = [convert(x) for x in v] if field.is_repeated else convert(v)
    return result


__all__ = ["ACT_METHOD", "AUTH_HEADER", "ActRequest", "ActResponse", "INFO_METHOD", "InfoRequest", "InfoResponse",
           "PolicyServiceStub", "SERVICE_NAME", "Space", "TENSOR_DTYPES", "TOKEN_ENV", "Tensor", "bearer",
           "from_tensor", "message_to_dict", "read_token", "to_tensor"]
