"""The learner: replay batches in, algorithm updates out, with counters (checkpoints: softflow/checkpoints.py).

A plain class (Sample Factory's Learner): the serial driver calls it in-process; a process wrapper can own it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

import numpy as np
import torch

from softflow.algorithms import Algorithm
from softflow.learner.compile import compile_algorithm


def learner_device(num_gpus: float | str) -> torch.device:
    """The learner's torch device for ``learner.num_gpus``: 'auto' is CUDA when a GPU is visible, 0 the CPU, more
    than 0 CUDA (ValueError when there is none)."""
    if num_gpus == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if num_gpus == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"learner.num_gpus={num_gpus:g} but no CUDA device is visible here; use 'auto' or 0")
    return torch.device("cuda")


@contextlib.contextmanager
def subnormals_flushed(device: torch.device) -> Iterator[None]:
    """Within the block, CPU arithmetic flushes subnormal floats (below 1.2e-38) to zero. As a run goes on, Adam's
    moments and the weights of rarely active units decay into subnormals, which x86 CPUs compute in slow microcode:
    flushing them made SAC's CPU learner 15 % faster in a HalfCheetah run (docs/benchmarks.md). GPUs compute
    subnormals at full speed, so nothing changes there. torch's switch is the calling thread's, until turned off:
    the block turns it off again, so nothing outside the updates sees it, and torch's other intra-op threads (with
    ``learner.num_cpus`` above 1) keep computing subnormals."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class TrainingDiverged(RuntimeError):
    """An update produced a non-finite loss; the networks are no longer usable, so training stops."""


class Learner:
    """Runs ``algorithm.update`` on stacked batches and counts updates; stops with :class:`TrainingDiverged` at the
    first non-finite loss instead of training on NaN weights."""

    def __init__(self, algorithm: Algorithm, device: torch.device, compile_mode: str = "none"):
        self.algorithm = algorithm
        self.device = device
        self.num_updates = 0
        fallback = compile_algorithm(algorithm, compile_mode)
        if fallback is not None:
            print(fallback, file=sys.stderr)

    def update(self, batches: dict[str, np.ndarray]) -> dict[str, float]:
        """One update per leading index of ``batches`` (arrays shaped (num_batches, batch_size, ...)); returns
        the metrics averaged over them. The algorithm's metrics stay tensors on the device until all the updates
        are done and are then read back in one transfer: one host synchronisation per call, not one per metric
        and update."""
        tensors = {k: torch.tensor(v, device=self.device) for k, v in batches.items()}  # Ray's arrays are read-only
        num_batches = next(iter(batches.values())).shape[0]
        records: list[tuple[int, str]] = []
        values: list[torch.Tensor] = []
        with subnormals_flushed(self.device):
            for i in range(num_batches):
                for key, value in self.algorithm.update({k: v[i] for k, v in tensors.items()}).items():
                    records.append((i, key))
                    values.append(torch.as_tensor(value, device=self.device, dtype=torch.float32).reshape(()))
        numbers = torch.stack(values).tolist() if values else []
        for (i, key), value in zip(records, numbers, strict=True):
            if key.startswith("losses/") and not math.isfinite(value):
                raise TrainingDiverged(
                    f"{key} became {value} at update {self.num_updates + i + 1}; lower "
                    f"algorithm.q_lr / algorithm.policy_lr or raise algorithm.alpha, and start again")
        self.num_updates += num_batches
        totals: dict[str, list[float]] = {}
        for (_, key), value in zip(records, numbers, strict=True):
            totals.setdefault(key, []).append(value)
        return {key: sum(seen) / len(seen) for key, seen in totals.items()}
