"""The fixed energy of the fixed-energy matching checks (test_fixed_energy.py, test_flame.py): Q = alpha log p of a
four-component 2D Gaussian mixture with unequal weights, exact samples of it, and the squared MMD and mode weights
that compare a policy's samples with them."""

import math
from dataclasses import dataclass

import torch

ALPHA = 0.5
MEANS = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
STD = 0.4


@dataclass(frozen=True)
class Mixture:
    """sum_k w_k N(mu_k, std^2 I) in 2D, and the temperature alpha of Q = alpha log p."""

    means: torch.Tensor = MEANS
    weights: torch.Tensor = WEIGHTS
    std: float = STD
    alpha: float = ALPHA

    def log_density(self, a: torch.Tensor) -> torch.Tensor:
        """log sum_k w_k N(a; mu_k, std^2 I) for a (..., 2)."""
        sq = (a.unsqueeze(-2) - self.means).pow(2).sum(-1) / self.std**2
        log_components = -0.5 * sq - 2 * math.log(self.std) - math.log(2 * math.pi) + self.weights.log()
        return torch.logsumexp(log_components, -1)


MIXTURE = Mixture()
# The multi-goal task's scale: four equal lobes of std 0.1 at radius 0.45 on the axes, inside the action box.
LOBES = Mixture(0.45 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), torch.full((4,), 0.25),
                0.1, 1.0)


class FixedEnergy(torch.nn.Module):
    """Stands in for the twin critic in policy improvement: min Q(s, a) = alpha log p_mixture(a)."""

    def __init__(self, mixture: Mixture = MIXTURE):
        super().__init__()
        self.mixture = mixture

    def min_q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.mixture.alpha * self.mixture.log_density(action)

    def candidates_min_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.min_q(obs, actions)


def exact_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[component] + STD * torch.randn(n, 2, generator=generator)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.5) -> float:
    """Biased squared maximum mean discrepancy with a Gaussian kernel."""
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2)).mean()
    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def mode_weights(samples: torch.Tensor) -> torch.Tensor:
    nearest = torch.cdist(samples, MEANS).argmin(-1)
    return torch.bincount(nearest, minlength=4).float() / len(samples)
