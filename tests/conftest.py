"""Fixtures shared by the tests: an embedded Ray runtime, one torch thread, tiny experiment configs and fixed replay
batches. Plain helpers (no fixtures) are in helpers.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_runtime(request):
    """An embedded Ray runtime for one test module, with the module's ``RAY_NUM_CPUS`` CPUs (default 2); shut down
    after the module's last test."""
    import ray

    ray.init(num_cpus=getattr(request.module, "RAY_NUM_CPUS", 2), include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny networks gain nothing from intra-op threads, and on a busy 2-core machine
    threads that wait for each other make training and inference several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_experiment():
    """Builds tiny serial experiment configs: ``helpers.tiny_experiment``, called with the keys to replace."""
    import helpers

    return helpers.tiny_experiment


@pytest.fixture(scope="session")
def replay_batch():
    """Builds fixed random replay batches: ``helpers.replay_batch``, called with the sizes, seed and done
    fraction."""
    import helpers

    return helpers.replay_batch
