"""Tests for the environment factory: FrankaKitchen and MuJoCo envs with real physics, the task-completion info
wrapper, bad env kwargs, and the kitchen metrics of evaluate()."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

from softflow.actors.envs import GymEnvConfig, TaskCompletionInfo, completed_tasks, make_env
from softflow.actors.evaluate import evaluate, evaluate_algorithm
from softflow.actors.rollout import RolloutWorker, flatten_obs

MICROWAVE_GOAL = -0.75  # gymnasium_robotics' OBS_ELEMENT_GOALS["microwave"]; a task counts within 0.3 of its goal
KITCHEN_ROBOT_AND_OBJECTS = 59  # 9 + 9 robot joint positions and velocities, 21 + 20 object qpos and qvel


def kitchen(**kwargs: Any) -> gymnasium.Env:
    return make_env(GymEnvConfig(id="FrankaKitchen-v1", kwargs={"tasks_to_complete": ["microwave"], **kwargs}))


def zero_policy(act_dim: int):
    return lambda obs, explore: np.zeros((obs.shape[0], act_dim), dtype=np.float32)


def test_kitchen_random_actions_complete_no_task() -> None:
    env = kitchen()
    assert isinstance(env, TaskCompletionInfo)
    obs, info = env.reset(seed=0)
    assert (info["tasks_completed"], info["success"]) == (0, False)

    flat = flatten_obs(env.observation_space, obs)
    # Dict keys flatten in sorted order: achieved_goal (1), desired_goal (1), observation (59).
    assert flat.dtype == np.float32 and flat.shape == (1 + 1 + KITCHEN_ROBOT_AND_OBJECTS,)
    assert flat[1] == pytest.approx(MICROWAVE_GOAL)

    env.action_space.seed(0)
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert info["tasks_completed"] == 0 and info["success"] is False
        assert reward == 0.0 and not terminated and not truncated
        assert abs(obs["achieved_goal"]["microwave"][0] - MICROWAVE_GOAL) > 0.3


def test_completed_tasks_counts_distinct_goal_tasks() -> None:
    goal = {"microwave", "kettle"}
    steps = [[], ["microwave"], ["microwave"], ["light switch"], ["kettle", "microwave"]]
    completed, counts = frozenset(), []
    for step_completions in steps:
        completed = completed_tasks(completed, step_completions, goal)
        counts.append(len(completed))
    assert counts == [0, 1, 1, 1, 2]
    assert completed == goal


class ScriptedKitchen(gymnasium.Env):
    """Reports scripted task completions the way KitchenEnv does, including its one reused
    ``episode_task_completions`` list that reset clears. Episode ``seed`` completes ``script[seed]``, one task a
    step."""

    def __init__(self, script: dict[int, list[str]]) -> None:
        self.goal = {"microwave": np.zeros(1), "kettle": np.zeros(7)}
        self.script = script
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.episode_task_completions: list[str] = []
        self.plan: list[str] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.episode_task_completions.clear()
        self.plan = list(self.script[seed or 0])
        return np.zeros(2, dtype=np.float32), {"episode_task_completions": self.episode_task_completions}

    def step(self, action: np.ndarray):
        done_now = [self.plan.pop(0)] if self.plan else []
        self.episode_task_completions.extend(done_now)
        info = {"step_task_completions": done_now, "episode_task_completions": self.episode_task_completions}
        return np.zeros(2, dtype=np.float32), float(len(done_now)), False, not self.plan, info


def test_wrapper_counts_per_step_and_keeps_final_info_after_reset() -> None:
    env = TaskCompletionInfo(ScriptedKitchen({0: ["kettle", "slide cabinet", "microwave"]}))
    env.reset(seed=0)
    infos = [env.step(np.zeros(1))[4] for _ in range(3)]
    assert [info["tasks_completed"] for info in infos] == [1, 1, 2]
    assert [info["success"] for info in infos] == [False, False, True]

    env.reset(seed=0)
    assert infos[-1]["episode_task_completions"] == ["kettle", "slide cabinet", "microwave"]


def test_rollout_keeps_the_final_kitchen_info_of_each_episode() -> None:
    worker = RolloutWorker(lambda i: kitchen(max_episode_steps=5), num_envs=1, act_fn=zero_policy(9), seed=0)
    fragment = worker.run(12)
    assert fragment.episode_lengths == [5, 5]
    assert [(info["tasks_completed"], info["success"]) for info in fragment.episode_infos] == [(0, False)] * 2
    worker.close()


@pytest.mark.parametrize("env_id", ["FrankaKitchen-v1", "HalfCheetah-v5"])
def test_unknown_kwarg_is_a_one_line_value_error(env_id: str) -> None:
    with pytest.raises(ValueError) as error:
        make_env(GymEnvConfig(id=env_id, kwargs={"tasks_to_complet": ["microwave"]}))
    assert str(error.value) == f"env.kwargs: {env_id} has no argument 'tasks_to_complet'"


def test_half_cheetah_reward_is_forward_velocity_minus_control_cost() -> None:
    env = make_env(GymEnvConfig(id="HalfCheetah-v5"))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (17,) and env.action_space.shape == (6,)
    action = np.full(6, 0.5, dtype=np.float32)
    _, reward, terminated, _, info = env.step(action)
    assert info["reward_ctrl"] == pytest.approx(-0.1 * 6 * 0.25)
    assert reward == pytest.approx(info["x_velocity"] + info["reward_ctrl"])
    assert not terminated


def test_inverted_pendulum_stays_up_for_a_few_idle_steps() -> None:
    env = make_env(GymEnvConfig(id="InvertedPendulum-v5"))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,) and env.action_space.shape == (1,)
    for _ in range(5):
        obs, reward, terminated, _, _ = env.step(np.zeros(1, dtype=np.float32))
        assert reward == 1.0 and not terminated
    assert abs(obs[1]) < 0.2  # the pole angle; the episode ends beyond 0.2 rad


def test_evaluate_reports_kitchen_task_metrics() -> None:
    env = kitchen(max_episode_steps=10)
    metrics = evaluate(env, zero_policy(9), episodes=1, seed=0)
    assert metrics == {"eval/episode_return": 0.0, "eval/episode_length": 10.0,
                       "eval/tasks_completed": 0.0, "eval/task_fraction": 0.0, "eval/success_rate": 0.0}


class OpenMicrowaveOnReset(gymnasium.Wrapper):
    """Real kitchen physics with the microwave door already at its goal angle after each reset (qpos 22 is its
    hinge), so that the env's own task detection fires on the first step."""

    def reset(self, **kwargs: Any):
        import mujoco

        result = self.env.reset(**kwargs)
        kitchen_env = self.env.unwrapped
        kitchen_env.data.qpos[22] = MICROWAVE_GOAL
        mujoco.mj_forward(kitchen_env.model, kitchen_env.data)
        return result


@pytest.mark.parametrize(("tasks", "completed", "success"), [
    (["microwave"], 1.0, 1.0), (["microwave", "kettle", "light switch", "slide cabinet"], 1.0, 0.0)])
def test_evaluate_counts_a_task_the_physics_completes(tasks, completed, success) -> None:
    """The microwave is one task of ``tasks``: the fraction completed is 1 / len(tasks)."""
    env = make_env(GymEnvConfig(id="FrankaKitchen-v1", kwargs={"tasks_to_complete": tasks, "max_episode_steps": 5}))
    env = TaskCompletionInfo(OpenMicrowaveOnReset(env.env))
    metrics = evaluate(env, zero_policy(9), episodes=2, seed=0)
    assert metrics["eval/tasks_completed"] == completed and metrics["eval/success_rate"] == success
    assert metrics["eval/task_fraction"] == pytest.approx(completed / len(tasks))
    assert metrics["eval/episode_return"] == 1.0  # the sparse reward: one per task completed
    assert metrics["eval/episode_length"] == (1.0 if success else 5.0)  # all tasks done ends the episode


def test_evaluate_averages_tasks_and_successes_over_episodes() -> None:
    env = TaskCompletionInfo(ScriptedKitchen({0: ["microwave"], 1: ["kettle", "microwave"]}))
    metrics = evaluate(env, zero_policy(1), episodes=2, seed=0)
    assert metrics["eval/tasks_completed"] == pytest.approx(1.5)
    assert metrics["eval/task_fraction"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # two goal tasks
    assert metrics["eval/success_rate"] == pytest.approx(0.5)
    assert metrics["eval/episode_length"] == pytest.approx(1.5)


def test_evaluate_without_task_info_keeps_the_plain_metrics() -> None:
    env = make_env(GymEnvConfig(id="InvertedPendulum-v5", kwargs={"max_episode_steps": 5}))
    metrics = evaluate(env, zero_policy(1), episodes=2, seed=0)
    assert metrics == {"eval/episode_return": 5.0, "eval/episode_length": 5.0}


class ActionIsReward(gymnasium.Env):
    """One-step episodes whose reward is the action: the return tells which acting rule ran."""

    observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: np.ndarray):
        return np.zeros(1, dtype=np.float32), float(action[0]), True, False, {}


class CandidateRule:
    """An Algorithm's act(): the single deterministic sample is 0.25, best of N > 1 is 0.75."""

    def act(self, obs: np.ndarray, explore: bool, candidates: int = 1) -> np.ndarray:
        assert not explore
        return np.full((obs.shape[0], 1), 0.25 if candidates == 1 else 0.75, dtype=np.float32)


@pytest.mark.parametrize(("candidates", "single"), [(1, 0.25), (32, 0.25)])
def test_evaluate_algorithm_reports_the_acting_rule_and_the_single_sample(candidates, single) -> None:
    metrics = evaluate_algorithm(ActionIsReward(), CandidateRule(), candidates, episodes=3, seed=0)
    assert metrics["eval/episode_return"] == (0.25 if candidates == 1 else 0.75)
    assert metrics["eval/episode_return_single"] == single
