"""FLAME the algorithm (flame.py): state round trips, the code's options (schedule, reward scale, -Q term, learning
rate decay, alpha delay), the shipped experiments, and (slow) policy improvement towards a fixed mixture energy and
the LQR's soft optimum. The estimators' closed-form checks are in test_flame_estimators.py.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from energies import ALPHA, WEIGHTS, FixedEnergy, exact_samples, mmd2, mode_weights
from torch import nn

from softflow.actors.lqr import soft_lqr_solution
from softflow.algorithms import make_algorithm
from softflow.algorithms.flame import FLAMEConfig
from softflow.algorithms.policy import PolicySample
from softflow.deploy.config import load_experiment
from softflow.deploy.run.reports import fit_linear_gaussian

SMALL = FLAMEConfig(hidden=[32, 32], critic={"hidden": [32, 32]}, batch_size=32, num_candidates=8, entropy_steps=4,
                    policy_frequency=1)


def test_state_dict_round_trip_gives_the_identical_next_update_and_actors_act_in_the_box(replay_batch):
    torch.manual_seed(0)
    original = make_algorithm(SMALL, 3, -np.ones(2), np.ones(2))
    assert original.config.target_entropy == -6.0  # -3 |A|
    batch = replay_batch()
    for _ in range(3):
        original.update(batch)
    restored = make_algorithm(SMALL, 3, -np.ones(2), np.ones(2))
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    torch.manual_seed(7)
    expected = original.update(batch)
    torch.manual_seed(7)
    assert restored.update(batch) == expected
    assert {"losses/policy_loss", "learner/entropy", "learner/weight_ess"} <= set(expected)
    actor = make_algorithm(SMALL, 3, -np.ones(2), np.ones(2))
    actor.load_policy_weights(original.policy_weights())
    obs = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    np.testing.assert_array_equal(actor.act(obs, explore=False), original.act(obs, explore=False))
    explored = actor.act(obs, explore=True, candidates=32)
    assert explored.shape == (64, 2) and np.abs(explored).max() <= 1


def test_exploration_noise_has_std_exploration_scale_times_alpha():
    config = SMALL.model_copy(update={"alpha": 0.5, "exploration_scale": 2.0})
    torch.manual_seed(1)
    algorithm = make_algorithm(config, 3, np.full(2, -np.inf), np.full(2, np.inf))  # u = 0: pi = N(0, I)
    actions = algorithm.act(np.zeros((40000, 3), dtype=np.float32), explore=True)
    np.testing.assert_allclose(actions.var(0), 1 + (2.0 * 0.5) ** 2, rtol=0.03)
    np.testing.assert_allclose(algorithm.act(np.zeros((5, 3), dtype=np.float32), explore=False), 0.0)


EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "cluster" / "experiments").glob("*flame*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_flame_experiment_loads(path):
    assert load_experiment(path, []).algorithm.name == "flame"


def test_flame_experiments_cover_mujoco_kitchen_the_pendulum_and_the_lqr():
    assert {"inverted-pendulum-flame.yaml", "lqr-flame.yaml", "kitchen-4task-flame.yaml"} <= {
        p.name for p in EXPERIMENTS}
    assert (EXPERIMENTS[0].parent / "mujoco" / "halfcheetah-flame.yaml").is_file()


@pytest.mark.slow
def test_policy_improvement_reaches_the_boltzmann_policy_of_a_fixed_mixture_energy():
    """docs/algorithms.md check 2 with the mixture and the bounds of test_fixed_energy.py: repeated FLAME
    improvement steps
    against the fixed Q = alpha log p_mixture, the replay actions being the policy's own samples; the one-step
    policy's MMD to exact samples must fall below 3.5 % of the initial N(0, I)'s and each mode must hold its weight
    within 0.03. K = 1024 posterior candidates: with 256 the self-normalised weights, drawn from posteriors as wide
    as (1 - r) / r = 19 at r = 0.05, leave the heaviest mode 0.03 to 0.05 short of its 0.4."""
    config = FLAMEConfig(hidden=[128, 128], alpha=ALPHA, autotune_alpha=False, batch_size=256, num_candidates=1024,
                         policy_lr=2e-3, lr_final_fraction=0.05)
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 1, np.full(2, -np.inf), np.full(2, np.inf))
    algorithm.critic = FixedEnergy()
    obs, steps = torch.zeros(256, 1), 3000
    for i in range(steps):
        algorithm.set_progress(i / steps)
        with torch.no_grad():
            sample = algorithm.policy.sample(obs, 1)
        sample.log_prob = torch.zeros(256, 1)
        loss, _, _ = algorithm.policy_loss({"obs": obs, "actions": sample.action[:, 0]}, sample)
        algorithm.policy_optimizer.zero_grad()
        loss.backward()
        algorithm.policy_optimizer.step()
    with torch.no_grad():
        samples = algorithm.policy.sample(torch.zeros(1, 1), 4000).action[0]
    generator = torch.Generator().manual_seed(1)
    reference, start = exact_samples(4000, generator), torch.randn(4000, 2, generator=generator)
    initial, final = mmd2(reference, start), mmd2(reference, samples)
    assert final < 0.035 * initial, (final, initial)
    assert torch.allclose(mode_weights(samples), WEIGHTS, atol=0.03), mode_weights(samples)


@pytest.mark.slow
def test_lqr_flame_reaches_the_soft_optimum(tmp_path):
    """The shipped lqr-flame.yaml through ``softflow train``: rel_err_K <= 0.05 and rel_err_Sigma <= 0.15."""
    experiment = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-flame.yaml"
    subprocess.run([str(Path(sys.executable).with_name("softflow")), "train", str(experiment), "--run-dir",
                    str(tmp_path), "--no-progress"], check=True, timeout=1800)
    report = json.loads((tmp_path / "lqr.json").read_text())
    assert report["rel_err_K"] <= 0.05 and report["rel_err_Sigma"] <= 0.15, report

def test_defaults_take_one_actor_step_every_two_updates_as_the_code(replay_batch):
    config = SMALL.model_copy(update={"policy_frequency": FLAMEConfig().policy_frequency})
    assert (FLAMEConfig().policy_schedule, FLAMEConfig().policy_frequency) == ("delayed", 2)
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    steps = []
    algorithm.policy_optimizer.register_step_post_hook(lambda *_: steps.append(algorithm.num_updates))
    for _ in range(6):
        algorithm.update(replay_batch())
    assert steps == [0, 2, 4]


def test_reward_scale_multiplies_the_rewards_inside_the_update(replay_batch):
    batch = replay_batch()
    metrics = []
    for scale, rewards in ((0.2, batch["rewards"]), (1.0, 0.2 * batch["rewards"])):
        torch.manual_seed(0)
        algorithm = make_algorithm(SMALL.model_copy(update={"reward_scale": scale}), 3, -np.ones(2), np.ones(2))
        metrics.append([algorithm.update({**batch, "rewards": rewards}) for _ in range(3)])
    assert metrics[0] == metrics[1]
    assert torch.equal(batch["rewards"], replay_batch()["rewards"])  # the caller's batch is left alone


def test_q_loss_weight_adds_the_codes_minus_q_of_a_one_step_action(replay_batch):
    """The actor loss with q_loss_weight w is (5) - w min Q_target(s, a_theta), a_theta the one-step action of the
    noise drawn after (5)'s, and its gradient reaches the policy through a_theta."""
    torch.manual_seed(0)
    algorithm = make_algorithm(SMALL.model_copy(update={"q_loss_weight": 0.5}), 3, -np.ones(2), np.ones(2))
    nn.init.normal_(algorithm.policy.network.field.net[-1].weight, std=0.3)
    batch, sample = replay_batch(), algorithm.policy.sample(replay_batch()["next_obs"], 1, with_log_prob=True)
    torch.manual_seed(1)
    with_q, _, _ = algorithm.policy_loss(batch, sample)
    torch.manual_seed(1)
    algorithm.config = algorithm.config.model_copy(update={"q_loss_weight": 0.0})
    plain, _, _ = algorithm.policy_loss(batch, sample)
    action = algorithm.policy.sample(batch["obs"], noise=torch.randn(32, 2)).action
    q = algorithm.critic.min_target_q(batch["obs"], action).mean()
    torch.testing.assert_close(with_q - plain, -0.5 * q)
    grads = torch.autograd.grad(with_q - plain, algorithm.policy.network.field.net[0].weight)
    assert grads[0].abs().max() > 0


def test_code_lr_schedule_decays_the_policy_rate_by_update_count_and_keeps_the_critics(replay_batch):
    config = SMALL.model_copy(update={"lr_schedule": "code", "lr_decay_begin": 2, "lr_decay_updates": 4,
                                      "lr_final_fraction": 0.1, "policy_lr": 1e-3, "q_lr": 2e-3})
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    rates = []
    for _ in range(8):
        algorithm.set_progress(0.9)  # the run's progress does not move the code's schedule
        algorithm.update(replay_batch())
        rates.append((algorithm.policy_optimizer.param_groups[0]["lr"], algorithm.q_optimizer.param_groups[0]["lr"]))
    np.testing.assert_allclose([p for p, _ in rates], [1e-3, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4, 1e-4])
    assert {q for _, q in rates} == {2e-3}


def test_alpha_steps_only_every_alpha_update_every_updates(replay_batch):
    config = SMALL.model_copy(update={"autotune_alpha": True, "alpha_update_every": 3})
    torch.manual_seed(0)
    algorithm = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    alphas = [algorithm.alpha]
    for _ in range(7):
        algorithm.update(replay_batch())
        alphas.append(algorithm.alpha)
    moved = [i for i in range(7) if alphas[i + 1] != alphas[i]]
    assert moved == [0, 3, 6]
    restored = make_algorithm(config, 3, -np.ones(2), np.ones(2))
    restored.load_state_dict(copy.deepcopy(algorithm.state_dict()))
    assert restored.alpha == algorithm.alpha


@pytest.mark.slow
def test_policy_alone_reaches_the_soft_optimal_covariance_of_a_frozen_2d_lqr_critic():
    """Issue 27's controlled check: the critic frozen at the exact soft Q of the 3x2 LQR system of
    tests/deploy/test_lqr_acceptance.py, Q(s, a) = -(a + K* s)' H_uu (a + K* s) (the quadratic critic's matrices),
    states from N(0, I), replay actions 30 % from N(0, I) (an old policy's) and 70 % the policy's own. 2000
    improvement steps with lqr-flame.yaml's algorithm settings bring K and Sigma within 0.05 and 0.10 of the optimum
    (measured 0.01 and 0.04); the likelihood proposal (the paper's) leaves Sigma 30 % wide even with K = 1024."""
    A = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 0.8]])
    B = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    optimum = soft_lqr_solution(A, B, np.diag([1.0, 0.1, 0.1]), np.diag([0.1, 0.1]), 0.9, 0.05)
    flame = load_experiment(Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "lqr-flame.yaml", [])
    torch.manual_seed(0)
    algorithm = make_algorithm(flame.algorithm, 3, np.full(2, -np.inf), np.full(2, np.inf))
    gain, hessian = torch.tensor(optimum.K, dtype=torch.float32), torch.tensor(optimum.H_uu, dtype=torch.float32)
    lift = torch.cat([gain, torch.eye(2)], dim=1)  # a + K s = lift [s; a]
    with torch.no_grad():
        algorithm.critic.online.matrix.copy_(lift.T @ hessian @ lift)
        algorithm.critic.online.linear.zero_()
        algorithm.critic.online.constant.zero_()
    steps = 2000
    for i in range(steps):
        algorithm.set_progress(i / steps)
        obs = torch.randn(256, 3)
        with torch.no_grad():
            actions = algorithm.policy.sample(obs).action
        actions = torch.where(torch.rand(256, 1) < 0.3, torch.randn(256, 2), actions)
        loss, _, _ = algorithm.policy_loss({"obs": obs, "actions": actions}, PolicySample(actions, actions,
                                                                                           torch.zeros(256)))
        algorithm.policy_optimizer.zero_grad()
        loss.backward()
        algorithm.policy_optimizer.step()
    states = np.random.default_rng(0).standard_normal((2048, 3)).astype(np.float32)
    with torch.no_grad():
        samples = algorithm.policy.sample(torch.as_tensor(states), 32).action.double().numpy()
    K, _, Sigma = fit_linear_gaussian(states, samples)
    rel_K = np.linalg.norm(K - optimum.K) / np.linalg.norm(optimum.K)
    rel_Sigma = np.linalg.norm(Sigma - optimum.Sigma) / np.linalg.norm(optimum.Sigma)
    assert rel_K < 0.05 and rel_Sigma < 0.10, (rel_K, rel_Sigma, Sigma.tolist())
