"""A preallocated numpy ring buffer of transitions for off-policy learning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from softflow.actors.fragment import Fragment

_STORED_FIELDS: tuple[str, ...] = ("obs", "actions", "rewards", "next_obs", "terminated")
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")  # what a saved buffer may name


class ReplayBuffer:
    """Fixed-capacity FIFO ring buffer stored as contiguous float32 arrays.

    ``next_obs`` is stored explicitly, so transitions at episode boundaries are
    exact.  Sampling is uniform with replacement over the filled part and uses
    the buffer's own generator, whose state is saved with the buffer.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int = 0) -> None:
        """Allocate storage for ``capacity`` transitions."""
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if obs_dim <= 0 or act_dim <= 0:
            raise ValueError(f"obs_dim and act_dim must be positive, got {obs_dim}, {act_dim}")
        self._capacity = int(capacity)
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity,), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.terminated = np.zeros((capacity,), dtype=np.float32)
        self._cursor = 0
        self._size = 0
        self.inserted = 0
        self.sampled = 0
        self.rng = np.random.default_rng(seed)

    @property
    def capacity(self) -> int:
        """Maximum number of stored transitions."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays."""
        return sum(getattr(self, name).nbytes for name in _STORED_FIELDS)

    def __len__(self) -> int:
        """Number of transitions currently stored."""
        return self._size

    def _expected_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return {
            "obs": (n, self.obs_dim),
            "actions": (n, self.act_dim),
            "rewards": (n,),
            "next_obs": (n, self.obs_dim),
            "terminated": (n,),
        }

    def add(self, fragment: Fragment) -> None:
        """Copy a fragment in, overwriting the oldest transitions when full.

        Fragments longer than the capacity keep only their newest
        ``capacity`` transitions.  Raises ValueError on mismatched shapes.
        """
        n = len(fragment)
        bad = {
            name: (np.shape(getattr(fragment, name)), shape)
            for name, shape in self._expected_shapes(n).items()
            if np.shape(getattr(fragment, name)) != shape
        }
        if bad:
            details = ", ".join(
                f"{name} has shape {got}, expected {want}" for name, (got, want) in bad.items()
            )
            raise ValueError(
                f"ReplayBuffer.add: bad fragment shapes: {details} "
                f"(n = len(rewards) = {n}, obs_dim={self.obs_dim}, act_dim={self.act_dim})"
            )
        if n == 0:
            return
        self.inserted += n
        skip = max(0, n - self._capacity)
        count = n - skip
        start = (self._cursor + skip) % self._capacity
        first = min(count, self._capacity - start)
        for name in _STORED_FIELDS:
            src = getattr(fragment, name)[skip:]
            dst = getattr(self, name)
            dst[start : start + first] = src[:first]
            dst[: count - first] = src[first:]
        self._cursor = (start + count) % self._capacity
        self._size = min(self._size + n, self._capacity)

    def sample(self, num_batches: int, batch_size: int) -> dict[str, np.ndarray]:
        """Draw ``num_batches * batch_size`` transitions uniformly with replacement.

        Returns a dict of arrays shaped (num_batches, batch_size, ...).
        """
        if self._size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        idx = self.rng.integers(0, self._size, size=(num_batches, batch_size))
        self.sampled += idx.size
        return {name: getattr(self, name)[idx] for name in _STORED_FIELDS}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the buffer to one uncompressed ``.npz`` file (into a checkpoint set's staging directory, which
        softflow/checkpoints.py seals and switches in as a whole).

        The filled part is stored in its physical (slot) order together with
        the cursor, so sample indices map to the same transitions after
        ``load``; the sampling generator state is saved as JSON.
        """
        path = Path(path)
        meta = {
            "capacity": self._capacity,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "cursor": self._cursor,
            "inserted": self.inserted,
            "sampled": self.sampled,
            "rng_state": self.rng.bit_generator.state,
        }
        arrays = {name: getattr(self, name)[: self._size] for name in _STORED_FIELDS}
        with path.open("wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayBuffer:
        """Restore a buffer written by :meth:`save`, including its generator state."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"][()]))
            buf = cls(meta["capacity"], meta["obs_dim"], meta["act_dim"])
            size = int(data["rewards"].shape[0])
            for name in _STORED_FIELDS:
                getattr(buf, name)[:size] = data[name]
        buf._size = size
        buf._cursor = int(meta["cursor"])
        buf.inserted = int(meta["inserted"])
        buf.sampled = int(meta["sampled"])
        name = meta["rng_state"]["bit_generator"]
        if name not in BIT_GENERATORS:
            raise ValueError(f"{path}: unknown bit generator {name!r}")
        bit_generator = getattr(np.random, name)()
        bit_generator.state = meta["rng_state"]
        buf.rng = np.random.Generator(bit_generator)
        return buf
