"""Maps from a flow's latent x in R^d to an action, with the log-determinant of their Jacobian.

A bounded Box uses a = low + (high - low) (tanh(x) + 1) / 2, so that
    log pi(a|s) = log p(x|s) - sum_i [log(1 - tanh(x_i)^2) + log((high_i - low_i) / 2)].
An unbounded Box (the LQR case study) uses the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def log1m_tanh_sq(x: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), exact and stable for large |x|."""
    return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


class Squash(nn.Module):
    """Latent-to-action map for a Box action space; identity where the bounds are infinite."""

    def __init__(self, low: torch.Tensor | list[float], high: torch.Tensor | list[float]):
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32)
        high = torch.as_tensor(high, dtype=torch.float32)
        bounded = torch.isfinite(low) & torch.isfinite(high)
        if bool(bounded.any()) and not bool(bounded.all()):
            raise ValueError("action space: either every dimension is bounded or none is")
        self.bounded = bool(bounded.all())
        self.register_buffer("scale", (high - low) / 2 if self.bounded else torch.ones_like(low))
        self.register_buffer("center", (high + low) / 2 if self.bounded else torch.zeros_like(low))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The action for latent ``x``."""
        return self.center + self.scale * torch.tanh(x) if self.bounded else x

    def inverse(self, action: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """The latent of ``action`` (clipped just inside the bounds so atanh stays finite)."""
        if not self.bounded:
            return action
        y = ((action - self.center) / self.scale).clamp(-1 + eps, 1 - eps)
        return torch.atanh(y)

    def log_abs_det_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """sum_i log |d a_i / d x_i| at latent ``x`` (shape (..., d) -> (...))."""
        if not self.bounded:
            return x.new_zeros(x.shape[:-1])
        return (log1m_tanh_sq(x) + torch.log(self.scale)).sum(-1)
