"""Step several gymnasium environments with batched inference, CleanRL style."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from softflow.actors.fragment import Fragment


def flatten_obs(space: spaces.Space, obs: Any) -> np.ndarray:
    """Return ``obs`` as a flat float32 vector (``Dict`` spaces via ``spaces.flatten``)."""
    if isinstance(space, spaces.Box):
        return np.asarray(obs, dtype=np.float32).reshape(-1)
    return np.asarray(spaces.flatten(space, obs), dtype=np.float32)


class EnvError(RuntimeError):
    """An environment that could not be built, raised, or returned a non-finite observation or reward; the message
    is one line naming the env."""


def env_name(env: gymnasium.Env) -> str:
    """The gymnasium id of ``env``, or its class name for one made without ``gymnasium.make`` (the LQR)."""
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__.removesuffix("Env") or "env"


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class EpisodeStep:
    """Where an env call is, "step N of an episode", as the error messages say it. Made on every env step and
    formatted only when a message needs it."""

    __slots__ = ("episode", "number")

    def __init__(self, number: int, episode: str = "an episode"):
        self.number, self.episode = number, episode

    def __str__(self) -> str:
        return f"step {self.number} of {self.episode}"


def check_finite(env: gymnasium.Env, obs: np.ndarray, reward: float, where: str | EpisodeStep) -> None:
    """Raises :class:`EnvError` when ``obs`` or ``reward`` is NaN or infinite (``where``: at which step)."""
    what = "observation" if not np.isfinite(obs).all() else "reward" if not math.isfinite(reward) else None
    if what is not None:
        raise EnvError(f"env {env_name(env)} returned a non-finite {what} at {where} (unstable physics?)")


def _flat_box(space: spaces.Space) -> spaces.Box:
    """The flat float32 ``Box`` that :func:`flatten_obs` maps ``space`` into."""
    if isinstance(space, spaces.Box) and len(space.shape) == 1 and space.dtype == np.float32:
        return space
    flat = spaces.flatten_space(space)
    if not isinstance(flat, spaces.Box):
        raise TypeError(f"observation space {space} does not flatten to a Box")
    return spaces.Box(
        low=flat.low.reshape(-1).astype(np.float32),
        high=flat.high.reshape(-1).astype(np.float32),
        dtype=np.float32,
    )


class RolloutWorker:
    """Steps ``num_envs`` environments in lockstep, one batched ``act_fn`` call per step.

    Episodes continue across :meth:`run` calls.  The action stored in a
    fragment is the one actually executed, i.e. the policy output clipped to
    the action space bounds (infinite bounds leave it unchanged). An env that
    raises, or returns a NaN or infinite observation or reward, raises
    :class:`EnvError` naming the env and the step: the run stops rather than
    train on it.

    Attributes:
        observation_space: flat float32 ``Box`` of env 0's observations.
        action_space: ``Box`` action space of env 0.
        obs_dim: length of a flattened observation.
        act_dim: length of a flattened action.
        env_steps: total transitions produced so far.
        policy_version: copied into every fragment; set it when weights change.
    """

    def __init__(
        self,
        env_fn: Callable[[int], gymnasium.Env],
        num_envs: int,
        act_fn: Callable[[np.ndarray, bool], np.ndarray],
        seed: int,
        exploration_noise: float = 0.0,
    ) -> None:
        """Build the envs (``env_fn(i)``) and reset env ``i`` with seed ``seed + i``. ``exploration_noise`` is
        the std of Gaussian noise added to the policy's actions when exploring, as a fraction of each action
        dimension's half-range (of 1 where the space is unbounded); 0 adds none."""
        if num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        try:
            self.envs: list[gymnasium.Env] = [env_fn(i) for i in range(num_envs)]
        except Exception as exc:
            raise EnvError(f"the env could not be built ({first_line(exc)})") from exc
        self.num_envs = num_envs
        self.act_fn = act_fn
        self.seed = seed
        self._raw_obs_space = self.envs[0].observation_space
        self.observation_space = _flat_box(self._raw_obs_space)
        action_space = self.envs[0].action_space
        if not isinstance(action_space, spaces.Box):
            raise TypeError(f"RolloutWorker needs a Box action space, got {action_space}")
        self.action_space: spaces.Box = action_space
        self.obs_dim = int(self.observation_space.shape[0])
        self.act_dim = int(np.prod(action_space.shape))
        self._act_low = action_space.low.reshape(-1).astype(np.float32)
        self._act_high = action_space.high.reshape(-1).astype(np.float32)
        half_range = (self._act_high - self._act_low) / 2
        self._noise_scale = exploration_noise * np.where(np.isfinite(half_range), half_range, 1.0)
        self._noise_rng = np.random.default_rng(seed)
        self.env_steps = 0
        self.policy_version = 0

        self._obs = np.zeros((num_envs, self.obs_dim), dtype=np.float32)
        for i, env in enumerate(self.envs):
            env.action_space.seed(seed + i)
            with np.errstate(all="ignore"):
                obs, _ = self._call(env, env.reset, "its first reset", seed=seed + i)
                self._obs[i] = flatten_obs(env.observation_space, obs)
            check_finite(env, self._obs[i], 0.0, "its first reset")
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)

    @staticmethod
    def _call(env: gymnasium.Env, method: Callable, where: str | EpisodeStep, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` of ``env``, an exception in it turned into one :class:`EnvError` line."""
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            raise EnvError(f"env {env_name(env)} raised {first_line(exc)} in {where}") from exc

    def _actions(self, random_actions: bool, explore: bool) -> np.ndarray:
        """One (num_envs, act_dim) float32 batch of actions, clipped to the bounds."""
        if random_actions:
            actions = np.stack(
                [np.asarray(env.action_space.sample(), dtype=np.float32).reshape(-1) for env in self.envs]
            )
        else:
            actions = np.asarray(self.act_fn(self._obs.copy(), explore), dtype=np.float32)
            if actions.size != self.num_envs * self.act_dim:
                raise ValueError(
                    f"act_fn returned shape {actions.shape}, expected ({self.num_envs}, {self.act_dim})"
                )
            actions = actions.reshape(self.num_envs, self.act_dim)
            if explore and self._noise_scale.any():
                actions = actions + self._noise_scale * self._noise_rng.standard_normal(actions.shape)
        return np.clip(actions, self._act_low, self._act_high).astype(np.float32)

    def run(self, num_steps: int, random_actions: bool = False, explore: bool = True) -> Fragment:
        """Step every env ``num_steps`` times and return the transitions.

        Transitions are flattened time-major: index ``t * num_envs + i`` is
        step ``t`` of env ``i``.  ``random_actions`` samples each env's
        (seeded) action space instead of calling ``act_fn``; ``explore`` is
        passed through to ``act_fn``.
        """
        n, e = num_steps, self.num_envs
        obs = np.zeros((n, e, self.obs_dim), dtype=np.float32)
        actions = np.zeros((n, e, self.act_dim), dtype=np.float32)
        rewards = np.zeros((n, e), dtype=np.float32)
        next_obs = np.zeros((n, e, self.obs_dim), dtype=np.float32)
        terminated = np.zeros((n, e), dtype=np.float32)
        truncated = np.zeros((n, e), dtype=np.float32)
        episode_returns: list[float] = []
        episode_lengths: list[int] = []
        episode_infos: list[dict[str, Any]] = []

        for t in range(n):
            action = self._actions(random_actions, explore)
            obs[t] = self._obs
            actions[t] = action
            for i, env in enumerate(self.envs):
                step_action = action[i].reshape(self.action_space.shape)
                where = EpisodeStep(int(self._lengths[i]) + 1)
                with np.errstate(all="ignore"):  # non-finite values are caught below, with the env named
                    o, r, term, trunc, info = self._call(env, env.step, where, step_action)
                    flat = flatten_obs(env.observation_space, o)
                    rewards[t, i] = r
                check_finite(env, flat, float(rewards[t, i]), where)
                next_obs[t, i] = flat
                terminated[t, i] = float(term)
                truncated[t, i] = float(trunc)
                self._returns[i] += float(r)
                self._lengths[i] += 1
                if term or trunc:
                    episode_returns.append(float(self._returns[i]))
                    episode_lengths.append(int(self._lengths[i]))
                    episode_infos.append(dict(info))
                    self._returns[i] = 0.0
                    self._lengths[i] = 0
                    with np.errstate(all="ignore"):
                        o, _ = self._call(env, env.reset, "a reset")
                        flat = flatten_obs(env.observation_space, o)
                    check_finite(env, flat, 0.0, "a reset")
                self._obs[i] = flat

        self.env_steps += n * e
        return Fragment(
            obs=obs.reshape(n * e, self.obs_dim),
            actions=actions.reshape(n * e, self.act_dim),
            rewards=rewards.reshape(n * e),
            next_obs=next_obs.reshape(n * e, self.obs_dim),
            terminated=terminated.reshape(n * e),
            truncated=truncated.reshape(n * e),
            policy_version=self.policy_version,
            episode_returns=episode_returns,
            episode_lengths=episode_lengths,
            episode_infos=episode_infos,
        )

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()
