"""Flow sampling and log-densities against the Gaussian closed form of an affine velocity field.

With v(x, t, s) = M x + c + G s every solver step is affine, x_{k+1} = F x_k + h(s) with
F = I + dt M (Euler) or I + dt M + dt^2 M^2 / 2 (midpoint), so x_K ~ N(mu(s), F^K F^K^T) exactly.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from softflow.algorithms.fields import MLPVelocity, VelocityField
from softflow.algorithms.flows import FlowPolicy
from softflow.algorithms.policy import standard_normal_log_prob
from softflow.algorithms.squash import Squash, log1m_tanh_sq

D, OBS = 2, 3


class AffineVelocity(VelocityField):
    def __init__(self):
        super().__init__()
        self.act_dim = D
        g = torch.Generator().manual_seed(0)
        self.M = nn.Parameter(torch.tensor([[0.3, -0.4], [0.2, -0.5]]))
        self.c = nn.Parameter(torch.tensor([0.5, -1.0]))
        self.G = nn.Parameter(torch.randn(D, OBS, generator=g) * 0.3)

    def forward(self, x, t, obs):
        return x @ self.M.T + self.c + obs @ self.G.T


def closed_form(velocity: AffineVelocity, steps: int, integrator: str, obs: torch.Tensor, base_std: float = 1.0):
    """Mean (B, d) and covariance (d, d) of x_K for the affine field from x_0 ~ N(0, base_std^2 I)."""
    dt = 1.0 / steps
    M = velocity.M.detach().double()
    eye = torch.eye(D, dtype=torch.float64)
    F = eye + dt * M if integrator == "euler" else eye + dt * M + 0.5 * dt**2 * M @ M
    H = dt * eye if integrator == "euler" else dt * (eye + 0.5 * dt * M)
    b = (velocity.c.detach().double() + obs.double() @ velocity.G.detach().double().T) @ H.T
    mean = torch.zeros_like(b)
    for _ in range(steps):
        mean = mean @ F.T + b
    FK = torch.linalg.matrix_power(F, steps)
    return mean, base_std**2 * FK @ FK.T


def gaussian_log_prob(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x.double())


@pytest.mark.parametrize("integrator,base_std", [("euler", 1.0), ("midpoint", 1.0), ("euler", 0.5)])
def test_affine_flow_is_gaussian_samples_log_density_entropy(integrator, base_std):
    torch.manual_seed(0)
    velocity = AffineVelocity()
    policy = FlowPolicy(velocity, Squash([-math.inf] * D, [math.inf] * D), steps=4, integrator=integrator,
                        base_std=base_std)
    obs = torch.randn(1, OBS).repeat(20000, 1)
    with torch.no_grad():
        sample = policy.sample(obs, with_log_prob=True)
    mean, cov = closed_form(velocity, 4, integrator, obs[:1], base_std)
    x = sample.latent.double()
    assert torch.allclose(x.mean(0), mean[0], atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, rtol=0.05, atol=0.01)
    expected = gaussian_log_prob(sample.latent, mean[0], cov)
    assert torch.allclose(sample.log_prob.double(), expected, atol=1e-4)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
    assert abs(float(-sample.log_prob.mean()) - float(entropy)) < 0.03
    assert abs(float(policy.entropy(obs[:1], 20000)) - float(entropy)) < 0.03


@pytest.mark.parametrize("base_std", [1.0, 0.5])
def test_flow_matching_loss_draws_its_noise_from_the_base(base_std):
    """With v = 0 (an untrained MLP's zero last layer) the loss is E||x_1 - x_0||^2 = ||x_1||^2 + d base_std^2."""
    torch.manual_seed(0)
    policy = FlowPolicy(MLPVelocity(OBS, D, [16]), Squash([-1.0] * D, [1.0] * D), base_std=base_std)
    targets = torch.tensor([0.6, -0.8]).expand(64, 256, D)
    weights = torch.full((64, 256), 1 / 256)
    with torch.no_grad():
        loss = policy.flow_matching_loss(torch.randn(64, OBS), targets, weights)
    assert float(loss) == pytest.approx(1.0 + D * base_std**2, rel=0.01)


def test_log_prob_is_the_density_of_the_actions_under_tanh_squashing():
    torch.manual_seed(1)
    velocity = AffineVelocity()
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    policy = FlowPolicy(velocity, Squash(low, high), steps=3)
    obs = torch.randn(64, OBS)
    with torch.no_grad():
        sample = policy.sample(obs, with_log_prob=True)
    mean, cov = closed_form(velocity, 3, "euler", obs)
    latent_log_prob = torch.stack([gaussian_log_prob(sample.latent[i], mean[i], cov) for i in range(64)])
    jac = torch.stack([torch.autograd.functional.jacobian(policy.squash, sample.latent[i].double())
                       for i in range(64)])
    expected = latent_log_prob - torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(sample.log_prob.double(), expected, atol=1e-4)
    assert torch.all(sample.action >= low) and torch.all(sample.action <= high)


def test_tanh_correction_matches_numerical_jacobian_and_stays_finite():
    squash = Squash([-1.0, -3.0, 0.0], [1.0, 1.0, 10.0])
    x = torch.tensor([[0.3, -1.2, 2.5], [-4.0, 0.0, 0.7]], dtype=torch.float64)
    eps = 1e-6
    numeric = torch.stack([(squash(x + eps * torch.eye(3)[i]) - squash(x - eps * torch.eye(3)[i]))[:, i] / (2 * eps)
                           for i in range(3)], dim=-1)
    assert torch.allclose(squash.log_abs_det_jacobian(x), numeric.log().sum(-1), atol=1e-6)
    big = torch.tensor([-30.0, 30.0], dtype=torch.float64)
    assert torch.allclose(log1m_tanh_sq(big), 2 * (math.log(2) - big.abs()), atol=1e-12)
    assert torch.allclose(squash.inverse(squash(x)), x, atol=1e-6)


def test_identity_squash_for_unbounded_actions():
    squash = Squash([-math.inf], [math.inf])
    x = torch.randn(5, 1)
    assert torch.equal(squash(x), x) and torch.equal(squash.log_abs_det_jacobian(x), torch.zeros(5))
    with pytest.raises(ValueError):
        Squash([-1.0, -math.inf], [1.0, math.inf])


def test_hutchinson_log_prob_has_the_first_order_expectation():
    """E[eps^T (F - I) eps] = tr(F - I), so E[hutchinson - exact] = K (log det F - tr(F - I)) per sample."""
    torch.manual_seed(2)
    velocity = AffineVelocity()
    kwargs = dict(squash=Squash([-math.inf] * D, [math.inf] * D), steps=8)
    exact = FlowPolicy(velocity, **kwargs, log_prob_method="exact")
    hutch = FlowPolicy(velocity, **kwargs, log_prob_method="hutchinson")
    obs = torch.randn(40000, OBS)
    noise = torch.randn(40000, D)
    with torch.no_grad():
        a, b = exact.sample(obs, noise=noise, with_log_prob=True), hutch.sample(obs, noise=noise, with_log_prob=True)
    assert torch.equal(a.latent, b.latent)
    F = torch.eye(D) + velocity.M.detach() / 8
    expected_gap = 8 * (torch.logdet(F) - torch.trace(F - torch.eye(D)))
    assert abs(float((b.log_prob - a.log_prob).mean()) - float(expected_gap)) < 0.01


@pytest.mark.parametrize("integrator", ["euler", "midpoint"])
def test_hutchinson_is_unbiased_for_the_exact_log_det_of_a_gaussian_flow(integrator):
    """FMER's estimator (flows.py, Hutchinson) on the affine field v = M x + c + G s: the flow map of the ODE has
    log det = tr M exactly (Liouville), and each step's term dt eps^T M eps has mean dt tr M and, with a Rademacher
    probe, variance dt^2 sum_{i<j} (M_ij + M_ji)^2, so over K steps the estimate of log N(x_0) - log p is tr M
    with variance K dt^2 (M_01 + M_10)^2 here. The mean over N probes must match tr M within 4 standard errors
    (the stated tolerance), and its spread the closed-form variance within 5 %. With midpoint steps the exact
    log-det of the sampled map is within O(dt^3) of tr M, so the mean matches flows.py's exact value too."""
    torch.manual_seed(4)
    velocity = AffineVelocity()
    steps, n = 10, 40000
    kwargs = dict(squash=Squash([-math.inf] * D, [math.inf] * D), steps=steps, integrator=integrator)
    hutch = FlowPolicy(velocity, **kwargs, log_prob_method="hutchinson")
    exact = FlowPolicy(velocity, **kwargs, log_prob_method="exact")
    obs, noise = torch.randn(n, OBS), torch.randn(n, D)
    with torch.no_grad():
        estimate = standard_normal_log_prob(noise) - hutch.sample(obs, noise=noise, with_log_prob=True).log_prob
        exact_log_det = standard_normal_log_prob(noise) - exact.sample(obs, noise=noise, with_log_prob=True).log_prob
    M = velocity.M.detach().double()
    variance = steps * (1 / steps) ** 2 * float(M[0, 1] + M[1, 0]) ** 2
    standard_error = math.sqrt(variance / n)
    assert abs(float(estimate.double().mean()) - float(torch.trace(M))) < 4 * standard_error
    assert float(estimate.double().var()) == pytest.approx(variance, rel=0.05)
    if integrator == "midpoint":
        assert abs(float(exact_log_det.double().mean()) - float(torch.trace(M))) < standard_error
        assert abs(float(estimate.double().mean() - exact_log_det.double().mean())) < 5 * standard_error


def test_num_samples_layout_and_deterministic_noise():
    torch.manual_seed(3)
    policy = FlowPolicy(MLPVelocity(OBS, D, [16]), Squash([-1.0] * D, [1.0] * D), steps=3)
    for p in policy.parameters():
        nn.init.normal_(p, std=0.5)
    obs = torch.randn(5, OBS)
    sample = policy.sample(obs, num_samples=4, with_log_prob=True)
    assert sample.action.shape == (5, 4, D) and sample.log_prob.shape == (5, 4)
    zero = policy.sample(obs, noise=torch.zeros(5, D))
    again = policy.sample(obs, noise=torch.zeros(5, D))
    assert torch.equal(zero.action, again.action)
    one_by_one = torch.stack([policy.sample(obs[i:i + 1], noise=torch.zeros(1, D)).action[0] for i in range(5)])
    assert torch.allclose(zero.action, one_by_one, atol=1e-6)
    assert np.isfinite(sample.log_prob.detach().numpy()).all()


def test_mlp_closed_form_jacobian_matches_autograd():
    torch.manual_seed(0)
    velocity = MLPVelocity(OBS, 3, [16, 16], time_dim=8)
    nn.init.normal_(velocity.net[-1].weight, std=0.5)
    x, t, obs = torch.randn(5, 3), torch.rand(5, 1), torch.randn(5, OBS)
    v, jac = velocity.forward_and_jacobian(x, t, obs)
    generic_v, generic_jac = VelocityField.forward_and_jacobian(velocity, x, t, obs)
    autograd_jac = torch.stack([torch.autograd.functional.jacobian(lambda xx: velocity(xx[None], t[i:i + 1],
                                                                                        obs[i:i + 1])[0], x[i])
                                for i in range(5)])
    torch.testing.assert_close(v, velocity(x, t, obs))
    torch.testing.assert_close(jac, autograd_jac)
    torch.testing.assert_close(generic_jac, autograd_jac)
    assert jac.abs().max() > 0.1


def test_a_folding_euler_step_gets_the_floored_log_det_not_infinity():
    """v = -x / dt maps every x to 0 in one Euler step: det(I + dt J) = 0 exactly. Without the floor log pi would
    be +inf (and the soft TD target -inf); with it each such step contributes d * STEP_LOG_DET_FLOOR."""
    from softflow.algorithms.flows import STEP_LOG_DET_FLOOR

    class Collapse(VelocityField):
        def __init__(self):
            super().__init__()
            self.act_dim = D
            self.scale = nn.Parameter(torch.tensor(-1.0))

        def forward(self, x, t, obs):
            return self.scale * x  # dt = 1 with one step: x + v = 0

    policy = FlowPolicy(Collapse(), Squash([-math.inf] * D, [math.inf] * D), steps=1)
    with torch.no_grad():
        sample = policy.sample(torch.zeros(5, OBS), noise=torch.ones(5, D), with_log_prob=True)
    assert torch.equal(sample.latent, torch.zeros(5, D))
    base = -0.5 * D * math.log(2 * math.pi) - 0.5 * D  # log N(1; 0, I) in D dims
    assert torch.allclose(sample.log_prob, torch.full((5,), base - D * STEP_LOG_DET_FLOOR))
