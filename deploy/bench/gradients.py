"""``softflow bench gradients``: SAC Flow's actor-gradient norms over training, for K in {4, 7, 10} flow steps and the
naive MLP, Flow-G (gated) and Flow-T (decoded) velocities (arXiv 2509.25756: bounded for Flow-G/T, exploding for
the naive velocity as K grows).

Each of the 9 runs trains SAC Flow from scratch on one environment (default HalfCheetah-v5) in this process: one
env, ``learning_starts`` uniform random steps, then one update per env step from a local replay buffer (the
runtime's RolloutWorker, ReplayBuffer and Learner, without Ray), with the same seed, sizes and learning rates for
every run; only K and the velocity change. After every policy step the L2 norm of the actor gradient (before the
optimiser step, no clipping) is recorded (``SACFlow.grad_norms``).

Per run the JSON gives the median, 90th percentile and maximum norm, the medians over the first and the last
``window`` policy steps and their ratio (growth over training), the last training episode return, and the series
of window medians; with ``plot`` a figure of those series (one panel per K, log scale) is written. One line per
finished run goes to stderr. The decoded velocity takes its sizes from the defaults (d_model 96, 4 heads, 2 layers);
``hidden`` sets the widths of the MLP and of Flow-G's two networks.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from softflow.actors.envs import GymEnvConfig, make_env
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker
from softflow.algorithms import make_algorithm
from softflow.algorithms.sacflow import SACFlowConfig
from softflow.deploy.bench.timing import Stopwatch
from softflow.deploy.config import ConfigError
from softflow.learner.learner import Learner

STEPS = (4, 7, 10)
VELOCITIES = ("mlp", "gated", "decoded")


def train_and_record(env_id: str, config: SACFlowConfig, env_steps: int, learning_starts: int, seed: int
                     ) -> tuple[list[float], list[float]]:
    """One SAC Flow run; returns (actor-gradient norm of every policy step, training episode returns)."""
    torch.manual_seed(seed)
    env_config = GymEnvConfig(id=env_id)
    worker = RolloutWorker(lambda i: make_env(env_config), 1, lambda obs, explore: algorithm.act(obs, explore), seed)
    algorithm = make_algorithm(config, worker.obs_dim, worker.action_space.low.reshape(-1),
                               worker.action_space.high.reshape(-1))
    learner = Learner(algorithm, torch.device("cpu"))
    replay = ReplayBuffer(env_steps, worker.obs_dim, worker.act_dim, seed=seed)
    norms: list[float] = []
    returns: list[float] = []
    while worker.env_steps < env_steps:
        fragment = worker.run(1, random_actions=worker.env_steps < learning_starts)
        replay.add(fragment)
        returns += fragment.episode_returns
        if worker.env_steps >= learning_starts:
            learner.update(replay.sample(1, config.batch_size))
            norms += [float(norm) for norm in algorithm.grad_norms]
    return norms, returns


def summarise(norms: list[float], window: int) -> dict:
    window = max(1, min(window, len(norms) // 2))
    series = [statistics.median(norms[i:i + window]) for i in range(0, len(norms) - window + 1, window)]
    first, last = statistics.median(norms[:window]), statistics.median(norms[-window:])
    return {"policy_steps": len(norms), "median": statistics.median(norms),
            "p90": float(np.percentile(norms, 90)), "max": max(norms), "first_window_median": first,
            "last_window_median": last, "growth": last / first, "window": window, "series": series}


def plot_series(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STEPS), figsize=(4.2 * len(STEPS), 3.4), sharey=True)
    labels = {"mlp": "naive MLP", "gated": "Flow-G (gated)", "decoded": "Flow-T (decoded)"}
    for ax, k in zip(axes, STEPS):
        for run in (r for r in runs if r["steps"] == k):
            x = (np.arange(len(run["series"])) + 0.5) * run["window"]
            ax.plot(x, run["series"], label=labels[run["velocity"]])
        ax.set_yscale("log")
        ax.set_title(f"K = {k} flow steps")
        ax.set_xlabel("policy step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("actor gradient L2 norm (window median)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_gradients(env_id: str = "HalfCheetah-v5", env_steps: int = 5000, learning_starts: int = 1000,
                    batch_size: int = 256, hidden: int = 256, window: int = 100, seed: int = 0,
                    plot: str | None = None, steps: tuple[int, ...] = STEPS,
                    velocities: tuple[str, ...] = VELOCITIES) -> dict:
    """The 9 runs (or the ``steps`` x ``velocities`` given); one JSON-ready dict."""
    if env_steps <= learning_starts or min(batch_size, hidden, window) < 1:
        raise ConfigError("--env-steps must exceed the 1000 random steps; sizes must be positive")
    runs = []
    for k in steps:
        for velocity in velocities:
            config = SACFlowConfig(flow={"velocity": velocity, "steps": k, "hidden": [hidden]},
                                   batch_size=batch_size)
            with Stopwatch() as watch:
                norms, returns = train_and_record(env_id, config, env_steps, learning_starts, seed)
            runs.append({"steps": k, "velocity": velocity, **summarise(norms, window),
                         "last_episode_return": returns[-1] if returns else None, "seconds": watch.seconds})
            print(f"softflow bench gradients: K = {k}, {velocity}: median norm {runs[-1]['median']:.3g}, "
                  f"{runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    if plot:
        plot_series(runs, Path(plot))
    return {
        "benchmark": "gradients",
        "env": env_id,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "params": {"env_steps": env_steps, "learning_starts": learning_starts, "batch_size": batch_size,
                   "hidden": [hidden], "noise_std": SACFlowConfig().noise_std, "seed": seed, "window": window,
                   "plot": plot},
        "runs": runs,
    }


def from_args(args) -> dict:
    """``softflow bench gradients``'s flags (deploy/cli.py) to :func:`bench_gradients`."""
    return bench_gradients(args.env, env_steps=args.env_steps, batch_size=args.batch_size, plot=args.plot)
