"""Task reports written into the run directory after training: ``lqr.json`` for the LQR case study, and
``multigoal.json`` with ``multigoal.png`` (FMER's Figure 3) for the 2D multi-goal task. ``task_report`` returns the
entries they add to the run's summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from softflow.actors.envs import LQREnvConfig
from softflow.actors.lqr import soft_lqr_solution
from softflow.actors.multigoal import ENV_ID as MULTIGOAL_ID
from softflow.actors.multigoal import GOALS, goal_headings
from softflow.algorithms import Algorithm
from softflow.algorithms.flows import FlowPolicy


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
    and compares them with the soft-optimal K* and Sigma* for the final alpha (relative Frobenius errors).

    ``target`` says what ``rel_err_K`` and ``rel_err_Sigma`` measure against: ``soft_optimum`` (K*, Sigma*), or,
    for an algorithm whose actor objective has another optimum on the LQR (one with ``path_optimum_covariance``:
    SAC Flow, whose path density gives N(-K* x, (K alpha / 2) diag(H_uu)^-1), docs/algorithms.md "SAC Flow's
    optimum on the LQR"), ``path_density_optimum`` (K*, ``Sigma_target``). ``rel_err_Sigma_soft`` is always the
    error against Sigma*."""
    rng = np.random.default_rng(seed)
    states = (env.init_std * rng.standard_normal((num_states, len(env.A)))).astype(np.float32)
    repeated = np.repeat(states, samples_per_state, axis=0)
    actions = algorithm.act(repeated, True).reshape(num_states, samples_per_state, -1)
    K, bias, Sigma = fit_linear_gaussian(states, actions.astype(np.float64))
    alpha = algorithm.alpha
    optimum = soft_lqr_solution(env.A, env.B, env.Q, env.R, gamma, alpha)
    path_optimum = getattr(algorithm, "path_optimum_covariance", None)
    target = "soft_optimum" if path_optimum is None else "path_density_optimum"
    Sigma_target = optimum.Sigma if path_optimum is None else path_optimum(optimum.H_uu, alpha)

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
        "target": target,
        "Sigma_target": np.asarray(Sigma_target).tolist(),
        "rel_err_K": rel_err(K, optimum.K),
        "rel_err_Sigma": rel_err(Sigma, Sigma_target),
        "rel_err_Sigma_soft": rel_err(Sigma, optimum.Sigma),
        "num_states": num_states,
        "samples_per_state": samples_per_state,
    }


def multigoal_report(algorithm: Algorithm, run_dir: Path, num_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mode coverage at the origin: the fraction of ``num_samples`` policy samples (plain sampling, not best-of-N)
    heading for each goal (``goal_headings``), and the picture ``multigoal.png``: min(Q1, Q2)(0, a) over the action
    square as contours, the samples on top and, for a flow policy, 20 ODE paths from noise to action."""
    torch.manual_seed(seed)
    policy, critic = algorithm.policy, algorithm.critic
    origin = torch.zeros(1, 2)
    with torch.no_grad():
        actions = policy.sample(origin, num_samples).action[0].numpy()
        grid = np.linspace(-1, 1, 101, dtype=np.float32)
        mesh = torch.as_tensor(np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2))
        q = critic.min_q(torch.zeros(len(mesh), 2), mesh).numpy().reshape(101, 101)
        paths = flow_paths(policy, origin, 20) if isinstance(policy, FlowPolicy) else None
    fractions = goal_headings(actions)
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    contours = axes.contourf(grid, grid, q, levels=30, cmap="viridis")
    figure.colorbar(contours, ax=axes, label="min Q(s=0, a)")
    axes.scatter(actions[:, 0], actions[:, 1], s=3, c="white", alpha=0.6, label="policy samples")
    if paths is not None:
        for path in paths.transpose(1, 0, 2):
            axes.plot(path[:, 0], path[:, 1], color="red", linewidth=0.8)
        axes.scatter(paths[0, :, 0], paths[0, :, 1], s=8, c="red", label="noise and its ODE path")
    for goal in GOALS:
        axes.plot([0, goal[0] / 5], [0, goal[1] / 5], "w--", linewidth=0.6)
    axes.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="a_x", ylabel="a_y", aspect="equal",
             title=f"{type(algorithm).__name__} at s = (0, 0): " + " ".join(f"{f:.2f}" for f in fractions))
    axes.legend(loc="lower left", fontsize=7)
    figure.savefig(run_dir / "multigoal.png", dpi=120)
    return {"goal_fractions": fractions.tolist(), "heading_fraction": float(fractions.sum()),
            "goals_covered": int((fractions >= 0.1).sum()), "num_samples": num_samples}


def flow_paths(policy: FlowPolicy, obs: torch.Tensor, count: int) -> np.ndarray:
    """Actions along the solver's path for ``count`` noise draws at one state: shape (K + 1, count, d), the first
    row the squashed noise x_0 ~ N(0, base_std^2 I), the last the actions."""
    x = policy.draw_base(obs, count)
    states = obs.expand(count, -1)
    path = [policy.squash(x)]
    for k in range(policy.steps):
        x = policy.step(x, torch.full((count, 1), k / policy.steps), states)
        path.append(policy.squash(x))
    return torch.stack(path).numpy()


def needs_task_report(config: Any) -> bool:
    """Whether ``task_report`` has something to say about this experiment's env."""
    return isinstance(config.env, LQREnvConfig) or config.env.id == MULTIGOAL_ID


def task_report(algorithm: Algorithm, config: Any, run_dir: Path) -> dict[str, float]:
    """Writes the env's report into ``run_dir`` and returns its summary entries (``lqr/...``, ``multigoal/...``);
    nothing for other envs."""
    if isinstance(config.env, LQREnvConfig):
        fit = lqr_report(algorithm, config.env, config.algorithm.gamma, seed=config.seed)
        (run_dir / "lqr.json").write_text(json.dumps(fit, indent=2))
        return {"lqr/rel_err_K": fit["rel_err_K"], "lqr/rel_err_Sigma": fit["rel_err_Sigma"]}
    if config.env.id == MULTIGOAL_ID:
        coverage = multigoal_report(algorithm, run_dir, seed=config.seed)
        (run_dir / "multigoal.json").write_text(json.dumps(coverage, indent=2))
        return {**{f"multigoal/goal_{g}_fraction": f for g, f in enumerate(coverage["goal_fractions"])},
                "multigoal/heading_fraction": coverage["heading_fraction"],
                "multigoal/goals_covered": coverage["goals_covered"]}
    return {}
