"""Task reports written into the run directory after training (``lqr.json`` for the LQR case study)."""

from __future__ import annotations

import numpy as np

from softflow.actors.envs import LQREnvConfig
from softflow.actors.lqr import soft_lqr_solution
from softflow.algorithms import Algorithm


def fit_linear_gaussian(states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of actions on states, u ~ -K x + b, and the residual covariance Sigma: returns (K, b, Sigma).

    ``states`` (S, n) and ``actions`` (S, N, m) hold N policy samples at each of S states."""
    num_states, per_state, m = actions.shape
    x = np.repeat(states, per_state, axis=0)
    u = actions.reshape(-1, m)
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, u, rcond=None)
    residual = u - design @ coef
    return -coef[:-1].T, coef[-1], np.cov(residual, rowvar=False).reshape(m, m)


def lqr_report(algorithm: Algorithm, env: LQREnvConfig, gamma: float, num_states: int = 2048,
               samples_per_state: int = 32, seed: int = 0) -> dict:
    """Fits the learned policy's K and Sigma at states x ~ N(0, init_std^2 I) (the episodes' start distribution)
    and compares them with the soft-optimal K* and Sigma* for the final alpha (relative Frobenius errors)."""
    rng = np.random.default_rng(seed)
    states = (env.init_std * rng.standard_normal((num_states, len(env.A)))).astype(np.float32)
    repeated = np.repeat(states, samples_per_state, axis=0)
    actions = algorithm.act(repeated, True).reshape(num_states, samples_per_state, -1)
    K, bias, Sigma = fit_linear_gaussian(states, actions.astype(np.float64))
    alpha = algorithm.alpha
    optimum = soft_lqr_solution(env.A, env.B, env.Q, env.R, gamma, alpha)

    def rel_err(estimate: np.ndarray, truth: np.ndarray) -> float:
        return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))

    return {
        "alpha": alpha,
        "gamma": gamma,
        "K": K.tolist(),
        "Sigma": Sigma.tolist(),
        "bias": bias.tolist(),
        "K_star": optimum.K.tolist(),
        "Sigma_star": optimum.Sigma.tolist(),
        "P": optimum.P.tolist(),
        "rel_err_K": rel_err(K, optimum.K),
        "rel_err_Sigma": rel_err(Sigma, optimum.Sigma),
        "num_states": num_states,
        "samples_per_state": samples_per_state,
    }
