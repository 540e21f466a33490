"""Tests for RolloutWorker with small deterministic test-local environments."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit

from softflow.actors.fragment import Fragment
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker, flatten_obs


class CountEnv(gymnasium.Env):
    """Observation [t, start, last_action]; reward t after step t; terminates at ``episode_len``.

    ``start`` is drawn from the env's RNG at reset, so it identifies the
    episode and depends on the seed.  An episode of length L returns L(L+1)/2.
    """

    def __init__(self, episode_len: int = 3) -> None:
        self.episode_len = episode_len
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.t = 0
        self.start = 0.0

    def _obs(self, action: float = 0.0) -> np.ndarray:
        return np.array([self.t, self.start, action], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.t = 0
        self.start = float(self.np_random.integers(1000, 2000))
        return self._obs(), {}

    def step(self, action: np.ndarray):
        self.t += 1
        a = float(np.asarray(action).reshape(-1)[0])
        terminated = self.t >= self.episode_len
        return self._obs(a), float(self.t), terminated, False, {"t": self.t, "start": self.start}


class DictEnv(gymnasium.Env):
    """A Dict-observation env in the style of FrankaKitchen."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict(
            {
                "observation": spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float64),
                "desired_goal": spaces.Dict({"kettle": spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float64)}),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.t = 0

    def _obs(self) -> dict[str, Any]:
        return {
            "observation": np.full(4, self.t, dtype=np.float64),
            "desired_goal": {"kettle": np.array([0.25, -0.5])},
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray):
        self.t += 1
        return self._obs(), 0.0, False, self.t >= 4, {}


def zero_act(obs: np.ndarray, explore: bool) -> np.ndarray:
    return np.zeros((obs.shape[0], 1), dtype=np.float32)


def test_termination_next_obs_and_returns() -> None:
    worker = RolloutWorker(lambda i: CountEnv(episode_len=3), 1, zero_act, seed=0)
    frag = worker.run(7)
    assert len(frag) == 7 and worker.env_steps == 7
    np.testing.assert_array_equal(frag.rewards, [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(frag.terminated, [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(frag.truncated, np.zeros(7))
    # next_obs at the terminal step is the final observation (t = 3), not the reset one.
    np.testing.assert_array_equal(frag.next_obs[:, 0], [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(frag.obs[:, 0], [0, 1, 2, 0, 1, 2, 0])
    # Episodes differ in `start`; the terminal transition keeps the old episode's.
    assert frag.next_obs[2, 1] == frag.obs[2, 1]
    assert frag.obs[3, 1] != frag.obs[2, 1]
    # Within an episode, next_obs[t] == obs[t + 1].
    within = frag.terminated[:-1] == 0
    np.testing.assert_array_equal(frag.next_obs[:-1][within], frag.obs[1:][within])
    assert frag.episode_returns == [6.0, 6.0]
    assert frag.episode_lengths == [3, 3]
    assert [info["t"] for info in frag.episode_infos] == [3, 3]
    assert frag.obs.dtype == np.float32 and frag.actions.shape == (7, 1)


def test_truncation_is_not_terminal() -> None:
    def env_fn(i: int) -> gymnasium.Env:
        return TimeLimit(CountEnv(episode_len=10), max_episode_steps=2)

    worker = RolloutWorker(env_fn, 1, zero_act, seed=0)
    frag = worker.run(5)
    np.testing.assert_array_equal(frag.truncated, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(frag.terminated, np.zeros(5))
    np.testing.assert_array_equal(frag.next_obs[:, 0], [1, 2, 1, 2, 1])
    assert frag.episode_returns == [3.0, 3.0]
    assert frag.episode_lengths == [2, 2]


def test_episodes_continue_across_runs() -> None:
    worker = RolloutWorker(lambda i: CountEnv(episode_len=4), 1, zero_act, seed=0)
    first = worker.run(3)
    assert first.episode_returns == []
    second = worker.run(3)
    np.testing.assert_array_equal(second.obs[:, 0], [3, 0, 1])
    np.testing.assert_array_equal(second.terminated, [1, 0, 0])
    assert second.episode_returns == [10.0] and second.episode_lengths == [4]
    assert worker.env_steps == 6
    both = Fragment.concat([first, second])
    np.testing.assert_array_equal(both.obs[1:, 0], [1, 2, 3, 0, 1])


def test_multiple_envs_batched() -> None:
    calls: list[tuple[tuple[int, ...], bool]] = []

    def act_fn(obs: np.ndarray, explore: bool) -> np.ndarray:
        calls.append((obs.shape, explore))
        return np.linspace(-0.5, 0.5, obs.shape[0], dtype=np.float32)[:, None]

    worker = RolloutWorker(lambda i: CountEnv(episode_len=2 + i), 3, act_fn, seed=10)
    assert (worker.obs_dim, worker.act_dim) == (3, 1)
    frag = worker.run(4, explore=False)
    assert calls == [((3, 3), False)] * 4
    assert len(frag) == 12
    # Time-major layout: index t * num_envs + i.
    np.testing.assert_array_equal(frag.actions[:, 0], np.tile([-0.5, 0.0, 0.5], 4))
    np.testing.assert_array_equal(frag.rewards.reshape(4, 3), [[1, 1, 1], [2, 2, 2], [1, 3, 3], [2, 1, 4]])
    np.testing.assert_array_equal(frag.terminated.reshape(4, 3), [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1]])
    finished = sorted(zip(frag.episode_lengths, frag.episode_returns))
    assert finished == [(2, 3.0), (2, 3.0), (3, 6.0), (4, 10.0)]
    # Env i was reset with seed 10 + i.
    starts = frag.obs[:3, 1]
    for i in range(3):
        ref = CountEnv()
        ref.reset(seed=10 + i)
        assert starts[i] == ref.start


def test_actions_clipped_and_stored_as_executed() -> None:
    worker = RolloutWorker(
        lambda i: CountEnv(), 2, lambda obs, explore: np.array([[5.0], [-0.25]], np.float32), seed=0
    )
    frag = worker.run(1)
    np.testing.assert_array_equal(frag.actions[:, 0], [1.0, -0.25])
    np.testing.assert_array_equal(frag.next_obs[:, 2], [1.0, -0.25])


def test_bad_action_shape_raises() -> None:
    worker = RolloutWorker(lambda i: CountEnv(), 2, lambda obs, explore: np.zeros((3, 1)), seed=0)
    with pytest.raises(ValueError, match="act_fn"):
        worker.run(1)


def test_dict_observations_flattened() -> None:
    worker = RolloutWorker(lambda i: DictEnv(), 2, lambda obs, explore: np.zeros((2, 2)), seed=0)
    assert worker.obs_dim == 6
    assert isinstance(worker.observation_space, spaces.Box)
    assert worker.observation_space.shape == (6,)
    frag = worker.run(5)
    assert frag.obs.shape == (10, 6) and frag.obs.dtype == np.float32
    env = DictEnv()
    final = {"observation": np.full(4, 4.0), "desired_goal": {"kettle": np.array([0.25, -0.5])}}
    expected = flatten_obs(env.observation_space, final)
    np.testing.assert_array_equal(expected, spaces.flatten(env.observation_space, final).astype(np.float32))
    np.testing.assert_array_equal(frag.next_obs[6], expected)
    np.testing.assert_array_equal(frag.truncated.reshape(5, 2)[:, 0], [0, 0, 0, 1, 0])
    assert frag.episode_lengths == [4, 4]


def test_reproducible_random_actions() -> None:
    def run(seed: int) -> Fragment:
        worker = RolloutWorker(lambda i: CountEnv(episode_len=3), 2, zero_act, seed=seed)
        return Fragment.concat([worker.run(4, random_actions=True), worker.run(4, random_actions=True)])

    a, b, c = run(7), run(7), run(8)
    for name in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.actions, c.actions)
    assert np.all(np.abs(a.actions) <= 1.0)
    # Both envs got different action seeds.
    assert not np.array_equal(a.actions[0::2], a.actions[1::2])


def test_pendulum_truncates_at_200_into_replay() -> None:
    worker = RolloutWorker(lambda i: gymnasium.make("Pendulum-v1"), 2, zero_act, seed=0)
    frag = worker.run(201, random_actions=True)
    truncated = frag.truncated.reshape(201, 2)
    assert truncated[199].tolist() == [1.0, 1.0] and truncated.sum() == 2
    assert frag.terminated.sum() == 0
    assert frag.episode_lengths == [200, 200]
    np.testing.assert_allclose(sum(frag.rewards.reshape(201, 2)[:200, 0]), frag.episode_returns[0], rtol=1e-5)
    buf = ReplayBuffer(1000, worker.obs_dim, worker.act_dim)
    buf.add(frag)
    assert len(buf) == 402
    worker.close()


def test_exploration_noise_is_gaussian_scaled_to_the_half_range_and_only_while_exploring():
    class WideEnv(CountEnv):
        def __init__(self):
            super().__init__(episode_len=10_000)
            self.action_space = spaces.Box(-4.0, 4.0, shape=(1,), dtype=np.float32)

    worker = RolloutWorker(lambda i: WideEnv(), 2, lambda obs, explore: np.full((len(obs), 1), 1.0), seed=0,
                           exploration_noise=0.1)
    noisy = worker.run(2000).actions[:, 0]
    assert abs(noisy.mean() - 1.0) < 0.02 and abs(noisy.std() - 0.4) < 0.02  # 0.1 x half-range 4
    assert np.array_equal(worker.run(10, explore=False).actions, np.ones((20, 1), np.float32))
    assert noisy.dtype == np.float32
