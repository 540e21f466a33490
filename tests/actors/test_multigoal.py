"""The 2D multi-goal task: rewards and termination in closed form, the mode-coverage metric, and its report."""

import json

import gymnasium
import numpy as np
import pytest
import torch

from softflow.actors.envs import GymEnvConfig, make_env
from softflow.actors.multigoal import ENV_ID, GOALS, MultiGoalEnv, goal_headings, soft_optimal_headings
from softflow.algorithms import make_algorithm
from softflow.algorithms.fmer import FMERConfig
from softflow.algorithms.sac import SACConfig
from softflow.deploy.run.reports import flow_paths, multigoal_report


def test_reward_is_action_and_distance_cost_and_a_goal_ends_the_episode():
    env = MultiGoalEnv()
    env.reset(seed=0)
    env.position = np.array([0.0, 0.0])
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.0]))
    assert np.allclose(obs, [0.5, 0.0]) and not terminated and not truncated and info["goal"] == -1
    assert reward == pytest.approx(-(30 * 0.25 + 4.5))
    env.position = np.array([0.0, 3.5])
    obs, reward, terminated, _, info = env.step(np.array([2.0, 0.8]))  # clipped to (1, 0.8): lands at (1, 4.3)
    distance = np.hypot(1.0, 0.7)
    assert np.allclose(obs, [1.0, 4.3]) and not terminated
    env.position = np.array([0.0, 3.5])
    obs, reward, terminated, _, info = env.step(np.array([0.0, 0.8]))
    assert terminated and info["goal"] == 1
    assert reward == pytest.approx(-(30 * 0.64 + 0.7) + 10)
    assert distance > 1


def test_starts_mix_the_origin_and_the_spread_in_the_given_proportion():
    env = MultiGoalEnv(init_std=0.1, origin_start_prob=0.25, spread_std=2.5)
    starts = np.array([env.reset(seed=seed)[0] for seed in range(4000)])
    near_origin = np.linalg.norm(starts, axis=1) < 0.5  # P(|N(0, 0.1^2 I)| < 0.5) ~ 1; P(|N(0, 2.5^2 I)| < 0.5) = 0.02
    assert near_origin.mean() == pytest.approx(0.25 + 0.75 * 0.0198, abs=0.02)
    assert starts[~near_origin].std() == pytest.approx(2.5, rel=0.05)
    assert np.linalg.norm([MultiGoalEnv().reset(seed=s)[0] for s in range(200)], axis=1).max() < 0.5  # the classic
    with pytest.raises(ValueError, match="origin_start_prob"):
        MultiGoalEnv(origin_start_prob=1.5)


def test_registered_with_a_30_step_limit():
    env = make_env(GymEnvConfig(id=ENV_ID))
    env.reset(seed=1)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
        steps, done = steps + 1, terminated or truncated
    assert steps == 30 and truncated
    assert ENV_ID in gymnasium.registry


def test_goal_headings_separate_modes_from_a_uniform_spread():
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 2 * np.pi, 20000)
    uniform = 0.5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    assert goal_headings(uniform).sum() == pytest.approx(0.5, abs=0.02)  # 4 sectors of 45 degrees
    toward_two = np.concatenate([GOALS[0] / 10 + 0.02 * rng.standard_normal((600, 2)),
                                 GOALS[3] / 10 + 0.02 * rng.standard_normal((400, 2))])
    assert np.allclose(goal_headings(toward_two), [0.6, 0.0, 0.0, 0.4])
    assert goal_headings(np.zeros((10, 2))).sum() == 0  # standing still heads nowhere


@pytest.mark.parametrize("config", [SACConfig(hidden=[16, 16], critic={"hidden": [16, 16]}),
                                    FMERConfig(flow={"hidden": [16, 16], "steps": 3}, critic={"hidden": [16, 16]})])
def test_report_writes_the_picture_and_the_coverage(config, tmp_path):
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 2, -np.ones(2), np.ones(2))
    coverage = multigoal_report(algorithm, tmp_path, num_samples=400)
    assert (tmp_path / "multigoal.png").stat().st_size > 10_000
    # untrained, the policy is about tanh of a wide Gaussian: every direction, more of them diagonal than on an axis
    assert coverage["heading_fraction"] == pytest.approx(sum(coverage["goal_fractions"]))
    assert 0.15 < coverage["heading_fraction"] < 0.5 and min(coverage["goal_fractions"]) > 0.02
    json.dumps(coverage)


def test_drawn_ode_paths_start_from_the_policys_own_base_noise():
    torch.manual_seed(0)
    config = FMERConfig(flow={"hidden": [16, 16], "steps": 3, "base_std": 0.25}, critic={"hidden": [16, 16]})
    policy = make_algorithm(config, 2, -np.ones(2), np.ones(2)).policy
    with torch.no_grad():
        paths = flow_paths(policy, torch.zeros(1, 2), 4000)
    assert paths.shape == (4, 4000, 2)
    assert np.arctanh(paths[0]).std(0) == pytest.approx([0.25, 0.25], rel=0.05)
    assert np.allclose(paths[0], paths[-1])  # an untrained flow's velocity is zero: the action is the squashed noise


def test_soft_optimal_policy_without_a_future_is_the_boltzmann_policy_of_the_reward():
    """gamma = 0: pi*(a|0) is proportional to exp(r(0, a) / alpha), computed here directly on a fine action grid."""
    alpha = 1.0
    grid = np.linspace(-1, 1, 401)
    actions = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    reward = -(30 * (actions**2).sum(1) + np.linalg.norm(actions[:, None] - GOALS, axis=2).min(1))
    p = np.exp((reward - reward.max()) / alpha)
    rng = np.random.default_rng(1)
    drawn = actions[rng.choice(len(p), 40000, p=p / p.sum())]
    expected = goal_headings(drawn)
    got = soft_optimal_headings(alpha, gamma=0.0, spacing=1.0, action_points=81, samples=40000)
    assert np.allclose(got, expected, atol=0.01), (got, expected)


def test_soft_optimal_policy_at_the_origin_heads_evenly_for_the_four_goals():
    """Soft value iteration: the four goals are equally likely (the grids are symmetric), and most of the
    soft-optimal policy at alpha 1 heads for one of them (0.80 at this resolution)."""
    headings = soft_optimal_headings(1.0, spacing=0.25, action_points=31)
    assert np.ptp(headings) < 0.02 and 0.72 < headings.sum() < 0.88, headings


def test_soft_optimal_policy_a_tenth_off_the_origin_heads_for_the_nearest_goal():
    """The soft-optimal policy is multi-modal only very near the origin: 0.1 towards +x (2 % of the way to the
    goal) already puts about 0.7 of it on +x at alpha 1 and under 0.06 on each other goal; the state a quarter
    turn round (0.1 towards -y) gives the same numbers turned with it."""
    towards_x = soft_optimal_headings(1.0, spacing=0.25, action_points=31, state=(0.1, 0.0))
    towards_minus_y = soft_optimal_headings(1.0, spacing=0.25, action_points=31, state=(0.0, -0.1))
    assert towards_x[0] > 0.6 and towards_x[1:].max() < 0.06, towards_x
    assert np.allclose(np.roll(towards_x, 3), towards_minus_y, atol=0.01), (towards_x, towards_minus_y)
