"""softflow: flow-matching policies for maximum-entropy RL on an actor-learner runtime.

The sub-packages live in the repository's top-level folders (algorithms/, actors/, learner/, deploy/) and are
installed as ``softflow.<folder>``; see pyproject.toml.
"""

__version__ = "0.1.0"
