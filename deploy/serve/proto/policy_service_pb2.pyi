from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("observations", "candidates", "deterministic", "seed")
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    observations: Tensor
    candidates: int
    deterministic: bool
    seed: int
    def __init__(self, observations: _Optional[_Union[Tensor, _Mapping]] = ..., candidates: _Optional[int] = ..., deterministic: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("actions", "checkpoint_version", "candidates")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    actions: Tensor
    checkpoint_version: int
    candidates: int
    def __init__(self, actions: _Optional[_Union[Tensor, _Mapping]] = ..., checkpoint_version: _Optional[int] = ..., candidates: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Space(_message.Message):
    __slots__ = ("shape", "low", "high")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    low: _containers.RepeatedScalarFieldContainer[float]
    high: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., low: _Optional[_Iterable[float]] = ..., high: _Optional[_Iterable[float]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("env_id", "algorithm", "observation_space", "action_space", "checkpoint_version", "checkpoint_updates", "default_candidates", "max_request_rows", "max_candidates", "max_message_bytes", "device", "max_batch_rows", "max_batch_wait_ms", "max_request_work", "max_batch_work")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPACE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_UPDATES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_WORK_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_WORK_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    algorithm: str
    observation_space: Space
    action_space: Space
    checkpoint_version: int
    checkpoint_updates: int
    default_candidates: int
    max_request_rows: int
    max_candidates: int
    max_message_bytes: int
    device: str
    max_batch_rows: int
    max_batch_wait_ms: float
    max_request_work: int
    max_batch_work: int
    def __init__(self, env_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., observation_space: _Optional[_Union[Space, _Mapping]] = ..., action_space: _Optional[_Union[Space, _Mapping]] = ..., checkpoint_version: _Optional[int] = ..., checkpoint_updates: _Optional[int] = ..., default_candidates: _Optional[int] = ..., max_request_rows: _Optional[int] = ..., max_candidates: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device: _Optional[str] = ..., max_batch_rows: _Optional[int] = ..., max_batch_wait_ms: _Optional[float] = ..., max_request_work: _Optional[int] = ..., max_batch_work: _Optional[int] = ...) -> None: ...
