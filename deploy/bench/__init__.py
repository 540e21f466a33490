"""``softflow bench``: one module per benchmark (learner, runtime, rllib, act, gradients, serve), each printing
JSON and comparing side by side in one run."""
