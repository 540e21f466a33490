"""Tests for the numpy ring-buffer ReplayBuffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from softflow.actors.fragment import Fragment
from softflow.actors.replay import ReplayBuffer

OBS_DIM, ACT_DIM = 3, 2


def make_fragment(start: int, n: int, obs_dim: int = OBS_DIM, act_dim: int = ACT_DIM) -> Fragment:
    """A fragment whose reward i equals start + i, and every other field is derived from it."""
    r = np.arange(start, start + n, dtype=np.float32)
    return Fragment(
        obs=np.repeat(r[:, None], obs_dim, axis=1),
        actions=np.repeat(-r[:, None], act_dim, axis=1),
        rewards=r,
        next_obs=np.repeat(r[:, None] + 0.5, obs_dim, axis=1),
        terminated=(r % 2).astype(np.float32),
        truncated=np.zeros(n, dtype=np.float32),
    )


def test_fragment_len_and_concat() -> None:
    a, b = make_fragment(0, 3), make_fragment(3, 4)
    a.episode_returns, b.episode_returns = [1.0], [2.0]
    b.policy_version = 5
    c = Fragment.concat([a, b])
    assert len(c) == 7
    np.testing.assert_array_equal(c.rewards, np.arange(7, dtype=np.float32))
    assert c.episode_returns == [1.0, 2.0]
    assert c.policy_version == 0


def test_wraparound_keeps_newest() -> None:
    buf = ReplayBuffer(10, OBS_DIM, ACT_DIM)
    buf.add(make_fragment(0, 7))
    assert len(buf) == 7
    buf.add(make_fragment(7, 6))
    assert len(buf) == 10
    assert sorted(buf.rewards.tolist()) == list(range(3, 13))
    # Each slot is internally consistent.
    np.testing.assert_array_equal(buf.obs[:, 0], buf.rewards)
    np.testing.assert_array_equal(buf.actions[:, 1], -buf.rewards)
    np.testing.assert_array_equal(buf.next_obs[:, 2], buf.rewards + 0.5)
    np.testing.assert_array_equal(buf.terminated, buf.rewards % 2)


def test_fragment_larger_than_capacity() -> None:
    buf = ReplayBuffer(5, OBS_DIM, ACT_DIM)
    buf.add(make_fragment(0, 3))
    buf.add(make_fragment(3, 12))
    assert len(buf) == 5
    assert sorted(buf.rewards.tolist()) == list(range(10, 15))
    assert buf.inserted == 15
    buf.add(make_fragment(15, 2))
    assert sorted(buf.rewards.tolist()) == list(range(12, 17))


def test_sample_shapes_and_filled_part_only() -> None:
    buf = ReplayBuffer(100, OBS_DIM, ACT_DIM, seed=1)
    buf.add(make_fragment(0, 7))
    batch = buf.sample(4, 32)
    assert batch["obs"].shape == (4, 32, OBS_DIM)
    assert batch["next_obs"].shape == (4, 32, OBS_DIM)
    assert batch["actions"].shape == (4, 32, ACT_DIM)
    assert batch["rewards"].shape == (4, 32)
    assert batch["terminated"].shape == (4, 32)
    assert all(v.dtype == np.float32 for v in batch.values())
    assert set(np.unique(batch["rewards"]).tolist()) <= set(range(7))
    assert len(np.unique(batch["rewards"])) == 7
    np.testing.assert_array_equal(batch["obs"][..., 0], batch["rewards"])


def test_counters() -> None:
    buf = ReplayBuffer(10, OBS_DIM, ACT_DIM)
    assert (buf.inserted, buf.sampled, len(buf), buf.capacity) == (0, 0, 0, 10)
    buf.add(make_fragment(0, 4))
    buf.add(make_fragment(4, 9))
    buf.sample(2, 3)
    buf.sample(1, 5)
    assert (buf.inserted, buf.sampled, len(buf)) == (13, 11, 10)


def test_sample_empty_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(10, OBS_DIM, ACT_DIM).sample(1, 1)


@pytest.mark.parametrize(
    "field, bad",
    [
        ("obs", np.zeros((4, OBS_DIM + 1), np.float32)),
        ("actions", np.zeros((4, ACT_DIM + 1), np.float32)),
        ("rewards", np.zeros((5,), np.float32)),
        ("next_obs", np.zeros((4,), np.float32)),
        ("terminated", np.zeros((4, 1), np.float32)),
    ],
)
def test_bad_shapes_raise(field: str, bad: np.ndarray) -> None:
    buf = ReplayBuffer(10, OBS_DIM, ACT_DIM)
    frag = make_fragment(0, 4)
    setattr(frag, field, bad)
    with pytest.raises(ValueError, match=field):
        buf.add(frag)
    assert len(buf) == 0 and buf.inserted == 0


@pytest.mark.parametrize("n_added", [6, 23])
def test_save_load_round_trip(tmp_path: Path, n_added: int) -> None:
    buf = ReplayBuffer(10, OBS_DIM, ACT_DIM, seed=3)
    buf.add(make_fragment(0, n_added))
    buf.sample(2, 5)
    path = tmp_path / "replay.npz"
    buf.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert data["rewards"].shape == (len(buf),)
    loaded = ReplayBuffer.load(path)

    assert (loaded.capacity, len(loaded), loaded.inserted, loaded.sampled) == (
        buf.capacity,
        len(buf),
        buf.inserted,
        buf.sampled,
    )
    for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(buf, name))
    for _ in range(3):
        a, b = buf.sample(3, 8), loaded.sample(3, 8)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Adding after load continues the ring at the same slot.
    buf.add(make_fragment(100, 4))
    loaded.add(make_fragment(100, 4))
    np.testing.assert_array_equal(loaded.rewards, buf.rewards)


def test_nbytes_close_to_raw_bytes() -> None:
    capacity = 1000
    buf = ReplayBuffer(capacity, OBS_DIM, ACT_DIM)
    raw = capacity * 4 * (2 * OBS_DIM + ACT_DIM + 2)
    assert abs(buf.nbytes - raw) <= 0.1 * raw
