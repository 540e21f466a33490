"""``softflow bench runtime``: what the Ray runtime costs, each figure measured side by side in one run.

Four measurements for one experiment file (its env, algorithm, actors, replay and learner sections):

1. Learner: updates/s of the :class:`LearnerActor` pulling batches from the :class:`ReplayActor` through Ray (two
   sample requests in flight), over updates/s of the same update loop alone (a plain :class:`Learner` sampling a
   local :class:`ReplayBuffer` in this process, same torch threads), in ``LEARNER_ROUNDS`` alternating rounds: the
   ratio is the median of the rounds' ratios, so that a shared machine's drift between two long windows does not
   pass for a cost of the runtime. Aim >= 0.95.
2. Actor: env steps/s of one :class:`RolloutActor` driven as the runtime drives it (two runs in flight, each
   fragment forwarded to the replay actor by reference), over env steps/s of the same policy + env loop alone (a
   plain :class:`RolloutWorker` with best-of-N acting in this process, one torch thread). Target >= 0.9.
3. Replay: transitions added per second and batches sampled per second, in process and through the actor.
4. Weights: publish-to-pickup latency, from the learner's ``publish`` call to a rollout actor having loaded the
   weights, and the size of what is published.

Each pair runs alone, one after the other, with nothing else stepping (a 2-core machine cannot run a learner and
actors side by side without them taking cores from each other; the ratios isolate what Ray's process boundaries,
object store and the rate limiter cost). Ratios are the result; absolute figures move with the machine's load.
"""

from __future__ import annotations

import logging
import math
import pickle
import statistics

import numpy as np
import ray
import torch

from softflow.actors.envs import make_env
from softflow.actors.fragment import Fragment
from softflow.actors.remote import ReplayActor, RolloutActor
from softflow.actors.replay import ReplayBuffer
from softflow.actors.rollout import RolloutWorker
from softflow.algorithms import make_algorithm
from softflow.deploy.bench.timing import Stopwatch, rate
from softflow.deploy.config import ConfigError, ExperimentConfig, checkpoint_meta
from softflow.learner.learner import Learner, learner_device
from softflow.learner.remote import LearnerActor, RemoteReplay

PREFILL = 10_000
PUBLISH_REPEATS = 20
LEARNER_ROUNDS = 5
OPEN_LIMITER = 1e12  # a tolerance that never holds anyone back: the bench times the data path, not the ratio


def random_fragment(n: int, obs_dim: int, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> Fragment:
    """``n`` transitions of random observations and in-bound actions (for filling buffers)."""
    lo, hi = np.maximum(low, -1.0), np.minimum(high, 1.0)
    return Fragment(obs=rng.standard_normal((n, obs_dim), dtype=np.float32),
                    actions=rng.uniform(lo, hi, (n, len(low))).astype(np.float32),
                    rewards=rng.standard_normal(n, dtype=np.float32),
                    next_obs=rng.standard_normal((n, obs_dim), dtype=np.float32),
                    terminated=np.zeros(n, np.float32), truncated=np.zeros(n, np.float32))


def bench_runtime(config: ExperimentConfig, seconds: float = 10.0) -> dict:
    """Runs the four measurements on an embedded Ray (or the one already initialised) and returns one JSON-ready
    dict. ``seconds`` is the timed length of each of the four throughput loops."""
    if seconds <= 0:
        raise ConfigError("--seconds must be positive")
    if config.actors.count == 0:
        raise ConfigError("actors.count is 0 (serial mode): the runtime bench needs an experiment that runs on Ray")
    c = config
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, logging_level=logging.ERROR)
    try:
        return _measure(c, seconds)
    finally:
        if started_here:
            ray.shutdown()


def _measure(c: ExperimentConfig, seconds: float) -> dict:
    try:
        actor = ray.remote(RolloutActor).options(num_cpus=0).remote(
            c.env, c.algorithm, c.actors.envs_per_actor, c.actors.candidates, c.seed, c.actors.exploration_noise)
        obs_dim, low, high = ray.get(actor.spaces.remote())
        device = learner_device(c.learner.num_gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    rng = np.random.default_rng(c.seed)
    buffer = ReplayBuffer(c.replay.capacity, obs_dim, len(low), seed=c.seed)
    replay = ray.remote(ReplayActor).options(num_cpus=0).remote(
        c.replay.capacity, obs_dim, len(low), 1.0, 1, OPEN_LIMITER, c.seed)
    replay_rates = _replay_rates(c, buffer, replay, random_fragment(_chunk(c), obs_dim, low, high, rng), seconds)
    fill = random_fragment(PREFILL, obs_dim, low, high, rng)
    buffer.add(fill)
    ray.get(replay.add.remote(fill))
    learner_rates, learner_actor = _learner_rates(c, buffer, replay, obs_dim, low, high, device, seconds)
    weights = _publish_latency(learner_actor, actor)
    actor_rates = _actor_rates(c, actor, replay, obs_dim, low, high, weights.pop("reference"), seconds)
    return {
        "benchmark": "runtime",
        "experiment": c.name, "env": c.env.id, "algorithm": c.algorithm.name,
        "learner_device": str(device), "torch_version": torch.__version__, "ray_version": ray.__version__,
        "params": {"seconds": seconds, "batch_size": c.algorithm.batch_size,
                   "batches_per_request": c.learner.batches_per_request, "publish_every": c.learner.publish_every,
                   "envs_per_actor": c.actors.envs_per_actor, "fragment_length": c.actors.fragment_length,
                   "candidates": c.actors.candidates, "learner_threads": _learner_threads(c)},
        "learner": learner_rates, "actor": actor_rates, "replay": replay_rates, "weights": weights,
    }


def _chunk(c: ExperimentConfig) -> int:
    return c.actors.fragment_length * c.actors.envs_per_actor


def _learner_threads(c: ExperimentConfig) -> int:
    return max(1, math.ceil(c.learner.num_cpus))


def _replay_rates(c: ExperimentConfig, buffer: ReplayBuffer, replay, piece: Fragment, seconds: float) -> dict:
    """Transitions added and batches sampled per second, in this process and through the replay actor."""
    chunk, per_request = _chunk(c), c.learner.batches_per_request
    add_local = rate(lambda: (buffer.add(piece), chunk)[1], seconds / 4)
    sample_local = rate(lambda: (buffer.sample(per_request, c.algorithm.batch_size), per_request)[1], seconds / 4)
    piece_ref = ray.put(piece)
    add_remote = rate(lambda: (ray.get(replay.add.remote(piece_ref)), chunk)[1], seconds / 4)
    sample_remote = rate(lambda: (ray.get(replay.sample.remote(per_request, c.algorithm.batch_size)),
                                  per_request)[1], seconds / 4)
    return {"add_transitions_per_s_local": add_local, "add_transitions_per_s_actor": add_remote,
            "sample_batches_per_s_local": sample_local, "sample_batches_per_s_actor": sample_remote,
            "fragment_transitions": chunk}


def _learner_rates(c: ExperimentConfig, buffer: ReplayBuffer, replay, obs_dim: int, low, high,
                   device: torch.device, seconds: float):
    """Updates/s of a plain Learner sampling ``buffer`` in this process and of a LearnerActor fed by ``replay``,
    with the same torch threads, in alternating rounds of ``seconds / LEARNER_ROUNDS`` each (medians); returns the
    figures and the LearnerActor."""
    torch.manual_seed(c.seed)
    learner = Learner(make_algorithm(c.algorithm, obs_dim, low, high, device), device)
    gpus = 0.0 if device.type == "cpu" else 1.0
    learner_actor = ray.remote(LearnerActor).options(num_cpus=c.learner.num_cpus, num_gpus=gpus).remote(
        c.algorithm, obs_dim, low, high, RemoteReplay(replay, c.learner.batches_per_request, c.algorithm.batch_size),
        c.seed, checkpoint_meta(c, obs_dim, low, high), num_gpus=gpus, threads=_learner_threads(c), share=ray.put)

    def update_alone() -> int:
        learner.update(buffer.sample(c.learner.batches_per_request, c.algorithm.batch_size))
        return c.learner.batches_per_request

    def train_inside() -> int:
        return ray.get(learner_actor.train.remote(c.learner.publish_every, 0.0)).updates

    threads_before = torch.get_num_threads()
    torch.set_num_threads(_learner_threads(c))
    update_alone(), train_inside()
    alone, inside = [], []
    for _ in range(LEARNER_ROUNDS):
        alone.append(rate(update_alone, seconds / LEARNER_ROUNDS, warmup=False))
        inside.append(rate(train_inside, seconds / LEARNER_ROUNDS, warmup=False))
    torch.set_num_threads(threads_before)
    ratios = [b / a for a, b in zip(alone, inside)]
    return {"alone_updates_per_s": statistics.median(alone), "runtime_updates_per_s": statistics.median(inside),
            "ratio": statistics.median(ratios), "round_ratios": ratios}, learner_actor


def _publish_latency(learner_actor, actor) -> dict:
    """Milliseconds from the learner's ``publish`` to ``actor`` having loaded the weights, and their size."""
    latencies = []
    for _ in range(PUBLISH_REPEATS):
        with Stopwatch() as watch:
            ref = ray.get(learner_actor.publish.remote()).reference
            ray.get(actor.set_weights.remote(ref))
        latencies.append(watch.seconds * 1e3)
    return {"publish_to_pickup_ms_median": statistics.median(latencies), "publish_to_pickup_ms_max": max(latencies),
            "bytes": len(pickle.dumps(ray.get(ref)[1])), "reference": ref}


def _actor_rates(c: ExperimentConfig, actor, replay, obs_dim: int, low, high, weights_ref, seconds: float) -> dict:
    """Env steps/s of the same policy + env loop alone (one torch thread, as in the actors), then of ``actor``
    driven through Ray with its fragments forwarded to ``replay``."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    algorithm = make_algorithm(c.algorithm, obs_dim, low, high, "cpu")
    algorithm.load_policy_weights(ray.get(weights_ref)[1])
    worker = RolloutWorker(lambda i: make_env(c.env), c.actors.envs_per_actor,
                           lambda obs, explore: algorithm.act(obs, explore, c.actors.candidates), c.seed,
                           c.actors.exploration_noise)
    alone = rate(lambda: len(worker.run(c.actors.fragment_length)), seconds)
    worker.close()
    torch.set_num_threads(threads_before)
    inside = _actor_steps_inside(actor, replay, c.actors.fragment_length, seconds)
    return {"alone_env_steps_per_s": alone, "runtime_env_steps_per_s": inside, "ratio": inside / alone}


def _actor_steps_inside(actor, replay, fragment_length: int, seconds: float) -> float:
    """Env steps/s of ``actor`` kept busy with two runs in flight, each finished fragment handed to ``replay``."""
    def submit():
        return actor.run.options(num_returns=2).remote(fragment_length, False, None)

    ray.get(submit()[1])
    runs = [submit(), submit()]
    adds, steps = [], 0
    with Stopwatch() as watch:
        while watch.seconds < seconds:
            fragment_ref, summary_ref = runs.pop(0)
            steps += ray.get(summary_ref).transitions
            adds.append(replay.add.remote(fragment_ref))
            runs.append(submit())
    ray.get(adds + [r for pair in runs for r in pair])
    return steps / watch.seconds



def from_args(args) -> dict:
    """``softflow bench runtime``'s flags (deploy/cli.py) to :func:`bench_runtime`."""
    from softflow.deploy.config import load_experiment

    return bench_runtime(load_experiment(args.experiment, args.overrides), seconds=args.seconds)
