"""Where the parts of a run live: each in its own Ray process, or all in this one (serial mode).

The runtime (runtime.py) is one loop written against Ray's actor API: ``handle.method.remote(...)`` starts a call
and returns a future, ``get`` reads it, ``wait`` says which futures are done, ``put`` shares a value. Two process
layouts supply it (Acme's same agent, local or distributed; Sample Factory's serial mode):

- :class:`RayProcesses`: a rollout actor, the replay actor, the learner and the evaluator are Ray actors, placed by
  the run's placement group (placement.py), with their restart policies; calls run concurrently. Ray restarts the
  replay actor; the rollout actors and the evaluator are restarted by the driver (supervision.py), which watches
  each of them with a ``watch`` call in a concurrency group of its own.
- :class:`LocalProcesses` (``actors.count: 0``): the same classes as plain objects in this process; a call runs to
  completion when it is made and returns a finished future, so the loop steps the environment, fills the replay
  buffer and updates in turn, deterministically. Nothing of Ray is started.
"""

from __future__ import annotations

import math
import random
from functools import cache
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from softflow.actors.remote import Evaluator, ReplayActor, RolloutActor
from softflow.deploy.config import ExperimentConfig
from softflow.deploy.run.placement import Topology, learner_gpus
from softflow.learner.remote import LearnerActor, LocalReplay, RemoteReplay


@cache
def _watched(cls: type):
    """``cls`` as a Ray actor class with a ``watch`` concurrency group beside the default one."""
    return ray.remote(concurrency_groups={"watch": 1})(cls)


class RayProcesses:
    """Every part in its own Ray actor, inside the run's placement group."""

    errors = (RayActorError, ActorUnavailableError)  # what a call to a dead actor raises
    runs_in_flight = 2  # per rollout actor: the next run is queued while the driver handles the last
    # While the rate limiter holds every actor back, the driver asks the replay actor again when the learner will
    # have made room for the next fragment, but no sooner than status_poll_s and no later than status_wait_max_s
    # (Runtime._next_status_in). Asked back to back, the driver and the replay actor took most of a core from the
    # learner; asked every 20 ms, their wake-ups still cost a two-thread learner a tenth of its updates.
    status_poll_s = 0.02
    status_wait_max_s = 0.5
    get = staticmethod(ray.get)
    put = staticmethod(ray.put)

    def __init__(self, config: ExperimentConfig):
        self.config = config
        self.gpus = learner_gpus(config)
        self.topology = Topology(config, self.gpus)

    @property
    def rollout_actors(self) -> int:
        return self.config.actors.count

    @staticmethod
    def wait(futures: list, timeout: float) -> list:
        return ray.wait(futures, num_returns=1, timeout=timeout)[0]

    @staticmethod
    def ready(futures: list) -> list:
        """Those of ``futures`` that have finished, without waiting."""
        return ray.wait(futures, num_returns=len(futures), timeout=0)[0]

    @staticmethod
    def watch(handle):
        """A call that fails when the process of ``handle`` dies (supervision.py)."""
        return handle.watch.options(concurrency_group="watch").remote()

    @staticmethod
    def kill(handle) -> None:
        ray.kill(handle, no_restart=True)

    def rollout_actor(self, index: int, *args: Any, **kwargs: Any):
        """Rollout actor ``index`` (its bundle of the placement group); the driver restarts it when it dies."""
        c = self.config.actors
        return _watched(RolloutActor).options(
            num_cpus=c.num_cpus, resources=c.resources, max_restarts=0, max_task_retries=0,
            **self.topology.actor(index)).remote(*args, threads=1, **kwargs)

    def replay(self, *args: Any):
        return ray.remote(ReplayActor).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                               **self.topology.learner()).remote(*args)

    def replay_client(self, replay, batches_per_request: int, batch_size: int) -> RemoteReplay:
        return RemoteReplay(replay, batches_per_request, batch_size)

    def learner(self, *args: Any, **kwargs: Any):
        c = self.config.learner
        return ray.remote(LearnerActor).options(
            num_cpus=c.num_cpus, num_gpus=self.gpus, resources=c.resources, max_restarts=0,
            **self.topology.learner()).remote(*args, num_gpus=self.gpus, threads=max(1, math.ceil(c.num_cpus)),
                                              share=ray.put, **kwargs)

    def evaluator(self, *args: Any, **kwargs: Any):
        """The evaluator, beside the learner; the driver restarts it when it dies."""
        return _watched(Evaluator).options(num_cpus=0, max_restarts=0, max_task_retries=0,
                                           **self.topology.learner()).remote(*args, threads=1, **kwargs)

    def placement(self, learner, replay, actors: list) -> dict[str, Any]:
        """The Ray node of the learner, the replay actor and each rollout actor (``dead`` for one that died just
        now)."""
        nodes = []
        for actor in actors:
            try:
                nodes.append(ray.get(actor.node_id.remote()))
            except self.errors:
                nodes.append("dead")
        return {"learner": ray.get(learner.node_id.remote()), "replay": ray.get(replay.node_id.remote()),
                "actors": nodes}

    def close(self) -> None:
        """Releases the run's placement group (its actors end with it)."""
        self.topology.remove()


class Finished:
    """The future of a call that has already run in this process."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _resolve(value: Any) -> Any:
    return value.value if isinstance(value, Finished) else value


class _LocalMethod:
    def __init__(self, method, num_returns: int = 1):
        self.method, self.num_returns = method, num_returns

    def options(self, num_returns: int = 1) -> _LocalMethod:
        return _LocalMethod(self.method, num_returns)

    def remote(self, *args: Any, **kwargs: Any):
        result = self.method(*map(_resolve, args), **{k: _resolve(v) for k, v in kwargs.items()})
        return Finished(result) if self.num_returns == 1 else tuple(Finished(r) for r in result)


class LocalHandle:
    """A plain object behind Ray's call syntax: ``handle.method.remote(*args)`` runs the method now."""

    def __init__(self, target: Any):
        self.target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.target, name))


class LocalProcesses:
    """Every part as a plain object in this process (serial mode: one rollout worker, no Ray)."""

    errors: tuple = ()  # nothing in this process dies on its own
    rollout_actors = 1
    runs_in_flight = 1
    status_poll_s = 0.0  # nothing runs between two calls here, so the status can only change by the driver's calls
    status_wait_max_s = 0.0

    def __init__(self, config: ExperimentConfig):
        self.config = config
        self.gpus = config.learner.num_gpus
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)

    @staticmethod
    def get(future: Any) -> Any:
        return [_resolve(f) for f in future] if isinstance(future, list) else _resolve(future)

    @staticmethod
    def put(value: Any) -> Any:
        return value

    @staticmethod
    def wait(futures: list, timeout: float) -> list:
        return futures  # every call has finished when it returns

    @staticmethod
    def ready(futures: list) -> list:
        return futures

    @staticmethod
    def watch(handle: LocalHandle) -> None:
        return None  # this process is the driver's own: nothing to watch

    @staticmethod
    def kill(handle: LocalHandle) -> None:
        pass

    def rollout_actor(self, index: int, *args: Any, **kwargs: Any) -> LocalHandle:
        return LocalHandle(RolloutActor(*args, threads=None, **kwargs))

    def replay(self, *args: Any) -> LocalHandle:
        return LocalHandle(ReplayActor(*args))

    def replay_client(self, replay: LocalHandle, batches_per_request: int, batch_size: int) -> LocalReplay:
        return LocalReplay(replay.target, batches_per_request, batch_size)

    def learner(self, *args: Any, **kwargs: Any) -> LocalHandle:
        """The learner, which sets this process's torch threads as on Ray (``ceil(learner.num_cpus)``)."""
        threads = max(1, math.ceil(self.config.learner.num_cpus))
        return LocalHandle(LearnerActor(*args, num_gpus=self.gpus, threads=threads, share=self.put, **kwargs))

    def evaluator(self, *args: Any, **kwargs: Any) -> LocalHandle:
        return LocalHandle(Evaluator(*args, threads=None, **kwargs))

    def placement(self, learner, replay, actors: list) -> dict[str, Any]:
        return {"learner": "this process", "replay": "this process", "actors": ["this process"]}

    def close(self) -> None:
        pass
