"""SAC, ISFM-SAC and FMER updates: exact resumption from a state_dict, losses moving the right way, and the fixed-energy
check: with a fixed quadratic critic Q(s, a) = -c (a - mu)^2 the policy must converge to exp(Q/alpha), i.e.
N(mu, alpha / (2c)) in closed form."""

import copy
import math

import numpy as np
import pytest
import torch

from softflow.algorithms import make_algorithm
from softflow.algorithms.fmer import FMERConfig
from softflow.algorithms.isfm import ISFMConfig
from softflow.algorithms.sac import SACConfig

OBS, ACT = 3, 2
SMALL = {
    "sac": SACConfig(hidden=[32, 32], critic={"hidden": [32, 32]}, batch_size=32, alpha=0.2),
    "isfm": ISFMConfig(flow={"hidden": [32, 32], "steps": 3}, critic={"hidden": [32, 32]}, batch_size=32,
                       num_candidates=4),
    "fmer": FMERConfig(flow={"hidden": [32, 32], "steps": 3}, critic={"hidden": [32, 32]}, batch_size=32,
                       num_candidates=4),
}


def make(name, seed, config=None, low=-1.0, high=1.0, obs_dim=OBS, act_dim=ACT):
    torch.manual_seed(seed)
    return make_algorithm(config or SMALL[name], obs_dim, np.full(act_dim, low), np.full(act_dim, high))


@pytest.mark.parametrize("name", ["sac", "isfm", "fmer"])
def test_state_dict_round_trip_gives_the_identical_next_update(name, replay_batch):
    original = make(name, 0)
    batch = replay_batch(obs_dim=OBS, act_dim=ACT)
    for _ in range(3):
        original.update(batch)
    restored = make(name, 99)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    torch.manual_seed(7)
    expected = original.update(batch)
    torch.manual_seed(7)
    got = restored.update(batch)
    assert got == expected
    for a, b in zip(original.state_dict()["policy"].values(), restored.state_dict()["policy"].values()):
        assert torch.equal(a, b)
    assert original.num_updates == restored.num_updates == 4


@pytest.mark.parametrize("name", ["sac", "isfm", "fmer"])
def test_updates_reduce_the_critic_loss_on_a_fixed_batch(name, replay_batch):
    algorithm = make(name, 1)
    batch = replay_batch(obs_dim=OBS, act_dim=ACT, seed=1)
    losses = [float(algorithm.update(batch)["losses/q_loss"]) for _ in range(250)]
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])  # the TD target draws a new a' every update: average


def fixed_energy_run(name, steps, alpha=0.2, curvature=2.0, mu=0.7):
    """One state dim, one unbounded action dim; the critic is frozen at Q = -c (a - mu)^2."""
    common = dict(alpha=alpha, autotune_alpha=False, q_lr=1e-12, batch_size=64, critic={"kind": "quadratic"},
                  policy_frequency=1)
    flow = dict(flow={"hidden": [64, 64], "steps": 4, "integrator": "midpoint"}, policy_lr=1e-3, num_candidates=64)
    config = {"sac": SACConfig(hidden=[32, 32], policy_lr=3e-3, **common), "isfm": ISFMConfig(**flow, **common),
              "fmer": FMERConfig(**flow, **common)}[name]
    algorithm = make(name, 3, config, low=-math.inf, high=math.inf, obs_dim=1, act_dim=1)
    for critics in (algorithm.critic.online, algorithm.critic.target):  # both twins, online and target
        with torch.no_grad():
            critics.matrix.copy_(torch.tensor([[0.0, 0.0], [0.0, curvature]]))
            critics.linear.copy_(torch.tensor([[0.0], [2 * curvature * mu]]))
            critics.constant.fill_(-curvature * mu**2)
    batch = {"obs": torch.zeros(64, 1), "actions": torch.zeros(64, 1), "rewards": torch.zeros(64),
             "next_obs": torch.zeros(64, 1), "terminated": torch.ones(64)}
    torch.manual_seed(4)
    for _ in range(steps):
        metrics = algorithm.update(batch)
    actions = algorithm.act(np.zeros((20000, 1), dtype=np.float32), explore=True)
    return actions, alpha / (2 * curvature), mu, metrics


@pytest.mark.parametrize("name", ["sac", "isfm", "fmer"])
def test_policy_converges_to_the_boltzmann_policy_of_a_fixed_quadratic_q(name):
    actions, variance, mu, metrics = fixed_energy_run(name, steps=300)
    assert abs(actions.mean() - mu) < 0.05
    assert abs(actions.var() / variance - 1) < 0.15
    if name != "sac":
        assert metrics["learner/weight_ess"] > 0.8


@pytest.mark.parametrize("schedule, steps_per_turn", [("burst", 3), ("delayed", 1)])
def test_policy_schedule_takes_the_stated_number_of_actor_steps(schedule, steps_per_turn, replay_batch):
    """Every policy_frequency = 3 updates: a burst of 3 actor steps, or exactly one with the delayed schedule."""
    config = SMALL["sac"].model_copy(update={"policy_frequency": 3, "policy_schedule": schedule})
    algorithm = make("sac", 2, config)
    steps = []
    algorithm.policy_optimizer.register_step_post_hook(lambda *_: steps.append(algorithm.num_updates))
    for _ in range(9):
        algorithm.update(replay_batch(obs_dim=OBS, act_dim=ACT))
    assert steps == [u for u in (0, 3, 6) for _ in range(steps_per_turn)]
