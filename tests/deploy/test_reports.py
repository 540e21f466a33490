"""Tests for softflow.deploy.run.reports: the linear-Gaussian fit of a policy and the LQR report (lqr.json)."""

from __future__ import annotations

import numpy as np
import pytest

from softflow.actors.envs import LQREnvConfig
from softflow.actors.lqr import soft_lqr_solution
from softflow.deploy.run.reports import fit_linear_gaussian, lqr_report

SYSTEM = dict(A=[[1.0, 0.1], [0.0, 0.9]], B=[[0.0], [0.1]], Q=[[1.0, 0.0], [0.0, 0.1]], R=[[0.1]],
              W=[[0.01, 0.0], [0.0, 0.01]])  # the shipped experiment's system
GAMMA = 0.9


def linear_gaussian_samples(K, b, Sigma, num_states=2000, per_state=16, seed=0, state_std=1.0):
    """(states (S, n), actions (S, N, m)) of u = -K x + b + e, e ~ N(0, Sigma)."""
    rng = np.random.default_rng(seed)
    K, b, Sigma = np.asarray(K, float), np.asarray(b, float), np.asarray(Sigma, float)
    m, n = K.shape
    states = state_std * rng.standard_normal((num_states, n))
    noise = rng.multivariate_normal(np.zeros(m), Sigma, size=(num_states, per_state))
    actions = (states @ -K.T)[:, None, :] + b + noise
    return states, actions


def test_fit_recovers_a_known_multivariate_policy():
    K = np.array([[1.5, -0.4, 0.2], [0.3, 2.0, -1.1]])  # m = 2 actions, n = 3 states
    b = np.array([0.25, -0.5])
    Sigma = np.array([[0.30, 0.12], [0.12, 0.20]])  # correlated noise
    states, actions = linear_gaussian_samples(K, b, Sigma)
    K_hat, b_hat, Sigma_hat = fit_linear_gaussian(states, actions)
    assert K_hat.shape == (2, 3) and b_hat.shape == (2,) and Sigma_hat.shape == (2, 2)
    # 32,000 samples: the standard errors are about 0.003 for K and b, 0.002 for Sigma.
    np.testing.assert_allclose(K_hat, K, atol=0.02)
    np.testing.assert_allclose(b_hat, b, atol=0.02)
    np.testing.assert_allclose(Sigma_hat, Sigma, atol=0.015)
    np.testing.assert_allclose(Sigma_hat, Sigma_hat.T)
    # The sign convention is u = -K x: a fit of u = +K x would be off by 2|K|.
    assert np.linalg.norm(K_hat - K) < 0.01 * np.linalg.norm(K)


def test_fit_is_exact_without_noise():
    K = np.array([[0.7, -1.3]])
    states, actions = linear_gaussian_samples(K, [0.1], np.zeros((1, 1)), num_states=50, per_state=3)
    K_hat, b_hat, Sigma_hat = fit_linear_gaussian(states, actions)
    np.testing.assert_allclose(K_hat, K, atol=1e-10)
    np.testing.assert_allclose(b_hat, [0.1], atol=1e-10)
    assert Sigma_hat.shape == (1, 1) and abs(Sigma_hat[0, 0]) < 1e-20


def test_fit_sigma_is_the_noise_not_the_spread_of_the_mean():
    # Large states make the mean vary widely; Sigma must stay the per-state noise.
    K, Sigma = np.array([[3.0, 1.0]]), np.array([[0.05]])
    states, actions = linear_gaussian_samples(K, [0.0], Sigma, state_std=10.0)
    _, _, Sigma_hat = fit_linear_gaussian(states, actions)
    assert Sigma_hat[0, 0] == pytest.approx(0.05, rel=0.03)
    assert actions.reshape(-1).var() > 100 * Sigma_hat[0, 0]


class LinearGaussianPolicy:
    """Stands in for an Algorithm: ``act(obs, explore)`` samples u = -K x + e, e ~ N(0, Sigma); records calls."""

    def __init__(self, K, Sigma, alpha, seed=1):
        self.K, self.Sigma, self.alpha = np.asarray(K, float), np.asarray(Sigma, float), alpha
        self.rng = np.random.default_rng(seed)
        self.calls: list[tuple[np.ndarray, bool]] = []

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        self.calls.append((obs, explore))
        mean = obs.astype(np.float64) @ -self.K.T
        noise = self.rng.multivariate_normal(np.zeros(len(self.K)), self.Sigma, size=len(obs)) if explore else 0.0
        return (mean + noise).astype(np.float32)


def env_config(init_std=1.0) -> LQREnvConfig:
    return LQREnvConfig(id="LQR", horizon=50, init_std=init_std, **SYSTEM)


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_lqr_report_of_the_soft_optimal_policy(alpha):
    optimum = soft_lqr_solution(SYSTEM["A"], SYSTEM["B"], SYSTEM["Q"], SYSTEM["R"], GAMMA, alpha)
    policy = LinearGaussianPolicy(optimum.K, optimum.Sigma, alpha)
    report = lqr_report(policy, env_config(init_std=2.0), GAMMA, num_states=1024, samples_per_state=16, seed=3)
    assert set(report) == {"alpha", "gamma", "K", "Sigma", "bias", "K_star", "Sigma_star", "P", "target",
                           "Sigma_target", "rel_err_K", "rel_err_Sigma", "rel_err_Sigma_soft", "num_states",
                           "samples_per_state"}
    assert report["target"] == "soft_optimum" and report["Sigma_target"] == report["Sigma_star"]
    assert report["rel_err_Sigma_soft"] == report["rel_err_Sigma"]
    assert (report["alpha"], report["gamma"]) == (alpha, GAMMA)
    assert (report["num_states"], report["samples_per_state"]) == (1024, 16)
    # The optimum is the closed form at the policy's own alpha: Sigma* scales with alpha, K* does not.
    np.testing.assert_allclose(report["K_star"], optimum.K, rtol=1e-12)
    np.testing.assert_allclose(report["Sigma_star"], optimum.Sigma, rtol=1e-12)
    np.testing.assert_allclose(report["P"], optimum.P, rtol=1e-12)
    assert np.array(report["Sigma_star"]).item() == pytest.approx(alpha / 2 / optimum.H_uu.item())
    # The fit of the optimal policy is close to the optimum (16,384 samples).
    assert np.array(report["K"]).shape == (1, 2) and np.array(report["Sigma"]).shape == (1, 1)
    assert report["rel_err_K"] < 0.02 and report["rel_err_Sigma"] < 0.05
    assert abs(report["bias"][0]) < 5 * np.sqrt(optimum.Sigma.item() / (1024 * 16))  # 5 standard errors
    # One stochastic (explore=True) call at every state, each repeated samples_per_state times, drawn from
    # x ~ N(0, init_std^2 I).
    (obs, explore), = policy.calls
    assert explore is True and obs.shape == (1024 * 16, 2) and obs.dtype == np.float32
    states = obs[::16]
    assert np.array_equal(obs, np.repeat(states, 16, axis=0))
    assert states.std() == pytest.approx(2.0, rel=0.05)


def test_lqr_report_measures_the_errors_of_a_wrong_policy():
    alpha = 0.05
    optimum = soft_lqr_solution(SYSTEM["A"], SYSTEM["B"], SYSTEM["Q"], SYSTEM["R"], GAMMA, alpha)
    policy = LinearGaussianPolicy(2.0 * optimum.K, 4.0 * optimum.Sigma, alpha)  # K off by K*, Sigma by 3 Sigma*
    report = lqr_report(policy, env_config(), GAMMA, num_states=1024, samples_per_state=16)
    assert report["rel_err_K"] == pytest.approx(1.0, abs=0.03)
    assert report["rel_err_Sigma"] == pytest.approx(3.0, abs=0.15)
    K, K_star = np.array(report["K"]), np.array(report["K_star"])
    assert report["rel_err_K"] == pytest.approx(np.linalg.norm(K - K_star) / np.linalg.norm(K_star), rel=1e-12)


def test_lqr_report_is_reproducible_by_seed():
    optimum = soft_lqr_solution(SYSTEM["A"], SYSTEM["B"], SYSTEM["Q"], SYSTEM["R"], GAMMA, 0.05)
    reports = [lqr_report(LinearGaussianPolicy(optimum.K, optimum.Sigma, 0.05, seed=1), env_config(), GAMMA,
                          num_states=64, samples_per_state=4, seed=seed) for seed in (0, 0, 1)]
    assert reports[0] == reports[1] and reports[0]["K"] != reports[2]["K"]


class PathDensityPolicy(LinearGaussianPolicy):
    """Stands in for SAC Flow: its objective's optimum covariance on the LQR is (K alpha / 2) diag(H_uu)^-1
    (docs/algorithms.md, "SAC Flow's optimum on the LQR"), here with K = 4 flow steps."""

    def path_optimum_covariance(self, hessian, alpha):
        return np.diag(4 * alpha / (2 * np.diag(hessian)))


def test_lqr_report_measures_sac_flow_against_its_path_density_optimum_and_also_against_the_soft_one():
    alpha = 0.05
    optimum = soft_lqr_solution(SYSTEM["A"], SYSTEM["B"], SYSTEM["Q"], SYSTEM["R"], GAMMA, alpha)
    path_sigma = 4 * optimum.Sigma  # one action: diag(H_uu) = H_uu, so the path optimum is 4 Sigma*
    policy = PathDensityPolicy(optimum.K, path_sigma, alpha)
    report = lqr_report(policy, env_config(), GAMMA, num_states=1024, samples_per_state=16)
    assert report["target"] == "path_density_optimum"
    np.testing.assert_allclose(report["Sigma_target"], path_sigma, rtol=1e-12)
    np.testing.assert_allclose(report["Sigma_star"], optimum.Sigma, rtol=1e-12)
    assert report["rel_err_K"] < 0.02 and report["rel_err_Sigma"] < 0.05
    assert report["rel_err_Sigma_soft"] == pytest.approx(3.0, abs=0.15)  # 4 Sigma* against Sigma*
