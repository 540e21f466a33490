"""Environment configs and the environment factory: the LQR case study or any registered gymnasium Box env."""

from __future__ import annotations

import contextlib
import io
from typing import Annotated, Any, Literal, Union

import gymnasium
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from softflow.actors.lqr import LQREnv

Matrix = list[list[float]]


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
    init_std: float = Field(1.0, gt=0, description="x_0 ~ N(0, init_std^2 I)")


class GymEnvConfig(BaseModel):
    """Any registered gymnasium environment with a Box action space, e.g. ``HalfCheetah-v5``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(description="gymnasium id")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments for gymnasium.make")


def _env_kind(value: Any) -> str:
    env_id = value.get("id") if isinstance(value, dict) else getattr(value, "id", None)
    return "lqr" if env_id == "LQR" else "gym"


EnvConfig = Annotated[
    Union[Annotated[LQREnvConfig, Tag("lqr")], Annotated[GymEnvConfig, Tag("gym")]], Discriminator(_env_kind)
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
        raise ValueError(f"env.id: unknown environment '{env_id}'; use 'LQR' or a registered gymnasium id "
                         f"such as 'HalfCheetah-v5' or 'FrankaKitchen-v1'")


def make_env(config: LQREnvConfig | GymEnvConfig) -> gymnasium.Env:
    if isinstance(config, LQREnvConfig):
        return LQREnv(config.A, config.B, config.Q, config.R, config.W, config.horizon, config.init_std)
    check_env_id(config.id)
    return gymnasium.make(config.id, **config.kwargs)
