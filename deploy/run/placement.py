"""Where a run's processes go: one placement group reserves the whole topology, so a run starts complete or not at all.

Bundles (:func:`topology_bundles`): bundle 0 holds the learner (``learner.num_cpus``, its GPU, ``learner.resources``)
and, at no extra cost, the replay actor and the evaluator beside it, so that batches travel within a node; then one
bundle per rollout actor (``actors.num_cpus``, ``actors.resources``). The group uses Ray's ``SPREAD`` strategy: rollout
actors go to different nodes where they can. Custom resources make placement explicit on a cluster whose nodes were
started with e.g. ``ray start --resources '{"learner": 1}'`` and ``'{"rollout": 16}'``.

Inside a Ray Tune trial (``softflow sweep``) the trial's own placement group, built by the sweep from
``[TRIAL_DRIVER_BUNDLE, *topology_bundles(...)]``, is used instead of a new one: bundle 0 is the trial's driver.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from softflow.deploy.config import ConfigError, ExperimentConfig

TRIAL_DRIVER_BUNDLE = {"CPU": 0.25}
PLACEMENT_TIMEOUT_S = 60.0
_EPS = 1e-9


def learner_gpus(config: ExperimentConfig) -> float:
    """``learner.num_gpus`` resolved against the cluster: 'auto' is 1 when it has a GPU, else 0."""
    num_gpus = config.learner.num_gpus
    if num_gpus == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return float(num_gpus)


def _bundle(resources: dict[str, float]) -> dict[str, float]:
    bundle = {key: float(value) for key, value in resources.items() if value > 0}
    return bundle or {"CPU": 0.01}  # Ray refuses empty bundles


def topology_bundles(config: ExperimentConfig, gpus: float) -> list[dict[str, float]]:
    """The learner's bundle, then one bundle per rollout actor."""
    learner = _bundle({"CPU": config.learner.num_cpus, "GPU": gpus, **config.learner.resources})
    actor = _bundle({"CPU": config.actors.num_cpus, **config.actors.resources})
    return [learner] + [dict(actor) for _ in range(config.actors.count)]


def total_resources(bundles: list[dict[str, float]]) -> dict[str, float]:
    """What ``bundles`` need together, per resource."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def shortfall(bundles: list[dict[str, float]]) -> tuple[str, float, float] | None:
    """The first resource (CPU, GPU, then custom ones by name) of which ``bundles`` need more in total than the Ray
    cluster has, as (name, needed, available); None when all fit. The one comparison of a run's (or a sweep
    trial's) needs with the cluster."""
    have = ray.cluster_resources()
    need = total_resources(bundles)
    for key in sorted(need, key=lambda key: (key not in ("CPU", "GPU"), key)):
        if need[key] > have.get(key, 0.0) + _EPS:
            return key, need[key], float(have.get(key, 0.0))
    return None


def check_resources(config: ExperimentConfig, gpus: float) -> None:
    """Fails fast, with the numbers, when the cluster's totals cannot hold the run (per resource, custom ones
    included); what fits in total but not node by node is caught by the placement group's timeout."""
    missing = shortfall(topology_bundles(config, gpus))
    if missing is None:
        return
    key, need, have = missing
    c = config
    if key == "CPU":
        raise ConfigError(
            f"actors.count={c.actors.count} x actors.num_cpus={c.actors.num_cpus:g} + "
            f"learner.num_cpus={c.learner.num_cpus:g} needs {need:g} CPUs but the Ray cluster has "
            f"{have:g}; lower actors.num_cpus (fractions share a core) or actors.count, or add nodes")
    if key == "GPU":
        raise ConfigError(f"learner.num_gpus={gpus:g} but the Ray cluster has {have:g} GPUs; "
                          f"use learner.num_gpus=0 or 'auto', or add a GPU node")
    raise ConfigError(
        f"the run needs {need:g} of the custom resource '{key}' (actors.resources / learner.resources) but "
        f"the Ray cluster has {have:g}; start nodes with ray start --resources "
        f"'{{\"{key}\": N}}' or remove it from the experiment")


class Topology:
    """The placement group of one run and the scheduling options of each process in it."""

    def __init__(self, config: ExperimentConfig, gpus: float, timeout_s: float = PLACEMENT_TIMEOUT_S):
        current = get_current_placement_group()
        if current is not None:  # a Tune trial: its group holds the driver's bundle, then ours
            self.group, self.offset, self.owned = current, 1, False
            return
        check_resources(config, gpus)
        bundles = topology_bundles(config, gpus)
        self.group, self.offset, self.owned = placement_group(bundles, strategy="SPREAD"), 0, True
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            self.remove()
            raise ConfigError(
                f"the Ray cluster has the resources in total but could not place the run's {len(bundles)} bundles "
                f"({bundles[0]} for the learner, {bundles[-1]} per rollout actor) within {timeout_s:g} s: no node "
                f"fits one of them; lower actors.num_cpus or check each node's resources (ray status)")

    def _strategy(self, bundle: int) -> dict[str, Any]:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=self.offset + bundle)}

    def learner(self) -> dict[str, Any]:
        """Options for the learner and the processes beside it (replay actor, evaluator)."""
        return self._strategy(0)

    def actor(self, index: int) -> dict[str, Any]:
        """Options for rollout actor ``index``."""
        return self._strategy(1 + index)

    def remove(self) -> None:
        """Releases the group (only one this run created)."""
        if self.owned:
            remove_placement_group(self.group)
