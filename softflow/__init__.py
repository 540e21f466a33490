"""softflow: flow-matching policies for maximum-entropy RL on an actor-learner runtime.

The sub-packages live in the repository's top-level folders (algorithms/, actors/, learner/, deploy/) and are
installed as ``softflow.<folder>``; see pyproject.toml.
"""

__version__ = "0.1.0"


def load_policy(path):
    """The trained policy of a run directory or checkpoint file: ``sample(obs, num_samples)`` and ``act(obs)``
    (best-of-N, as the rollout actors act); see :class:`softflow.deploy.policies.Policy`."""
    from softflow.deploy.policies import load_policy as load

    return load(path)
