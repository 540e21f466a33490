"""Tests for softflow.actors.lqr: closed-form soft LQR, its exact return, validation and the environment."""

from __future__ import annotations

import numpy as np
import pytest

from softflow.actors.lqr import (
    LQREnv,
    check_lqr_system,
    discounted_soft_return,
    gaussian_entropy,
    soft_lqr_solution,
)

DOUBLE_INTEGRATOR = {
    "A": np.array([[1.0, 0.1], [0.0, 1.0]]),
    "B": np.array([[0.0], [0.1]]),
    "Q": np.eye(2),
    "R": np.array([[0.1]]),
    "W": 0.01 * np.eye(2),
}


def _random_system(seed: int = 0) -> dict[str, np.ndarray]:
    """A random 4-state / 3-action system (generically controllable) with open-loop unstable modes."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((4, 4))
    N = rng.standard_normal((3, 3))
    V = rng.standard_normal((4, 4))
    return {
        "A": 0.6 * rng.standard_normal((4, 4)),
        "B": rng.standard_normal((4, 3)),
        "Q": M @ M.T + 0.1 * np.eye(4),
        "R": N @ N.T + np.eye(3),
        "W": 0.05 * V @ V.T,
    }


SYSTEMS = {"double_integrator": DOUBLE_INTEGRATOR, "random_4x3": _random_system()}


def _riccati_rhs(A, B, Q, R, P, g):
    """Right-hand side Q + g A'PA - g^2 A'PB (R + g B'PB)^{-1} B'PA of the discounted Riccati equation."""
    H = R + g * B.T @ P @ B
    return Q + g * A.T @ P @ A - g**2 * A.T @ P @ B @ np.linalg.solve(H, B.T @ P @ A)


def _soft_objective(sys, gamma, alpha, K, Sigma, x0):
    P_K, c_K = discounted_soft_return(sys["A"], sys["B"], sys["Q"], sys["R"], sys["W"], gamma, alpha, K, Sigma)
    return -x0 @ P_K @ x0 - c_K


@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("gamma", [0.9, 0.99])
def test_solution_satisfies_discounted_riccati(name, gamma):
    s = SYSTEMS[name]
    check_lqr_system(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma)
    sol = soft_lqr_solution(s["A"], s["B"], s["Q"], s["R"], gamma, alpha=0.5)
    P = sol.P
    residual = np.linalg.norm(P - _riccati_rhs(s["A"], s["B"], s["Q"], s["R"], P, gamma))
    assert residual <= 1e-9 * np.linalg.norm(P)
    np.testing.assert_array_equal(P, P.T)
    assert np.linalg.eigvalsh(P)[0] > 0
    H = s["R"] + gamma * s["B"].T @ P @ s["B"]
    np.testing.assert_allclose(sol.H_uu, H, rtol=1e-12)
    np.testing.assert_allclose(sol.K, gamma * np.linalg.solve(H, s["B"].T @ P @ s["A"]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sol.Sigma, 0.25 * np.linalg.inv(H), rtol=1e-10)
    closed_loop = np.sqrt(gamma) * (s["A"] - s["B"] @ sol.K)
    assert np.max(np.abs(np.linalg.eigvals(closed_loop))) < 1


def test_random_system_is_open_loop_unstable():
    s = SYSTEMS["random_4x3"]
    assert np.max(np.abs(np.linalg.eigvals(np.sqrt(0.99) * s["A"]))) > 1


def test_alpha_scales_sigma_only():
    s = DOUBLE_INTEGRATOR
    sols = [soft_lqr_solution(s["A"], s["B"], s["Q"], s["R"], 0.95, alpha) for alpha in (0.0, 0.3, 0.6)]
    for sol in sols[1:]:
        np.testing.assert_array_equal(sol.P, sols[0].P)
        np.testing.assert_array_equal(sol.K, sols[0].K)
    np.testing.assert_array_equal(sols[0].Sigma, np.zeros((1, 1)))
    np.testing.assert_allclose(sols[2].Sigma, 2.0 * sols[1].Sigma, rtol=1e-14)
    np.testing.assert_allclose(sols[0].mean_action([1.0, 2.0]), -sols[0].K @ [1.0, 2.0])


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_soft_optimal_policy_maximises_soft_return(name):
    s, gamma, alpha = SYSTEMS[name], 0.95, 0.7
    n, m = s["B"].shape
    sol = soft_lqr_solution(s["A"], s["B"], s["Q"], s["R"], gamma, alpha)
    P_K, c_K = discounted_soft_return(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma, alpha, sol.K, sol.Sigma)
    np.testing.assert_allclose(P_K, sol.P, rtol=1e-8, atol=1e-8 * np.linalg.norm(sol.P))
    # Soft value constant from the soft Bellman equation: c = (g tr(P W) - (alpha m / 2) log(pi alpha)
    # + (alpha / 2) log det H_uu) / (1 - g), i.e. c_K evaluated at Sigma* = (alpha/2) H_uu^{-1}.
    c_closed = (gamma * np.trace(sol.P @ s["W"]) - 0.5 * alpha * m * np.log(np.pi * alpha)
                + 0.5 * alpha * np.linalg.slogdet(sol.H_uu)[1]) / (1 - gamma)
    np.testing.assert_allclose(c_K, c_closed, rtol=1e-9)

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(n)
    best = _soft_objective(s, gamma, alpha, sol.K, sol.Sigma, x0)
    L = np.linalg.cholesky(sol.Sigma)
    for _ in range(10):
        dK = rng.standard_normal((m, n))
        K_pert = sol.K + 1e-2 * np.linalg.norm(sol.K) * dK / np.linalg.norm(dK)
        assert _soft_objective(s, gamma, alpha, K_pert, sol.Sigma, x0) < best
        E = rng.standard_normal((m, m))
        E = 0.05 * (E + E.T) / np.linalg.norm(E + E.T)
        Sigma_pert = L @ (np.eye(m) + E) @ L.T
        assert np.linalg.eigvalsh(Sigma_pert)[0] > 0
        assert _soft_objective(s, gamma, alpha, sol.K, Sigma_pert, x0) < best
        assert _soft_objective(s, gamma, alpha, sol.K, 1.05 * sol.Sigma, x0) < best
        assert _soft_objective(s, gamma, alpha, sol.K, 0.95 * sol.Sigma, x0) < best


def test_discounted_soft_return_entropy_term_and_unstable_gain():
    s, gamma = DOUBLE_INTEGRATOR, 0.9
    K, Sigma = np.array([[1.0, 2.0]]), np.array([[0.3]])
    P0, c0 = discounted_soft_return(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma, 0.0, K, Sigma)
    P1, c1 = discounted_soft_return(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma, 0.5, K, Sigma)
    np.testing.assert_array_equal(P0, P1)
    assert gaussian_entropy(Sigma) == pytest.approx(0.5 * np.log(2 * np.pi * np.e * 0.3))
    assert c0 - c1 == pytest.approx(0.5 * gaussian_entropy(Sigma) / (1 - gamma), rel=1e-12)
    discounted_soft_return(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma, 0.0, K, np.zeros((1, 1)))
    A, B = np.array([[1.2, 0.0], [0.0, 0.5]]), np.array([[1.0], [0.0]])
    with pytest.raises(ValueError, match="not discounted-stable"):
        discounted_soft_return(A, B, np.eye(2), [[1.0]], np.zeros((2, 2)), gamma, 0.0, np.zeros((1, 2)), Sigma)


def test_monte_carlo_return_matches_closed_form():
    s, gamma, alpha, horizon, episodes = DOUBLE_INTEGRATOR, 0.9, 0.5, 120, 200
    sol = soft_lqr_solution(s["A"], s["B"], s["Q"], s["R"], gamma, alpha)
    x0 = np.array([1.0, -0.5])
    env = LQREnv(s["A"], s["B"], s["Q"], s["R"], s["W"], horizon=horizon)
    rng = np.random.default_rng(0)
    L = np.linalg.cholesky(sol.Sigma)
    returns = np.empty(episodes)
    for ep in range(episodes):
        env.reset(seed=0 if ep == 0 else None, options={"state": x0})
        total, discount, truncated = 0.0, 1.0, False
        while not truncated:
            u = -sol.K @ env.state + L @ rng.standard_normal(1)
            _, reward, terminated, truncated, _ = env.step(u)
            assert not terminated
            total += discount * reward
            discount *= gamma
        returns[ep] = total
    P_K, c_K = discounted_soft_return(s["A"], s["B"], s["Q"], s["R"], s["W"], gamma, 0.0, sol.K, sol.Sigma)
    expected = -x0 @ P_K @ x0 - c_K  # truncation bias ~ gamma^120 ~ 3e-6 relative: negligible
    stderr = returns.std(ddof=1) / np.sqrt(episodes)
    assert abs(returns.mean() - expected) < 4 * stderr
    assert stderr < 0.05 * abs(expected)


_BASE = {"A": DOUBLE_INTEGRATOR["A"], "B": DOUBLE_INTEGRATOR["B"], "Q": np.eye(2), "R": [[1.0]],
         "W": 0.01 * np.eye(2), "gamma": 0.99}


@pytest.mark.parametrize(
    "override, keys",
    [
        ({"A": [[1.0, 0.1, 0.0]]}, ["env.A"]),
        ({"A": [1.0, 2.0]}, ["env.A"]),
        ({"A": [[1.0, np.nan], [0.0, 1.0]]}, ["env.A"]),
        ({"B": [[0.0], [0.1], [1.0]]}, ["env.B"]),
        ({"Q": [[1.0, 0.5], [0.0, 1.0]]}, ["env.Q"]),
        ({"Q": [[1.0, 0.0], [0.0, -1.0]]}, ["env.Q"]),
        ({"Q": np.eye(3)}, ["env.Q"]),
        ({"Q": [[1.0, 0.0], [0.0, np.inf]]}, ["env.Q"]),
        ({"R": [[-1.0]]}, ["env.R", "-1"]),
        ({"R": [[0.0]]}, ["env.R"]),
        ({"R": np.eye(2)}, ["env.R"]),
        ({"W": [[1.0, 0.0], [0.0, -0.1]]}, ["env.W"]),
        ({"W": [[1.0, 0.2], [0.0, 1.0]]}, ["env.W"]),
        ({"W": [[np.nan, 0.0], [0.0, 1.0]]}, ["env.W"]),
        ({"gamma": 1.0}, ["algorithm.gamma"]),
        ({"gamma": 0.0}, ["algorithm.gamma"]),
        ({"gamma": 1.5}, ["algorithm.gamma"]),
        ({"gamma": float("nan")}, ["algorithm.gamma"]),
        ({"A": [[1.5, 0.0], [0.0, 0.5]], "B": [[0.0], [1.0]]}, ["env.A", "env.B", "1.5", "stabilisable"]),
    ],
)
def test_check_lqr_system_rejects_bad_input(override, keys):
    cfg = {**_BASE, **override}
    with pytest.raises(ValueError) as info:
        check_lqr_system(**cfg)
    message = str(info.value)
    assert "\n" not in message
    for key in keys:
        assert key in message


def test_check_lqr_system_accepts_stabilisable_not_controllable():
    check_lqr_system([[1.5, 0.0], [0.0, 0.5]], [[1.0], [0.0]], np.eye(2), [[1.0]], np.zeros((2, 2)), 0.99)
    # A marginal mode (|lambda| = 1 < 1/sqrt(gamma)) is discounted-stable and need not be reachable.
    check_lqr_system([[1.0, 0.0], [0.0, 2.0]], [[0.0], [1.0]], np.eye(2), [[1.0]], np.zeros((2, 2)), 0.9)
    sol = soft_lqr_solution([[1.0, 0.0], [0.0, 2.0]], [[0.0], [1.0]], np.eye(2), [[1.0]], 0.9, 0.1)
    assert sol.K[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_soft_lqr_solution_rejects_undetectable_and_bad_alpha():
    g = 0.9
    with pytest.raises(ValueError, match="env.Q"):
        soft_lqr_solution([[1.0 / np.sqrt(g)]], [[1.0]], [[0.0]], [[1.0]], g, 0.1)
    with pytest.raises(ValueError, match="algorithm.alpha"):
        soft_lqr_solution([[0.5]], [[1.0]], [[1.0]], [[1.0]], g, -0.1)


def _env(W=None, horizon=5):
    s = DOUBLE_INTEGRATOR
    return LQREnv(s["A"], s["B"], s["Q"], s["R"], s["W"] if W is None else W, horizon=horizon)


def test_env_spaces_shapes_and_truncation():
    env = _env(horizon=5)
    assert env.observation_space.shape == (2,) and env.action_space.shape == (1,)
    assert env.observation_space.dtype == np.float32 and env.action_space.dtype == np.float32
    assert np.all(np.isinf(env.action_space.low)) and np.all(np.isinf(env.observation_space.high))
    obs, info = env.reset(seed=0)
    assert obs.shape == (2,) and obs.dtype == np.float32 and info == {}
    for t in range(1, 6):
        obs, reward, terminated, truncated, info = env.step(np.array([0.3]))
        assert obs.shape == (2,) and obs.dtype == np.float32 and isinstance(reward, float)
        assert terminated is False and info == {}
        assert truncated is (t == 5)


def test_env_seed_determinism_and_reward():
    def rollout(seed):
        env = _env(horizon=20)
        obs, _ = env.reset(seed=seed)
        traj = [obs]
        for k in range(20):
            x, u = env.state, np.array([np.sin(k)])
            obs, reward, *_ = env.step(u)
            assert reward == pytest.approx(-(x @ np.eye(2) @ x + 0.1 * u[0] ** 2), rel=1e-12)
            traj.append(obs)
        return np.array(traj)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def test_env_zero_noise_is_deterministic_and_start_state_option():
    env = _env(W=np.zeros((2, 2)), horizon=10)
    x0 = np.array([0.25, -1.5])
    obs, _ = env.reset(seed=1, options={"state": x0})
    np.testing.assert_array_equal(obs, x0.astype(np.float32))
    for k in range(10):
        x, u = env.state, np.array([0.1 * k - 0.3])
        env.step(u)
        np.testing.assert_array_equal(env.state, env.A @ x + env.B @ u)


def test_env_singular_noise_covariance():
    env = LQREnv(np.zeros((2, 2)), np.zeros((2, 1)), np.eye(2), [[1.0]], [[1.0, 1.0], [1.0, 1.0]], horizon=4000)
    env.reset(seed=0, options={"state": np.zeros(2)})
    samples = np.array([(env.step(np.zeros(1)), env.state)[1] for _ in range(4000)])
    np.testing.assert_allclose(samples[:, 0], samples[:, 1], atol=1e-12)
    assert samples[:, 0].var() == pytest.approx(1.0, abs=0.1)


def test_env_rejects_wrong_action_shape():
    env = _env()
    env.reset(seed=0)
    for bad in (np.zeros(2), np.zeros((1, 1)), 0.0, np.array([np.nan])):
        with pytest.raises(ValueError):
            env.step(bad)
    with pytest.raises(ValueError):
        env.reset(options={"state": np.zeros(3)})
