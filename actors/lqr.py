"""Maximum-entropy linear-quadratic regulator: environment and closed-form soft-optimal policy.

This is the LQR case study of arXiv 2512.23870, used to check learned policies against an exact answer.

Model
-----
State ``x`` in R^n, action ``u`` in R^m (unbounded), discount ``g = gamma`` in (0, 1)::

    x' = A x + B u + w,        w ~ N(0, W)
    r(x, u) = -(x^T Q x + u^T R u)          (current x and u, before the transition)

The maximum-entropy objective at temperature ``alpha`` is
``E[sum_t g^t (r_t + alpha * H(pi(.|x_t)))]``.  Its soft value function is quadratic,
``V*(x) = -x^T P x - c``, and the soft-optimal policy is Gaussian, ``pi*(u|x) = N(-K* x, Sigma*)``, with
``P`` the solution of the discounted Riccati equation::

    P      = Q + g A^T P A - g^2 A^T P B (R + g B^T P B)^{-1} B^T P A
    H_uu   = R + g B^T P B
    K*     = g H_uu^{-1} B^T P A
    Sigma* = (alpha / 2) H_uu^{-1}

``P`` and ``K*`` do not depend on ``alpha``; only ``Sigma*`` does.  The discounted equation is the ordinary
discrete Riccati equation of the scaled system ``(sqrt(g) A, sqrt(g) B, Q, R)``, which is how it is solved here.

For any linear-Gaussian policy ``u = -K x + e``, ``e ~ N(0, Sigma)``, the soft return from ``x0`` is
``-x0^T P_K x0 - c_K`` with (see :func:`discounted_soft_return`)::

    P_K = Q + K^T R K + g (A - B K)^T P_K (A - B K)
    c_K = (g tr(P_K (W + B Sigma B^T)) + tr(R Sigma) - alpha * H) / (1 - g),   H = 0.5 log det(2 pi e Sigma)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
import scipy.linalg

_SYM_TOL = 1e-8
_EIG_TOL = 1e-10
_RANK_TOL = 1e-9

ArrayLike = Any


def _fmt_eig(lam: complex) -> str:
    if abs(lam.imag) <= 1e-12 * max(1.0, abs(lam)):
        return f"{lam.real:.6g}"
    return f"{lam.real:.6g}{lam.imag:+.6g}j"


def _as_matrix(key: str, value: ArrayLike) -> np.ndarray:
    try:
        mat = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key} must be a 2-D matrix of numbers (a list of equal-length lists); "
                         f"could not convert the {type(value).__name__} given: {exc}") from None
    if mat.ndim != 2 or mat.size == 0:
        raise ValueError(f"{key} must be a non-empty 2-D matrix (a list of lists, e.g. [[1.0]]); got an array of "
                         f"shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise ValueError(f"{key} contains NaN or infinite entries; every entry must be a finite number")
    return mat


def _check_shape(key: str, mat: np.ndarray, shape: tuple[int, int], meaning: str) -> None:
    if mat.shape != shape:
        raise ValueError(f"{key} has shape {mat.shape} but must be {shape[0]}x{shape[1]} ({meaning})")


def _check_symmetric(key: str, mat: np.ndarray) -> None:
    scale = max(1.0, float(np.max(np.abs(mat))))
    asym = float(np.max(np.abs(mat - mat.T)))
    if asym > _SYM_TOL * scale:
        raise ValueError(f"{key} is not symmetric (max |M - M^T| = {asym:.3g}); use a symmetric matrix, "
                         f"e.g. (M + M^T)/2")


def _min_eig(mat: np.ndarray) -> tuple[float, float]:
    eigs = np.linalg.eigvalsh(0.5 * (mat + mat.T))
    return float(eigs[0]), max(1.0, float(np.max(np.abs(eigs))))


def _check_psd(key: str, mat: np.ndarray, what: str) -> None:
    lo, scale = _min_eig(mat)
    if lo < -_EIG_TOL * scale:
        raise ValueError(f"{key} must be positive semi-definite ({what}) but its smallest eigenvalue is {lo:.6g}; "
                         f"use e.g. M^T M or a diagonal matrix with non-negative entries")


def _check_gamma(gamma: float) -> float:
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"algorithm.gamma must be a number in (0, 1); got {gamma!r}") from None
    if not (0.0 < g < 1.0):
        raise ValueError(f"algorithm.gamma must satisfy 0 < gamma < 1 for the discounted LQR; got {gamma!r}, "
                         f"use e.g. 0.99")
    return g


def _check_system(A: ArrayLike, B: ArrayLike, Q: ArrayLike, R: ArrayLike, W: ArrayLike | None,
                  gamma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Validate the system (see :func:`check_lqr_system`) and return it as float arrays and a float gamma."""
    A_ = _as_matrix("env.A", A)
    if A_.shape[0] != A_.shape[1]:
        raise ValueError(f"env.A has shape {A_.shape} but must be square (n x n, n = state dimension)")
    n = A_.shape[0]
    B_ = _as_matrix("env.B", B)
    if B_.shape[0] != n:
        raise ValueError(f"env.B has {B_.shape[0]} rows but must have n = {n} rows (one per state, like env.A); "
                         f"its shape must be n x m with m = action dimension")
    m = B_.shape[1]
    Q_ = _as_matrix("env.Q", Q)
    _check_shape("env.Q", Q_, (n, n), "n x n, n = state dimension of env.A")
    _check_symmetric("env.Q", Q_)
    _check_psd("env.Q", Q_, "the state cost x^T Q x must never be negative")
    R_ = _as_matrix("env.R", R)
    _check_shape("env.R", R_, (m, m), "m x m, m = number of columns of env.B")
    _check_symmetric("env.R", R_)
    lo, scale = _min_eig(R_)
    if lo <= _EIG_TOL * scale:
        raise ValueError(f"env.R must be positive definite (every action must cost something) but its smallest "
                         f"eigenvalue is {lo:.6g}; use e.g. a diagonal matrix with positive entries")
    W_ = None
    if W is not None:
        W_ = _as_matrix("env.W", W)
        _check_shape("env.W", W_, (n, n), "n x n noise covariance, n = state dimension of env.A")
        _check_symmetric("env.W", W_)
        _check_psd("env.W", W_, "it is a covariance matrix")
    g = _check_gamma(gamma)
    _check_stabilisable(A_, B_, g)
    return A_, B_, Q_, R_, W_, g


def _check_stabilisable(A: np.ndarray, B: np.ndarray, g: float) -> None:
    """PBH test on the scaled pair (sqrt(g) A, sqrt(g) B): every mode with |lam| >= 1 must be reachable."""
    n = A.shape[0]
    sg = np.sqrt(g)
    As, Bs = sg * A, sg * B
    for lam in np.linalg.eigvals(As):
        if abs(lam) < 1.0 - 1e-12:
            continue
        pencil = np.hstack([lam * np.eye(n) - As, Bs.astype(complex)])
        sv = np.linalg.svd(pencil, compute_uv=False)
        if sv[n - 1] <= _RANK_TOL * max(1.0, sv[0]):
            raise ValueError(
                f"env.A, env.B: (A, B) is not stabilisable at gamma={g:g}: the mode of A with eigenvalue "
                f"{_fmt_eig(lam / sg)} is unstable (|eigenvalue| >= 1/sqrt(gamma) = {1.0 / sg:.6g}) and B cannot "
                f"reach it; give B a component along that mode or make it stable")


def check_lqr_system(A: ArrayLike, B: ArrayLike, Q: ArrayLike, R: ArrayLike, W: ArrayLike, gamma: float) -> None:
    """Validate a discounted LQR problem; raise ``ValueError`` with a one-line message naming the config key.

    Checks: all matrices 2-D and finite; ``A`` is n x n; ``B`` is n x m; ``Q`` n x n symmetric PSD; ``R`` m x m
    symmetric positive definite; ``W`` n x n symmetric PSD; ``0 < gamma < 1``; and ``(A, B)`` stabilisable for
    the discounted problem, i.e. ``(sqrt(g) A, sqrt(g) B)`` passes the PBH test
    ``rank [lam I - sqrt(g) A, sqrt(g) B] = n`` for every eigenvalue ``lam`` of ``sqrt(g) A`` with ``|lam| >= 1``.
    """
    _check_system(A, B, Q, R, W, gamma)


@dataclass(frozen=True)
class SoftLQRSolution:
    """Soft-optimal solution: ``V*(x) = -x^T P x - c`` and ``pi*(u|x) = N(-K x, Sigma)``.

    ``H_uu = R + g B^T P B`` is (half) the action Hessian of ``-Q*(x, u)``; ``Sigma = (alpha/2) H_uu^{-1}``.
    """

    P: np.ndarray
    K: np.ndarray
    Sigma: np.ndarray
    H_uu: np.ndarray

    def mean_action(self, x: ArrayLike) -> np.ndarray:
        """Mean of the soft-optimal policy, ``-K x``."""
        return -self.K @ np.asarray(x, dtype=float)


def soft_lqr_solution(A: ArrayLike, B: ArrayLike, Q: ArrayLike, R: ArrayLike, gamma: float,
                      alpha: float) -> SoftLQRSolution:
    """Solve the discounted max-entropy LQR in closed form (equations in the module docstring).

    ``P`` solves ``P = Q + g A'PA - g^2 A'PB (R + g B'PB)^{-1} B'PA`` (via ``scipy.linalg.solve_discrete_are``
    on ``(sqrt(g) A, sqrt(g) B, Q, R)``); ``K = g (R + g B'PB)^{-1} B'PA``; ``Sigma = (alpha/2) (R + g B'PB)^{-1}``.
    ``alpha = 0`` gives the ordinary (deterministic, ``Sigma = 0``) LQR.  Raises ``ValueError`` on invalid input
    or when no stabilising solution exists.
    """
    A_, B_, Q_, R_, _, g = _check_system(A, B, Q, R, None, gamma)
    a = float(alpha)
    if not (np.isfinite(a) and a >= 0.0):
        raise ValueError(f"algorithm.alpha must be a finite temperature >= 0; got {alpha!r}")
    sg = np.sqrt(g)
    try:
        P = scipy.linalg.solve_discrete_are(sg * A_, sg * B_, Q_, R_)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise ValueError(f"env.Q, env.A: the discounted Riccati equation has no stabilising solution ({exc}); "
                         f"(Q, A) must be detectable, e.g. make env.Q positive definite") from None
    P = 0.5 * (P + P.T)
    H_uu = R_ + g * B_.T @ P @ B_
    H_uu = 0.5 * (H_uu + H_uu.T)
    K = g * np.linalg.solve(H_uu, B_.T @ P @ A_)
    radius = float(np.max(np.abs(np.linalg.eigvals(sg * (A_ - B_ @ K)))))
    if not (np.all(np.isfinite(P)) and radius < 1.0 - 1e-10):
        raise ValueError(f"env.Q, env.A: the discounted Riccati equation has no stabilising solution (closed-loop "
                         f"sqrt(gamma)(A - BK) has spectral radius {radius:.6g} >= 1); (Q, A) must be detectable, "
                         f"e.g. make env.Q positive definite")
    Sigma = 0.5 * a * np.linalg.inv(H_uu)
    Sigma = 0.5 * (Sigma + Sigma.T)
    return SoftLQRSolution(P=P, K=K, Sigma=Sigma, H_uu=H_uu)


def gaussian_entropy(Sigma: ArrayLike) -> float:
    """Differential entropy ``0.5 log det(2 pi e Sigma)`` of ``N(mu, Sigma)``; ``Sigma`` must be PD."""
    S = np.atleast_2d(np.asarray(Sigma, dtype=float))
    sign, logdet = np.linalg.slogdet(2.0 * np.pi * np.e * S)
    if sign <= 0:
        raise ValueError("Sigma must be positive definite to have a finite entropy")
    return 0.5 * float(logdet)


def discounted_soft_return(A: ArrayLike, B: ArrayLike, Q: ArrayLike, R: ArrayLike, W: ArrayLike, gamma: float,
                           alpha: float, K: ArrayLike, Sigma: ArrayLike) -> tuple[np.ndarray, float]:
    """Exact soft return of the policy ``u = -K x + e``, ``e ~ N(0, Sigma)``, as a quadratic in the start state.

    Returns ``(P_K, c_K)`` such that ``E[sum_t g^t (r_t + alpha H(pi))] = -x0^T P_K x0 - c_K``, with::

        P_K = Q + K^T R K + g (A - B K)^T P_K (A - B K)          (discrete Lyapunov equation)
        c_K = (g tr(P_K (W + B Sigma B^T)) + tr(R Sigma) - alpha H) / (1 - g),  H = 0.5 log det(2 pi e Sigma)

    (From ``E[u^T R u] = x^T K^T R K x + tr(R Sigma)`` and ``E[x'^T P_K x'] = x^T (A-BK)^T P_K (A-BK) x
    + tr(P_K (B Sigma B^T + W))``.)  ``alpha = 0`` gives the plain discounted return; it also allows a
    singular (e.g. zero) ``Sigma``.  Raises ``ValueError`` if ``sqrt(g)(A - B K)`` is not stable.
    """
    A_, B_, Q_, R_, W_, g = _check_system(A, B, Q, R, W, gamma)
    n, m = B_.shape
    K_ = np.asarray(K, dtype=float)
    S_ = np.asarray(Sigma, dtype=float)
    if K_.shape != (m, n):
        raise ValueError(f"K has shape {K_.shape} but must be m x n = {m}x{n}")
    if S_.shape != (m, m):
        raise ValueError(f"Sigma has shape {S_.shape} but must be m x m = {m}x{m}")
    a = float(alpha)
    Acl = A_ - B_ @ K_
    radius = float(np.max(np.abs(np.linalg.eigvals(np.sqrt(g) * Acl))))
    if radius >= 1.0:
        raise ValueError(f"the policy gain K is not discounted-stable: sqrt(gamma)(A - BK) has spectral radius "
                         f"{radius:.6g} >= 1, so the discounted return is infinite")
    # solve_discrete_lyapunov(a, q) solves X = a X a^T + q; we need P_K = (sqrt(g) Acl)^T P_K (sqrt(g) Acl) + Q_K.
    P_K = scipy.linalg.solve_discrete_lyapunov(np.sqrt(g) * Acl.T, Q_ + K_.T @ R_ @ K_)
    P_K = 0.5 * (P_K + P_K.T)
    entropy_term = a * gaussian_entropy(S_) if a != 0.0 else 0.0
    c_K = (g * np.trace(P_K @ (W_ + B_ @ S_ @ B_.T)) + np.trace(R_ @ S_) - entropy_term) / (1.0 - g)
    return P_K, float(c_K)


class LQREnv(gymnasium.Env):
    """Linear-Gaussian system ``x' = A x + B u + w``, ``w ~ N(0, W)``, reward ``-(x^T Q x + u^T R u)``.

    Episodes start at ``x0 ~ N(0, init_std^2 I)`` (or at ``options={"state": x0}``), never terminate, and are
    truncated after ``horizon`` steps.  Observations are ``float32``; the internal state is ``float64``.  The
    constructor does not validate the system (use :func:`check_lqr_system`).
    """

    metadata = {"render_modes": []}

    def __init__(self, A: ArrayLike, B: ArrayLike, Q: ArrayLike, R: ArrayLike, W: ArrayLike, horizon: int,
                 init_std: float = 1.0) -> None:
        super().__init__()
        self.A = np.asarray(A, dtype=float)
        self.B = np.asarray(B, dtype=float)
        self.Q = np.asarray(Q, dtype=float)
        self.R = np.asarray(R, dtype=float)
        self.W = np.asarray(W, dtype=float)
        self.n, self.m = self.B.shape
        self.horizon = int(horizon)
        self.init_std = float(init_std)
        eigvals, eigvecs = np.linalg.eigh(0.5 * (self.W + self.W.T))
        self._noise_factor = eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(self.n,), dtype=np.float32)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(self.m,), dtype=np.float32)
        self._x: np.ndarray | None = None
        self._t = 0

    @property
    def state(self) -> np.ndarray:
        """A float64 copy of the current state."""
        if self._x is None:
            raise RuntimeError("LQREnv has no state yet; call reset() first")
        return self._x.copy()

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode at ``x0 ~ N(0, init_std^2 I)``, or at ``options["state"]`` when given."""
        super().reset(seed=seed)
        if options is not None and options.get("state") is not None:
            x0 = np.asarray(options["state"], dtype=float)
            if x0.shape != (self.n,):
                raise ValueError(f"options['state'] has shape {x0.shape} but the state must have shape ({self.n},)")
            self._x = x0.copy()
        else:
            self._x = self.init_std * self.np_random.standard_normal(self.n)
        self._t = 0
        return self._x.astype(np.float32), {}

    def step(self, action: ArrayLike) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply ``u``: reward ``-(x^T Q x + u^T R u)`` at the current ``x``, then ``x' = A x + B u + w``."""
        if self._x is None:
            raise RuntimeError("LQREnv.step() called before reset()")
        u = np.asarray(action, dtype=float)
        if u.shape != (self.m,):
            raise ValueError(f"action has shape {u.shape} but LQREnv expects shape ({self.m},)")
        if not np.all(np.isfinite(u)):
            raise ValueError("action contains NaN or infinite entries")
        x = self._x
        reward = -float(x @ self.Q @ x + u @ self.R @ u)
        noise = self._noise_factor @ self.np_random.standard_normal(self.n)
        self._x = self.A @ x + self.B @ u + noise
        self._t += 1
        truncated = self._t >= self.horizon
        return self._x.astype(np.float32), reward, False, truncated, {}
