"""Pure-PyTorch algorithms: flow policies, critics, and one module per algorithm.

``ALGORITHMS`` is the registry an experiment file names its algorithm from (``algorithm: {name: isfm, ...}``).
"""

from __future__ import annotations

from typing import Annotated, Union

import numpy as np
import torch
from pydantic import Field

from softflow.algorithms.base import Algorithm, AlgorithmConfig
from softflow.algorithms.flame import FLAME
from softflow.algorithms.fmer import FMER
from softflow.algorithms.isfm import ISFM
from softflow.algorithms.sac import SAC
from softflow.algorithms.sacflow import SACFlow

ALGORITHMS: dict[str, type[Algorithm]] = {"sac": SAC, "isfm": ISFM, "fmer": FMER, "sacflow": SACFlow, "flame": FLAME}

AnyAlgorithmConfig = Annotated[Union[tuple(cls.Config for cls in ALGORITHMS.values())],  # noqa: UP007 (a union of a tuple)
                               Field(discriminator="name")]


def make_algorithm(config: AlgorithmConfig, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                   device: str | torch.device = "cpu") -> Algorithm:
    """Builds the registered algorithm named by ``config.name``."""
    return ALGORITHMS[config.name](config, obs_dim, action_low, action_high, device)


__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "AnyAlgorithmConfig", "make_algorithm"]
