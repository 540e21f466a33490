"""FLAME's estimators (flame.py, meanflow.py) against closed forms.

Straight path towards N(M, diag(S^2)) from N(0, I): x_t = t M + S_t x_0 with S_t^2 = (1 - t)^2 + t^2 S^2, so the
average velocity over [r, t] from x at time r is u(x, r, t) = M + (S_t - S_r) / ((t - r) S_r) (x - r M), with
u(x, t, t) = v(x, t) = M + S_t' / S_t (x - t M), S_t' = (t S^2 - (1 - t)) / S_t, and u(x, 0, 1) = M + (S - 1) x.
The one-step sample, the MeanFlow identity and the decoupled density are checked on this field; the Q-reweighted
targets against the posterior of a Gaussian (or box-truncated Gaussian) target, in 2-D and in a correlated 3-D.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import jvp

from softflow.algorithms.flame import mixture_candidates, posterior_candidates, truncated_normal
from softflow.algorithms.meanflow import MeanFlowNetwork, MeanFlowPolicy, meanflow_target
from softflow.algorithms.squash import Squash

M = torch.tensor([0.8, -0.3], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)
UNBOUNDED = Squash([-math.inf] * 2, [math.inf] * 2)


def spread(t):
    return ((1 - t) ** 2 + t**2 * S**2).sqrt()


class GaussianMeanFlow(nn.Module):
    """The exact average velocity of the Gaussian path (module docstring), with MeanFlowNetwork's interface."""

    act_dim = 2

    def forward(self, x, r, t, obs):
        gap = t - r
        instantaneous = (t * S**2 - (1 - t)) / spread(t) ** 2
        average = (spread(t) - spread(r)) / (gap.clamp(min=1e-12) * spread(r))
        return M + torch.where(gap > 1e-9, average, instantaneous) * (x - r * M)

    def from_zero_to_one(self, x, obs):
        zero = x.new_zeros(x.shape[0], 1)
        return self(x, zero, zero + 1, obs)

    def instantaneous(self, x, tau, obs):
        return self(x, tau, tau, obs)

    def instantaneous_and_jacobian(self, x, tau, obs):
        slope = (tau * S**2 - (1 - tau)) / spread(tau) ** 2
        return self.instantaneous(x, tau, obs), torch.diag_embed(slope.expand_as(x))


def gaussian_log_prob(x):
    return torch.distributions.Normal(M, S).log_prob(x).sum(-1)


def test_the_one_step_fast_path_is_the_network_from_zero_to_one():
    torch.manual_seed(0)
    network = MeanFlowNetwork(3, 2, [16], time_dim=8)
    nn.init.normal_(network.field.net[-1].weight, std=0.5)
    x, obs, zero = torch.randn(5, 2), torch.randn(5, 3), torch.zeros(5, 1)
    torch.testing.assert_close(network.from_zero_to_one(x, obs), network(x, zero, zero + 1, obs))
    assert network.from_zero_to_one(x, obs).abs().max() > 0.05


def test_meanflow_target_is_the_identity_of_the_exact_average_velocity():
    torch.manual_seed(0)
    field = GaussianMeanFlow()
    x = torch.randn(64, 2, dtype=torch.float64)
    r = torch.rand(64, 1, dtype=torch.float64) * 0.6
    t = r + torch.rand(64, 1, dtype=torch.float64) * (1 - r)
    u, target = meanflow_target(field, x, r, t, None, field.instantaneous(x, r, None))
    torch.testing.assert_close(target, u, atol=1e-9, rtol=0)
    reversed_sign = 2 * field.instantaneous(x, r, None) - target  # v - (t - r) du/dr: MeanFlow's form, our times
    assert (reversed_sign - u).abs().max() > 0.1


def test_one_step_sample_is_the_target_gaussian_and_the_decoupled_density_converges_to_its_log_density():
    torch.manual_seed(1)
    obs = torch.zeros(40000, 1, dtype=torch.float64)
    policy = MeanFlowPolicy(GaussianMeanFlow(), UNBOUNDED, entropy_steps=20).double()
    with torch.no_grad():
        sample = policy.sample(obs, noise=torch.randn(40000, 2, dtype=torch.float64), with_log_prob=True)
    torch.testing.assert_close(sample.action.mean(0), M, atol=0.02, rtol=0)
    torch.testing.assert_close(sample.action.std(0), S, atol=0, rtol=0.02)
    exact = gaussian_log_prob(sample.action)
    coarse = (sample.log_prob - exact).abs().mean()
    policy.entropy_steps = 200
    with torch.no_grad():
        fine = (policy.sample(obs[:2000], noise=sample.latent[:2000] * 0 + torch.randn(2000, 2).double(),
                              with_log_prob=True))
    fine_err = (fine.log_prob - gaussian_log_prob(fine.action)).abs().mean()
    assert coarse < 0.1 and fine_err < coarse / 5, (coarse, fine_err)
    entropy = float(torch.log(2 * math.pi * math.e * S**2).sum() / 2)
    assert abs(float(-fine.log_prob.mean()) - entropy) < 0.05
    policy.log_prob_method, policy.entropy_steps = "hutchinson", 20
    with torch.no_grad():
        hutchinson = policy.sample(obs, noise=sample.latent * 0 + torch.randn(40000, 2).double(), with_log_prob=True)
    assert abs(float(-hutchinson.log_prob.mean()) - entropy) < 0.1


def test_decoupled_density_is_a_normalised_density_of_the_action():
    """E_q[p / q] = 1 for a random MeanFlow network and a 5-step reverse solve (a bijection here): the estimator
    is the exact density of the map it solves. q is uniform on [-8, 8] in normalised units; the action's density
    adds the log half-range."""
    torch.manual_seed(2)
    network = MeanFlowNetwork(1, 1, [16], time_dim=8)
    for p in network.parameters():
        nn.init.normal_(p, std=0.3)
    policy = MeanFlowPolicy(network, Squash([-2.0], [2.0]), entropy_steps=5)
    n = 400_000
    latent = torch.rand(n, 1) * 16 - 8
    with torch.no_grad():
        log_p = policy.latent_log_prob(torch.zeros(n, 1), latent)
        sample = policy.sample(torch.zeros(3, 1), noise=torch.zeros(3, 1), with_log_prob=True)
    ratio = (log_p.double() + math.log(16.0)).exp()
    stderr = float(ratio.std() / math.sqrt(n))
    assert abs(float(ratio.mean()) - 1) < 4 * stderr, (float(ratio.mean()), stderr)
    torch.testing.assert_close(sample.log_prob, policy.latent_log_prob(torch.zeros(3, 1), sample.latent)
                               - math.log(2.0))


def posterior_velocity(x, r, mu, var, box=False):
    """E[a - eps | x_r = x] for pi+ = N(mu, var) (restricted to [-1, 1] when ``box``), 1D: the posterior of a is
    N(m, s^2) with precision r^2 / (1 - r)^2 + 1 / var, truncated to the box if the target is."""
    precision = r**2 / (1 - r) ** 2 + 1 / var
    m, s = (r * x / (1 - r) ** 2 + mu / var) / precision, precision**-0.5
    if box:
        normal = torch.distributions.Normal(0.0, 1.0)
        lo, hi = torch.tensor((-1 - m) / s), torch.tensor((1 - m) / s)
        m = m + s * float((normal.log_prob(lo).exp() - normal.log_prob(hi).exp()) / (normal.cdf(hi) - normal.cdf(lo)))
    return (m - x) / (1 - r)


@pytest.mark.parametrize("box", [False, True])
def test_q_reweighted_posterior_candidates_estimate_the_target_velocity(box):
    torch.manual_seed(3)
    mu, var, alpha = (0.7, 0.3, 0.2) if box else (0.7, 0.05, 0.2)
    for x, r in ((0.3, 0.2), (-0.4, 0.5), (0.9, 0.85)):
        xs, rs = torch.full((1, 1), x), torch.full((1, 1), r)
        actions, eps = posterior_candidates(xs, rs, 200_000, box)
        torch.testing.assert_close((1 - r) * eps + r * actions, xs.expand_as(actions)[:, None].squeeze(1)
                                   .expand_as(actions), atol=1e-5, rtol=0)
        if box:
            assert actions.abs().max() <= 1
        weights = torch.softmax(-alpha * (actions[..., 0] - mu) ** 2 / (2 * var) / alpha, dim=1)
        v_bar = float((weights * (actions - eps)[..., 0]).sum())
        assert abs(v_bar - posterior_velocity(x, r, mu, var, box)) < 0.02, (x, r, v_bar)


def test_truncated_normal_matches_the_closed_form_and_puts_far_posteriors_on_the_nearest_face():
    torch.manual_seed(4)
    samples = truncated_normal(torch.tensor(0.5), torch.tensor(1.0), (200_000,))
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = torch.tensor(-1.5), torch.tensor(0.5)
    pdf, mass = normal.log_prob(torch.stack([lo, hi])).exp(), normal.cdf(hi) - normal.cdf(lo)
    mean = 0.5 + float((pdf[0] - pdf[1]) / mass)
    var = 1 + float((lo * pdf[0] - hi * pdf[1]) / mass) - float((pdf[0] - pdf[1]) / mass) ** 2
    assert abs(float(samples.mean()) - mean) < 0.01 and abs(float(samples.var()) / var - 1) < 0.02
    far = truncated_normal(torch.tensor([-5.0, 40.0]), torch.tensor([0.01, 0.01]), (1000, 2))
    assert torch.isfinite(far).all()
    assert (far[:, 0] < -0.999).all() and (far[:, 1] > 0.999).all()


def test_one_jvp_with_the_weighted_velocity_has_the_gradient_of_the_k_jvp_loss():
    torch.manual_seed(5)
    network = MeanFlowNetwork(3, 2, [16], time_dim=8)
    for p in network.parameters():
        nn.init.normal_(p, std=0.3)
    b, k = 6, 5
    x, obs = torch.randn(b, 2), torch.randn(b, 3)
    r = torch.rand(b, 1) * 0.5
    t = r + 0.4
    v, weights = torch.randn(b, k, 2), torch.softmax(torch.randn(b, k), 1)
    per_candidate = 0.0
    for j in range(k):
        u, du_dr = jvp(lambda xx, rr: network(xx, rr, t, obs), (x, r), (v[:, j], torch.ones_like(r)))
        per_candidate = per_candidate + (weights[:, j] * (u - (v[:, j] + (t - r) * du_dr).detach()).pow(2).sum(-1))
    grads_k = torch.autograd.grad(per_candidate.mean(), list(network.parameters()))
    u, target = meanflow_target(network, x, r, t, obs, (weights.unsqueeze(-1) * v).sum(1))
    grads_1 = torch.autograd.grad((u - target).pow(2).sum(-1).mean(), list(network.parameters()))
    for a, c in zip(grads_k, grads_1):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads_1) > 1e-3




# The policy proposal (flame.py (6)-(7)): pi+ = N(MU3, SIGMA3), a correlated Gaussian in 3-D, Q = alpha log pi+.
MU3 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
ROTATION = torch.linalg.qr(torch.tensor([[1.0, 0.4, -0.3], [0.2, 1.0, 0.5], [-0.6, 0.1, 1.0]],
                                        dtype=torch.float64)).Q
STDS3 = torch.tensor([0.6, 0.45, 0.3], dtype=torch.float64)
SIGMA3 = ROTATION @ torch.diag(STDS3**2) @ ROTATION.T


def exact_posterior_velocity(x, r, mean, cov):
    """E+[a' - eps' | x_r = x] for pi+ = N(mean, cov) (unbounded): (7) with the exact prior."""
    c2 = ((1 - r) / r) ** 2
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    gain = torch.linalg.solve(cov + c2.unsqueeze(-1) * eye, cov)
    m = mean + ((x / r - mean).unsqueeze(1) @ gain).squeeze(1)
    return (m - x) / (1 - r)


def slope_ratio(estimate, exact, x):
    """The estimate's regression slope on x over the exact one's: 1 when the contraction is right."""
    def slope(v):
        return ((v - v.mean(0)) * (x - x.mean(0))).sum()
    return float(slope(estimate) / slope(exact))


@pytest.mark.parametrize("r", [0.05, 0.3, 0.8])
def test_policy_proposal_estimates_the_posterior_velocity_where_the_likelihood_alone_fails(r):
    """Replay actions from N(0, I) (an old, wider policy), K = 100: with the policy's Gaussian posterior in the
    mixture (7) the estimated field contracts as pi+'s does, within 5 %, even with the policy's spread 20 % off pi+'s;
    the likelihood alone (the paper's proposal) contracts at most 80 % as much (at r = 0.05 it expands)."""
    torch.manual_seed(11)
    n, k, alpha = 2000, 100, 0.05
    x = (1 - r) * torch.randn(n, 3, dtype=torch.float64) + r * torch.randn(n, 3, dtype=torch.float64)
    rs = torch.full((n, 1), r, dtype=torch.float64)
    precision = torch.linalg.inv(SIGMA3)

    def q(a):
        return -0.5 * alpha * (((a - MU3) @ precision) * (a - MU3)).sum(-1)

    exact = exact_posterior_velocity(x, rs, MU3, SIGMA3)
    for factor in (torch.linalg.cholesky(SIGMA3), 0.8 * torch.linalg.cholesky(SIGMA3)):
        actions, eps, log_ratio = mixture_candidates(x, rs, k, False, MU3.expand(n, 3), factor.expand(n, 3, 3),
                                                     0.1, 1.5)
        weights = torch.softmax(q(actions) / alpha + log_ratio, dim=1)
        v_bar = (weights.unsqueeze(-1) * (actions - eps)).sum(1)
        assert abs(slope_ratio(v_bar, exact, x) - 1) < 0.05, (r, slope_ratio(v_bar, exact, x))
    actions, eps = posterior_candidates(x, rs, k, False)
    weights = torch.softmax(q(actions) / alpha, dim=1)
    paper = slope_ratio((weights.unsqueeze(-1) * (actions - eps)).sum(1), exact, x)
    assert paper < 0.8, (r, paper)


def test_policy_proposal_in_the_box_estimates_the_truncated_posterior_velocity():
    """Bounded actions: pi+ = N(mu, diag(var)) restricted to [-1, 1]^3, whose posterior factorises into truncated
    normals (``posterior_velocity`` per coordinate); the policy's Gaussian (7) ignores the box. The mixture's
    density (the likelihood part with its box mass) and the zero weight outside the box leave (4) unbiased."""
    torch.manual_seed(12)
    mu, var, alpha = torch.tensor([0.7, -0.4, 0.0]), torch.tensor([0.3, 0.05, 0.2]), 0.2
    for x, r in (([0.3, -0.5, 0.1], 0.2), ([-0.4, 0.9, 1.5], 0.5), ([0.9, -0.8, 0.2], 0.85)):
        xs, rs = torch.tensor([x]), torch.tensor([[r]])
        actions, eps, log_ratio = mixture_candidates(xs, rs, 200_000, True, mu[None], var.sqrt().diag()[None],
                                                     0.1, 1.5)
        assert torch.isfinite(log_ratio).any() and (log_ratio[actions.abs().amax(-1) > 1] == -math.inf).all()
        q = -alpha * ((actions - mu) ** 2 / (2 * var)).sum(-1)
        weights = torch.softmax(q / alpha + log_ratio, dim=1)
        v_bar = (weights.unsqueeze(-1) * (actions - eps)).sum(1)[0]
        for j in range(3):
            want = posterior_velocity(x[j], r, float(mu[j]), float(var[j]), box=True)
            assert abs(float(v_bar[j]) - want) < 0.02, (x, r, j, float(v_bar[j]), want)


class RotatedGaussianMeanFlow(GaussianMeanFlow):
    """GaussianMeanFlow's exact field for N(MU3, SIGMA3) in 3-D: the diagonal field in the eigenbasis of SIGMA3
    (the one-step and instantaneous calls are GaussianMeanFlow's, through this forward)."""

    act_dim = 3

    def slope(self, r, t):
        spread_r, spread_t = (((1 - s) ** 2 + s**2 * STDS3**2).sqrt() for s in (r, t))
        instantaneous = (t * STDS3**2 - (1 - t)) / spread_t**2
        average = (spread_t - spread_r) / ((t - r).clamp(min=1e-12) * spread_r)
        return torch.where(t - r > 1e-9, average, instantaneous)

    def forward(self, x, r, t, obs):
        return MU3 + ((x - r * MU3) @ ROTATION * self.slope(r, t)) @ ROTATION.T

    def instantaneous_and_jacobian(self, x, tau, obs):
        jac = ROTATION @ torch.diag_embed(self.slope(tau, tau).expand_as(x)) @ ROTATION.T
        return self.instantaneous(x, tau, obs), jac


@pytest.mark.parametrize("method, tolerance", [("exact", 0.03), ("hutchinson", 0.1)])
def test_decoupled_entropy_matches_the_gaussian_entropy_of_a_correlated_3d_policy(method, tolerance):
    """The entropy that enters the soft TD target and alpha's loss, -E[log pi], with the default 20-step solve,
    against 0.5 log det(2 pi e Sigma) of a correlated 3-D Gaussian policy (the 2-D diagonal case is above). Measured
    offsets: exact +0.019 nats, Hutchinson -0.07 (its first-order log-det drops dt^2 tr(J^2) / 2 per step)."""
    torch.manual_seed(13)
    policy = MeanFlowPolicy(RotatedGaussianMeanFlow(), Squash([-math.inf] * 3, [math.inf] * 3), 20, method)
    with torch.no_grad():
        sample = policy.sample(torch.zeros(40000, 1, dtype=torch.float64),
                               noise=torch.randn(40000, 3, dtype=torch.float64), with_log_prob=True)
    torch.testing.assert_close(torch.cov(sample.action.T), SIGMA3, atol=0.01, rtol=0)
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * SIGMA3))
    assert abs(float(-sample.log_prob.mean()) - entropy) < tolerance, (float(-sample.log_prob.mean()), entropy)
