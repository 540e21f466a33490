"""``softflow bench rllib``: softflow's SAC against RLlib's SAC on the same problem for the same wall time.

Both train Gaussian SAC on one environment (default HalfCheetah-v5) for ``seconds`` of wall time each, one after
the other on the same machine, with the same batch size, update-to-data ratio (RLlib: ``training_intensity =
batch_size * updates_per_step``), networks ([256, 256]), learning rates, gamma, and random steps before learning.
softflow runs its Ray runtime with one rollout actor and one learner; RLlib runs its new API stack with its default
for SAC, sampling in the algorithm's own process (``num_env_runners=0``), and a local learner (with one remote env
runner RLlib's ``training_intensity`` arithmetic counts a local sampler that does not sample, and it ran 2 updates
per step). Both compute with one torch thread per CPU of the machine (Ray's count): RLlib's process, and softflow's
learner, whose ``learner.num_cpus`` is the CPUs less the rollout actor's ``ACTOR_CPUS`` (an actor at about 100 env
steps/s uses a tenth of a core; the learner takes ``ceil(learner.num_cpus)`` threads). Reported for both: the
torch threads of the updates, env steps and learner updates per second of wall time, the update-to-data ratio
actually run (updates over env steps after ``learning_starts``), and the ratios softflow / RLlib. Startup (Ray,
building the algorithm) is not timed for either.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from softflow.deploy.bench.timing import Stopwatch
from softflow.deploy.config import ConfigError, parse_experiment

LOG_EVERY = 200
ACTOR_CPUS = 0.5


class _TimeUp(Exception):
    """Raised from the report callback to end softflow's run when its wall time is spent."""


def softflow_sac(env_id: str, seconds: float, batch_size: int, updates_per_step: float, learning_starts: int,
                 seed: int, cpus: int) -> dict[str, float]:
    """softflow's runtime (1 actor, 1 learner) for ``seconds``: env steps/s and updates/s."""
    from softflow.deploy.run.runtime import Runtime

    learner_cpus = max(1.0, cpus - ACTOR_CPUS)

    config = parse_experiment({
        "name": "bench-rllib", "seed": seed, "total_env_steps": 10**9, "log_every_steps": LOG_EVERY,
        "env": {"id": env_id},
        "algorithm": {"name": "sac", "batch_size": batch_size},
        "actors": {"count": 1, "num_cpus": ACTOR_CPUS, "envs_per_actor": 1, "fragment_length": 50, "candidates": 1},
        "replay": {"capacity": 1_000_000, "updates_per_step": updates_per_step},
        "learner": {"learning_starts": learning_starts, "checkpoint_every": 10**9, "num_cpus": learner_cpus,
                    "num_gpus": 0},
        "eval": {"episodes": 0},
    })
    scratch = Path(tempfile.mkdtemp(prefix="softflow-bench-"))
    try:
        runtime = Runtime(config, scratch)

        def stop_when_time_is_up(env_steps: int, metrics: dict[str, float]) -> None:
            if watch.seconds >= seconds:
                raise _TimeUp

        with Stopwatch() as watch:
            try:
                runtime.run(stop_when_time_is_up)
            except _TimeUp:
                pass
        threads = ray.get(runtime.learner.describe.remote())["threads"]
        return measured(runtime.counters.env_steps, runtime.counters.updates, watch.seconds, learning_starts, threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rllib_sac(env_id: str, seconds: float, batch_size: int, updates_per_step: float, learning_starts: int,
              seed: int, cpus: int) -> dict[str, float]:
    """RLlib's SAC (new API stack, sampling in this process, local learner) for ``seconds``: env steps/s and
    updates/s."""
    from ray.rllib.algorithms.sac import SACConfig

    config = (SACConfig()
              .environment(env_id)
              .env_runners(num_env_runners=0)
              .learners(num_learners=0)
              .training(train_batch_size_per_learner=batch_size, training_intensity=batch_size * updates_per_step,
                        num_steps_sampled_before_learning_starts=learning_starts, actor_lr=3e-4, critic_lr=1e-3,
                        alpha_lr=1e-3, gamma=0.99, tau=0.005, n_step=1,
                        replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 1_000_000})
              .rl_module(model_config={"fcnet_hiddens": [256, 256], "fcnet_activation": "relu"})
              .debugging(seed=seed, log_level="ERROR")
              .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    algo = config.build_algo()
    env_steps = updates = 0
    try:
        with Stopwatch() as watch:
            while watch.seconds < seconds:
                result = algo.train()
                env_steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
                trained = result.get("learners", {}).get("__all_modules__", {}).get(
                    "num_env_steps_trained_lifetime", 0)
                updates = int(trained) // batch_size
        used_threads = torch.get_num_threads()
    finally:
        algo.stop()
        torch.set_num_threads(threads)
    return measured(env_steps, updates, watch.seconds, learning_starts, used_threads)


def measured(env_steps: int, updates: int, seconds: float, learning_starts: int, torch_threads: int
             ) -> dict[str, float]:
    return {"torch_threads": torch_threads, "env_steps": env_steps, "updates": updates, "seconds": seconds,
            "env_steps_per_s": env_steps / seconds, "updates_per_s": updates / seconds,
            "updates_per_step_run": updates / max(env_steps - learning_starts, 1)}


def bench_rllib(env_id: str = "HalfCheetah-v5", seconds: float = 120.0, batch_size: int = 256,
                updates_per_step: float = 1.0, learning_starts: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Both runs, side by side, as one JSON-ready dict."""
    if seconds <= 0 or batch_size < 1 or updates_per_step <= 0:
        raise ConfigError("--seconds, --batch-size and --updates-per-step must be positive")
    args = (env_id, seconds, batch_size, updates_per_step, learning_starts, seed)
    ray.init(include_dashboard=False, logging_level=logging.ERROR)
    cpus = int(ray.cluster_resources()["CPU"])
    try:
        ours = softflow_sac(*args, cpus)
    finally:
        ray.shutdown()
    ray.init(include_dashboard=False, logging_level=logging.ERROR)
    try:
        theirs = rllib_sac(*args, cpus)
    finally:
        ray.shutdown()
    return {
        "benchmark": "rllib", "env": env_id, "ray_version": ray.__version__,
        "params": {"seconds": seconds, "batch_size": batch_size, "updates_per_step": updates_per_step,
                   "learning_starts": learning_starts, "hidden": [256, 256], "seed": seed},
        "softflow": ours, "rllib": theirs,
        "env_steps_per_s_ratio": ours["env_steps_per_s"] / max(theirs["env_steps_per_s"], 1e-9),
        "updates_per_s_ratio": ours["updates_per_s"] / max(theirs["updates_per_s"], 1e-9),
    }



def from_args(args) -> dict:
    """``softflow bench rllib``'s flags (deploy/cli.py) to :func:`bench_rllib`."""
    return bench_rllib(args.env, seconds=args.seconds, batch_size=args.batch_size,
                       updates_per_step=args.updates_per_step)
