"""``learner.compile``: ``torch.compile`` for an algorithm's update, in place.

What is compiled is the arithmetic of an update, each piece once: the policy's ``sample`` (the K-step solve with
its log-density), the critics' soft TD loss, their ``min_q`` and the algorithm's ``policy_loss``. Their backward
passes are compiled with them (AOTAutograd); the optimisers' steps stay eager Adam (``foreach`` kernels), and the
update schedule (critic every update, policy every ``policy_frequency``) stays plain Python, so no graph depends on
a counter and nothing recompiles as training goes on.

Modes, as ``torch.compile`` names them:
- ``none``: eager PyTorch (the default; what the tests and CPU runs use);
- ``default``: Inductor kernels (fused elementwise work, fewer launches);
- ``reduce-overhead``: the same, replayed as CUDA graphs on a GPU, which removes the launch cost of the small
  kernels that dominate an RL update there (LeanRL's recipe); on a CPU it behaves as ``default``.

Compilation happens on the first calls (seconds to minutes), so time an update only after a few warm-up updates.
Where ``torch.compile`` cannot run (no C++ compiler for Inductor's CPU kernels, an unsupported platform), the
algorithm stays eager and :func:`compile_algorithm` returns one line that says so.
"""

from __future__ import annotations

from typing import Literal

import torch

from softflow.algorithms import Algorithm

CompileMode = Literal["none", "default", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead")


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (one line), or None when a tiny function compiles."""
    try:
        probe = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
        probe(torch.ones(4, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain means: stay eager
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"learner.compile: torch.compile is unavailable on {device} ({reason[:160]}); running eager"
    finally:
        torch._dynamo.reset()
    return None


def compile_algorithm(algorithm: Algorithm, mode: str) -> str | None:
    """Compiles ``algorithm``'s update pieces in place (module docstring). Returns None, or one line saying why it
    stayed eager. ``mode`` is one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"learner.compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "none":
        return None
    device = getattr(algorithm, "device", torch.device("cpu"))
    reason = compile_unavailable(device)
    if reason is not None:
        return reason
    options = {"mode": mode if device.type == "cuda" else "default", "dynamic": False}
    policy, critic = algorithm.policy, algorithm.critic
    policy.sample = torch.compile(policy.sample, **options)
    critic.td_loss = torch.compile(critic.td_loss, **options)
    critic.min_q = torch.compile(critic.min_q, **options)
    algorithm.policy_loss = torch.compile(algorithm.policy_loss, **options)
    return None
