"""Plain helpers shared by test modules (not collected as tests; fixtures are in conftest.py). Test modules import it
as ``helpers``: pytest puts tests/ on ``sys.path`` when it loads tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch

from softflow import checkpoints
from softflow.deploy.config import ExperimentConfig, parse_experiment

OBS_DIM = 4  # InvertedPendulum-v5, the env of the tiny runs
CANDIDATES = 4


def tiny_experiment(**sections) -> ExperimentConfig:
    """A few seconds of serial SAC on InvertedPendulum-v5 with tiny networks (300 env steps, updates from step 100,
    no evaluation, no W&B); each of ``sections`` replaces that top-level key whole."""
    tree = {
        "name": "tiny", "total_env_steps": 300, "log_every_steps": 100, "env": {"id": "InvertedPendulum-v5"},
        "algorithm": {"name": "sac", "batch_size": 32, "hidden": [16, 16], "critic": {"hidden": [16, 16]}},
        "actors": {"count": 0, "candidates": CANDIDATES}, "learner": {"learning_starts": 100, "num_gpus": 0},
        "eval": {"episodes": 0}, "wandb": {"mode": "disabled"},
    }
    return parse_experiment(tree | sections)


def ray_experiment(**sections) -> dict:
    """The config tree of a small, fast SAC run on Ray: two rollout actors on InvertedPendulum-v5 (600 env steps,
    fragments of 2 envs x 10 steps, a checkpoint every 100 updates, an evaluation every 300 steps); each of
    ``sections`` extends that section (a dict) or replaces that key."""
    tree = {
        "name": "runtime-test", "seed": 0, "total_env_steps": 600, "log_every_steps": 100,
        "env": {"id": "InvertedPendulum-v5"},
        "algorithm": {"name": "sac", "batch_size": 32, "hidden": [32, 32], "critic": {"hidden": [32, 32]}},
        "actors": {"count": 2, "num_cpus": 0.5, "envs_per_actor": 2, "fragment_length": 10, "candidates": 2},
        "replay": {"capacity": 10_000, "updates_per_step": 0.5},
        "learner": {"learning_starts": 100, "checkpoint_every": 100, "publish_every": 10,
                    "batches_per_request": 2, "num_gpus": 0, "num_cpus": 0.5},
        "eval": {"every_steps": 300, "episodes": 1},
    }
    for key, value in sections.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) else value
    return tree


def train_tiny_run(run_dir: Path) -> Path:
    """A tiny serial ISFM run (:func:`tiny_experiment`) trained into ``run_dir``; the run directory."""
    from softflow.deploy.run.driver import train

    config = tiny_experiment(name="serve", algorithm={
        "name": "isfm", "batch_size": 32, "num_candidates": 4, "critic": {"hidden": [16, 16]},
        "flow": {"hidden": [16, 16], "steps": 2}})
    train(config, run_dir, progress=False)
    return run_dir


def replay_batch(n: int = 32, obs_dim: int = 3, act_dim: int = 2, seed: int = 0, done: float = 0.1
                 ) -> dict[str, torch.Tensor]:
    """A fixed random batch in the replay buffer's format: actions in [-1, 1], a ``done`` fraction (about) of the
    transitions terminal."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g), "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "terminated": (torch.rand(n, generator=g) < done).float()}


def write_set(root: Path, env_steps: int, keep: int = 2, payload: bytes = b"x" * 1000) -> Path:
    """Commits a checkpoint set of ``env_steps`` under ``root``: a small learner.pt and a replay.npz of
    ``payload``."""
    staging = checkpoints.staging_path(root, env_steps)
    staging.mkdir(parents=True)
    torch.save({"updates": env_steps // 2, "w": torch.arange(4.0)}, staging / checkpoints.LEARNER_FILE)
    (staging / "replay.npz").write_bytes(payload)
    return checkpoints.commit_set(staging, env_steps, env_steps // 2, keep)
