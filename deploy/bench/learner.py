"""``softflow bench learner``: the learner's update cost, measured side by side in one run and quoted as ratios.

On a MuJoCo-sized problem (17-dim observations, 6-dim actions in [-1, 1]) it times one ``update`` of each of the
five algorithms (SAC, ISFM, FMER, FLAME, SAC Flow) on a fixed replay batch, eager and compiled (``--compile``):

1. ``default``: each algorithm at its default config (its own batch size: 256, SAC Flow 512), against a bare
   CleanRL-style SAC update (``CleanRLSAC``, the reference, not part of the product, always eager) on the same
   batch: ``over_cleanrl`` = algorithm ms / CleanRL ms (``cleanrl_ms``: the CleanRL blocks timed beside it), and
   whether it ``meets`` its bound in ``ACCEPTANCE``. The eager rows also say where the time goes: the shares of an
   update spent in the critic steps, the policy steps and the sampling at the next states (``torch.profiler``
   totals of the ``softflow.*`` scopes that ``update`` opens, host time on a CPU and kernel time on a GPU; null
   where an algorithm opens none), and the part of an update which is the log-density (the sampling share times
   the part of the policy's ``sample`` at the next states that goes when ``with_log_prob`` is off).
2. ``batch_sizes``: every algorithm at ``--batch-sizes`` (default 256, 1024, 4096): ms per update and
   ``over_sac`` = algorithm ms / softflow SAC ms at the same batch size, device and compile mode.

Why ratios: absolute times on a shared machine move with its load by tens of percent, but two costs measured in
alternation move together. So every case is built and warmed up first (compiled ones longer: compilation happens
on the first calls), then each round times one block of every case in turn, each ``default`` case right after a
block of CleanRL SAC on its batch (its ratio's denominator: seconds apart, not a round apart, which on a shared
machine is the difference between the machine's drift and the update's cost), and a ratio is the median over
rounds of that round's ratio (ms: the median over rounds). A block holds a multiple of 6 updates, so a whole number of
every algorithm's policy-step bursts (``policy_frequency`` 1, 2 or 3). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from softflow.algorithms import ALGORITHMS, make_algorithm
from softflow.deploy.bench.timing import ms_per_call
from softflow.deploy.config import ConfigError
from softflow.learner.learner import learner_device

OBS_DIM, ACT_DIM = 17, 6
ALGORITHM_NAMES = ("sac", "isfm", "fmer", "flame", "sacflow")
ACCEPTANCE = {"sac": 0.8, "fmer": 30, "isfm": 40, "flame": 8, "sacflow": 3}  # max update cost over CleanRL SAC
COMPILE_MODES = ("none", "default", "reduce-overhead")
SCOPES = {"critic": "softflow.critic_step", "policy": "softflow.policy_step", "sample": "softflow.sample"}
UPDATE_SCOPE = "bench.update"
BLOCK = 6  # a multiple of every default policy_frequency
EAGER_WARMUP, COMPILED_WARMUP, QUICK_WARMUP = 6, 18, 1
SAMPLE_CALLS, SAMPLE_WARMUP = 3, 2  # the log-density timing: calls per block, warm-up calls


class CleanRLActor(nn.Module):
    """CleanRL's ``Actor``: tanh-squashed Gaussian, log-std tanh-rescaled to [-5, 2]."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs_dim, 256), nn.Linear(256, 256)
        self.fc_mean, self.fc_logstd = nn.Linear(256, len(low)), nn.Linear(256, len(low))
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def get_action(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        mean, log_std = self.fc_mean(x), torch.tanh(self.fc_logstd(x))
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (log_std + 1)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        log_prob = normal.log_prob(x_t) - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        mean = torch.tanh(mean) * self.action_scale + self.action_bias
        return y_t * self.action_scale + self.action_bias, log_prob.sum(1, keepdim=True), mean


class SoftQNetwork(nn.Module):
    """CleanRL's ``SoftQNetwork``: (obs, action) -> 256 -> 256 -> 1, ReLU."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(obs_dim + act_dim, 256), nn.Linear(256, 256), nn.Linear(256, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.cat([x, a], 1))))))


class CleanRLSAC:
    """The reference, not part of the product: one update of CleanRL's sac_continuous_action.py at its defaults
    (q lr 1e-3, policy lr 3e-4, alpha autotuned with lr 1e-3 towards -|A|, policy_frequency 2, tau 0.005 every
    update), statement for statement, on a replay batch in softflow's format. Like CleanRL it reads alpha back
    after each alpha step and reads nothing else."""

    def __init__(self, obs_dim: int, low: np.ndarray, high: np.ndarray, device: torch.device,
                 gamma: float = 0.99, tau: float = 0.005, policy_frequency: int = 2):
        self.gamma, self.tau, self.policy_frequency = gamma, tau, policy_frequency
        self.actor = CleanRLActor(obs_dim, low, high).to(device)
        self.qf1, self.qf2 = SoftQNetwork(obs_dim, len(low)).to(device), SoftQNetwork(obs_dim, len(low)).to(device)
        self.qf1_target, self.qf2_target = copy.deepcopy(self.qf1), copy.deepcopy(self.qf2)
        self.q_optimizer = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=1e-3)
        self.actor_optimizer = torch.optim.Adam(list(self.actor.parameters()), lr=3e-4)
        self.target_entropy = -float(len(low))
        self.log_alpha = torch.zeros(1, requires_grad=True, device=device)
        self.alpha = self.log_alpha.exp().item()
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=1e-3)
        self.num_updates = 0

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        obs, actions, next_obs = batch["obs"], batch["actions"], batch["next_obs"]
        with torch.no_grad():
            next_state_actions, next_state_log_pi, _ = self.actor.get_action(next_obs)
            qf1_next_target = self.qf1_target(next_obs, next_state_actions)
            qf2_next_target = self.qf2_target(next_obs, next_state_actions)
            min_qf_next_target = torch.min(qf1_next_target, qf2_next_target) - self.alpha * next_state_log_pi
            next_q_value = batch["rewards"].flatten() + (1 - batch["terminated"].flatten()) * self.gamma * (
                min_qf_next_target).view(-1)
        qf_loss = (F.mse_loss(self.qf1(obs, actions).view(-1), next_q_value)
                   + F.mse_loss(self.qf2(obs, actions).view(-1), next_q_value))
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        self.q_optimizer.step()

        if self.num_updates % self.policy_frequency == 0:
            for _ in range(self.policy_frequency):
                pi, log_pi, _ = self.actor.get_action(obs)
                actor_loss = ((self.alpha * log_pi) - torch.min(self.qf1(obs, pi), self.qf2(obs, pi))).mean()
                self.actor_optimizer.zero_grad()
                actor_loss.backward()
                self.actor_optimizer.step()
                with torch.no_grad():
                    _, log_pi, _ = self.actor.get_action(obs)
                alpha_loss = (-self.log_alpha.exp() * (log_pi + self.target_entropy)).mean()
                self.a_optimizer.zero_grad()
                alpha_loss.backward()
                self.a_optimizer.step()
                self.alpha = self.log_alpha.exp().item()

        for net, target in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
            for param, target_param in zip(net.parameters(), target.parameters()):
                target_param.data.copy_(self.tau * param.data + (1 - self.tau) * target_param.data)
        self.num_updates += 1


def median_ms(fn: Callable[[], object], repeats: int, calls: int, device: torch.device, warmup: int) -> float:
    """Median over ``repeats`` blocks of ``calls`` calls of the wall time per call in ms, after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    return statistics.median(ms_per_call(fn, calls, sync) for _ in range(repeats))


def replay_batch(batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random batch in the replay buffer's format (as the tests' ``replay_batch`` fixture)."""
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(batch_size, OBS_DIM, generator=g),
             "actions": torch.rand(batch_size, ACT_DIM, generator=g) * 2 - 1,
             "rewards": torch.randn(batch_size, generator=g),
             "next_obs": torch.randn(batch_size, OBS_DIM, generator=g),
             "terminated": (torch.rand(batch_size, generator=g) < 0.1).float()}
    return {key: value.to(device) for key, value in batch.items()}


class Case(NamedTuple):
    """One thing timed: ``name`` (an algorithm or "cleanrl") at a batch size and compile mode."""

    name: str
    batch_size: int
    compile: str


def comma_list(value: str | Iterable, convert: Callable, flag: str) -> list:
    """``"a,b"`` or an iterable as a list of converted items; a ConfigError naming ``flag`` if one is bad."""
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else list(value)
    try:
        converted = [convert(item) for item in items]
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if not converted:
        raise ConfigError(f"{flag}: give at least one value")
    return list(dict.fromkeys(converted))


def positive_int(text) -> int:
    if int(text) < 1:
        raise ValueError(f"{text} is not a positive integer")
    return int(text)


def compile_mode(text: str) -> str:
    if text not in COMPILE_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(COMPILE_MODES)}")
    return text


def scope_shares(algorithm, batch: dict[str, torch.Tensor], updates: int, device: torch.device
                 ) -> dict[str, float | None]:
    """Share of ``updates`` profiled updates spent in each ``softflow.*`` scope (None where it never opened):
    host time on the CPU, CUDA kernel time on a GPU."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(updates):
            with record_function(UPDATE_SCOPE):
                algorithm.update(batch)
        if on_cuda:
            torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and event.name in (UPDATE_SCOPE, *SCOPES.values()):
            spent = event.device_time_total if on_cuda else event.cpu_time_total
            totals[event.name] = totals.get(event.name, 0.0) + spent
    total = totals.get(UPDATE_SCOPE, 0.0)
    return {f"share_{part}": totals[scope] / total if scope in totals and total > 0 else None
            for part, scope in SCOPES.items()}


def log_density_fraction(algorithm, batch: dict[str, torch.Tensor], repeats: int, calls: int, warmup: int,
                         device: torch.device) -> float:
    """1 - t(sample without log-density) / t(sample with it) at the batch's next states, with the update's
    number of draws per state; the median over ``repeats`` alternating pairs of blocks, and 0 where noise makes the
    log-density look free or better (a cheap one, as SAC's and SAC Flow's are)."""
    next_obs, draws = batch["next_obs"], getattr(algorithm, "samples_per_next_state", 1)
    ratios = []
    with torch.no_grad():
        for round_index in range(repeats):
            ms = {}
            for with_log_prob in (True, False):
                draw = functools.partial(algorithm.policy.sample, next_obs, draws, with_log_prob=with_log_prob)
                ms[with_log_prob] = median_ms(draw, 1, calls, device, warmup if round_index == 0 else 0)
            ratios.append(ms[False] / ms[True])
    return max(0.0, 1.0 - statistics.median(ratios))


def build(case: Case, batch: dict[str, torch.Tensor], device: torch.device, warmup: int
          ) -> tuple[object, str | None]:
    """The learner of ``case`` (compiled in place when asked), warmed up; and the compile fallback warning."""
    low, high = -np.ones(ACT_DIM, dtype=np.float32), np.ones(ACT_DIM, dtype=np.float32)
    fallback = None
    if case.name == "cleanrl":
        learner = CleanRLSAC(OBS_DIM, low, high, device)
    else:
        config = ALGORITHMS[case.name].Config().model_copy(update={"batch_size": case.batch_size})
        learner = make_algorithm(config, OBS_DIM, low, high, device)
        if case.compile != "none":
            from softflow.learner.compile import compile_algorithm

            fallback = compile_algorithm(learner, case.compile)
    for _ in range(warmup):
        learner.update(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return learner, fallback


def bench_learner(updates: int = 30, repeats: int = 5, device: str = "auto",
                  batch_sizes: str | Iterable = "256,1024,4096", compile_modes: str | Iterable = "none,default",
                  quick: bool = False) -> dict:
    """Times every case in alternating rounds and returns one JSON-ready dict (module docstring). ``updates``
    timed updates per case are split into ``repeats`` blocks, each rounded to a multiple of 6; ``quick`` (for tests)
    uses 1 round of 6 updates, batch 256 only, eager only and 1 warm-up update."""
    sizes = comma_list(batch_sizes, positive_int, "--batch-sizes")
    modes = comma_list(compile_modes, compile_mode, "--compile")
    if quick:
        updates, repeats, sizes, modes = BLOCK, 1, [256], ["none"]
    if repeats < 1 or updates < 1:
        raise ConfigError("--updates and --repeats must be positive")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use auto or cpu")
    dev = learner_device({"auto": "auto", "cpu": 0, "cuda": 1}[device])
    per_block = BLOCK * max(1, round(updates / repeats / BLOCK))
    warmups = {mode: QUICK_WARMUP if quick else EAGER_WARMUP if mode == "none" else COMPILED_WARMUP for mode in modes}
    own_batch = {name: ALGORITHMS[name].Config().batch_size for name in ALGORITHM_NAMES}
    torch.manual_seed(0)

    default_cases = [Case(name, own_batch[name], mode) for mode in modes for name in ALGORITHM_NAMES]
    size_cases = [Case(name, size, mode) for mode in modes for size in sizes for name in ALGORITHM_NAMES]
    reference_cases = [Case("cleanrl", size, "none") for size in sorted(set(own_batch.values()))]
    cases = list(dict.fromkeys(reference_cases + default_cases + size_cases))
    batches = {size: replay_batch(size, dev) for size in {case.batch_size for case in cases}}
    learners, fallbacks = {}, {}
    for case in cases:
        learners[case], fallbacks[case] = build(case, batches[case.batch_size], dev, warmups[case.compile])

    def time_block(case: Case) -> float:
        update = functools.partial(learners[case].update, batches[case.batch_size])
        return median_ms(update, 1, per_block, dev, 0)

    block_ms: dict[Case, list[float]] = {case: [] for case in cases}
    paired_cleanrl_ms: dict[Case, list[float]] = {case: [] for case in default_cases}
    for _ in range(repeats):
        for case in cases:
            if case in paired_cleanrl_ms:
                paired_cleanrl_ms[case].append(time_block(Case("cleanrl", case.batch_size, "none")))
            block_ms[case].append(time_block(case))

    def ms(case: Case) -> float:
        return statistics.median(block_ms[case])

    def over(case: Case, reference: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(block_ms[case], reference))

    default_rows = []
    for case in default_cases:
        ratio = over(case, paired_cleanrl_ms[case])
        row = {"algorithm": case.name, "batch_size": case.batch_size, "compile": case.compile,
               "ms_per_update": ms(case), "cleanrl_ms": statistics.median(paired_cleanrl_ms[case]),
               "over_cleanrl": ratio, "meets": ratio <= ACCEPTANCE[case.name],
               "compile_fallback": fallbacks[case]}
        shares = dict.fromkeys(["share_critic", "share_policy", "share_sample", "share_log_density"])
        if case.compile == "none":
            learner, batch = learners[case], batches[case.batch_size]
            shares |= scope_shares(learner, batch, per_block, dev)
            if shares["share_sample"] is not None:
                calls, warmup = (1, QUICK_WARMUP) if quick else (SAMPLE_CALLS, SAMPLE_WARMUP)
                fraction = log_density_fraction(learner, batch, repeats, calls, warmup, dev)
                shares["share_log_density"] = shares["share_sample"] * fraction
        default_rows.append(row | shares)
    size_rows = [{"algorithm": case.name, "batch_size": case.batch_size, "compile": case.compile,
                  "ms_per_update": ms(case), "over_sac": over(case, block_ms[case._replace(name="sac")]),
                  "compile_fallback": fallbacks[case]} for case in size_cases]

    return {
        "benchmark": "learner",
        "device": str(dev) if dev.type == "cpu" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "params": {"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "action_bounds": [-1.0, 1.0], "repeats": repeats,
                   "updates_per_block": per_block, "warmup_updates": warmups, "quick": quick,
                   "batch_sizes": sizes, "compile": modes, "default_batch_sizes": own_batch,
                   "share_basis": "cuda kernel time" if dev.type == "cuda" else "host time",
                   "profiled_updates": per_block},
        "cleanrl_sac_ms": {str(case.batch_size): ms(case) for case in reference_cases},
        "default": default_rows,
        "batch_sizes": size_rows,
        "acceptance": ACCEPTANCE,
    }


def from_args(args) -> dict:
    """``softflow bench learner``'s flags (deploy/cli.py) to :func:`bench_learner`."""
    return bench_learner(updates=args.updates, repeats=args.repeats, device=args.device,
                         batch_sizes=args.batch_sizes, compile_modes=args.compile, quick=args.quick)
