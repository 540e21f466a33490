"""Environment configs and the environment factory: the LQR case study or any registered gymnasium Box env.

MuJoCo ids (``HalfCheetah-v5``, ...) come from gymnasium, ``FrankaKitchen-v1`` from gymnasium-robotics. Kitchen envs
are wrapped in :class:`TaskCompletionInfo`, which adds ``tasks_completed`` and ``success`` to every info dict.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Collection, Iterable
from typing import Annotated, Any, Literal, SupportsFloat

import gymnasium
from pydantic import BaseModel, ConfigDict, Discriminator, Field, FiniteFloat, Tag

from softflow.actors import multigoal
from softflow.actors.lqr import LQREnv

multigoal.register()

Matrix = list[list[FiniteFloat]]


class LQREnvConfig(BaseModel):
    """The max-entropy LQR case study: x' = A x + B u + w, w ~ N(0, W), reward -(x'Qx + u'Ru).

    The discount is ``algorithm.gamma``: the soft-optimal solution is computed with the learner's own gamma."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Literal["LQR"] = "LQR"
    A: Matrix = Field(description="n x n state transition")
    B: Matrix = Field(description="n x m control matrix")
    Q: Matrix = Field(description="n x n state cost, symmetric positive semi-definite")
    R: Matrix = Field(description="m x m action cost, symmetric positive definite")
    W: Matrix = Field(description="n x n process-noise covariance, symmetric positive semi-definite")
    horizon: int = Field(100, ge=1, description="episode length (a time-limit truncation, not a terminal state)")
    init_std: FiniteFloat = Field(1.0, gt=0, description="x_0 ~ N(0, init_std^2 I)")


class GymEnvConfig(BaseModel):
    """Any registered gymnasium environment with a Box action space, e.g. ``HalfCheetah-v5``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(description="gymnasium id")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments for gymnasium.make")


def _env_kind(value: Any) -> str:
    env_id = value.get("id") if isinstance(value, dict) else getattr(value, "id", None)
    return "lqr" if env_id == "LQR" else "gym"


EnvConfig = Annotated[
    Annotated[LQREnvConfig, Tag("lqr")] | Annotated[GymEnvConfig, Tag("gym")], Discriminator(_env_kind)
]


def register_robotics_envs() -> None:
    """Makes the gymnasium-robotics ids (FrankaKitchen-v1, ...) known to gymnasium.make.

    Importing gymnasium_robotics prints a version notice (farama_notifications) to stderr; it is swallowed so that
    a bad ``env.id`` still ends with one line on stderr."""
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics

    gymnasium.register_envs(gymnasium_robotics)


def check_env_id(env_id: str) -> None:
    """Raises ValueError naming ``env.id`` when gymnasium does not know ``env_id``."""
    if env_id not in gymnasium.registry:
        try:
            register_robotics_envs()
        except ImportError:  # gymnasium-robotics missing: only the plain gymnasium ids are known
            pass
    if env_id not in gymnasium.registry:
        raise ValueError(f"env.id: unknown environment '{env_id}'; use 'LQR', '{multigoal.ENV_ID}' or a registered "
                         f"gymnasium id such as 'HalfCheetah-v5' or 'FrankaKitchen-v1'")


def completed_tasks(completed: frozenset[str], step_completions: Iterable[str],
                    goal_tasks: Collection[str]) -> frozenset[str]:
    """The goal tasks completed so far: ``completed`` plus those of ``goal_tasks`` completed in this step."""
    return completed | (frozenset(step_completions) & frozenset(goal_tasks))


class TaskCompletionInfo(gymnasium.Wrapper):
    """Adds to the info of every reset and step of a FrankaKitchen env:

    * ``tasks_completed`` (int): distinct tasks of ``tasks_to_complete`` completed so far this episode;
    * ``task_fraction`` (float in [0, 1]): ``tasks_completed`` over the number of goal tasks, the FMER paper's
      kitchen metric (the mean fraction of an episode's sub-tasks completed);
    * ``success`` (bool): all of them completed.

    KitchenEnv reports each step's completions in ``info["step_task_completions"]``. Its
    ``info["episode_task_completions"]`` is one list that the env clears on reset, so a kept final info would
    empty itself; this wrapper hands out a copy instead."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self.goal_tasks = frozenset(env.unwrapped.goal)  # KitchenEnv.goal maps each task to its target
        self._completed: frozenset[str] = frozenset()

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._completed = frozenset()
        return obs, self._with_counts(info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._completed = completed_tasks(self._completed, info.get("step_task_completions", ()), self.goal_tasks)
        return obs, reward, terminated, truncated, self._with_counts(info)

    def _with_counts(self, info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        if "episode_task_completions" in info:
            info["episode_task_completions"] = list(info["episode_task_completions"])
        info["tasks_completed"] = len(self._completed)
        info["task_fraction"] = len(self._completed) / len(self.goal_tasks)
        info["success"] = self._completed == self.goal_tasks
        return info


def is_kitchen(env_id: str) -> bool:
    """Whether ``env_id`` names a FrankaKitchen env."""
    return env_id.startswith("FrankaKitchen")


def _make_gym_env(config: GymEnvConfig) -> gymnasium.Env:
    """``gymnasium.make``, with a constructor's TypeError about its kwargs turned into one ``env.kwargs:`` line."""
    try:
        return gymnasium.make(config.id, **config.kwargs)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '([^']+)'", str(error))
        if unexpected:
            raise ValueError(f"env.kwargs: {config.id} has no argument '{unexpected.group(1)}'") from error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"env.kwargs: {config.id} rejected {sorted(config.kwargs)}: {first_line}") from error


def make_env(config: LQREnvConfig | GymEnvConfig) -> gymnasium.Env:
    """Builds the env that ``config`` describes (kitchen envs wrapped in :class:`TaskCompletionInfo`)."""
    if isinstance(config, LQREnvConfig):
        return LQREnv(config.A, config.B, config.Q, config.R, config.W, config.horizon, config.init_std)
    check_env_id(config.id)
    env = _make_gym_env(config)
    if is_kitchen(config.id):
        env = TaskCompletionInfo(env)
    return env
