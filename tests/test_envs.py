"""Environment package: Catch dynamics, policies, pixel wrappers and make_env (runs in seconds)."""

from __future__ import annotations

import importlib.util

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from worldflow.envs import (
    CATCH_ID,
    ActionRepeat,
    CatchEnv,
    PixelObservation,
    RecordEpisode,
    make_env,
    make_policy,
)
from worldflow.envs.catch import BALL_COLOUR, GRID, PADDLE_COLOUR
from worldflow.envs.wrappers import MissingExtraError

# check_env warns that a wrapped env is not its unwrapped self: that is the point of checking the wrappers.
wrapped_check = pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
needs_pygame = pytest.mark.skipif(importlib.util.find_spec("pygame") is None, reason="worldflow[classic]")


def pixel_box(size: int) -> spaces.Box:
    return spaces.Box(0, 255, shape=(size, size, 3), dtype=np.uint8)


def run_episode(env: gymnasium.Env, policy, seed: int) -> float:
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        done = terminated or truncated
    return total


def paddle_columns(frame: np.ndarray) -> np.ndarray:
    """Pixel columns of the bottom row that show the paddle colour."""
    return np.flatnonzero((frame[-1] == PADDLE_COLOUR).all(axis=-1))


# ------------------------------------------------------------------------------------------------ Catch


@pytest.mark.parametrize("size", [16, 64])
def test_catch_passes_env_checker(size):
    check_env(gymnasium.make(CATCH_ID, size=size, render_mode="rgb_array").unwrapped)


def test_catch_registered_with_time_limit():
    import worldflow.envs  # noqa: F401  (re-import must not re-register)

    env = gymnasium.make(CATCH_ID, size=32)
    assert env.spec.max_episode_steps == 1000
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8


@pytest.mark.parametrize("size", [16, 32, 64, 40])
def test_catch_frame_has_ball_and_paddle(size):
    env = CatchEnv(size=size, render_mode="rgb_array")
    obs, _ = env.reset(seed=1)
    assert obs.shape == (size, size, 3)
    cell = size // GRID
    assert (obs == BALL_COLOUR).all(-1).sum() == cell * cell
    assert (obs == PADDLE_COLOUR).all(-1).sum() == 3 * cell * cell
    np.testing.assert_array_equal(env.render(), obs)


def test_paddle_moves_left_and_right_until_the_wall():
    env = CatchEnv(size=64)
    cell = 64 // GRID
    # a start where the paddle has room on its right (the start column is random)
    seed = next(s for s in range(100) if paddle_columns(env.reset(seed=s)[0])[-1] < 64 - cell)
    env.reset(seed=seed)
    x0 = paddle_columns(env.render())[0]
    right, *_ = env.step(2)
    assert paddle_columns(right)[0] == x0 + cell  # one cell per step
    left, *_ = env.step(0)
    assert paddle_columns(left)[0] == x0
    stay, *_ = env.step(1)
    assert paddle_columns(stay)[0] == x0
    for _ in range(GRID):
        frame, *_ = env.step(0)
    assert paddle_columns(frame)[0] == 0  # blocked by the left wall, still fully visible


def test_catch_is_deterministic_under_seed():
    def rollout(seed):
        env = CatchEnv(size=16)
        frames = [env.reset(seed=seed)[0]]
        rng = np.random.default_rng(0)  # the same action sequence for both rollouts
        for _ in range(60):
            obs, reward, terminated, truncated, _ = env.step(int(rng.integers(3)))
            frames.append(obs)
            if terminated:
                break
        return np.stack(frames)

    np.testing.assert_array_equal(rollout(7), rollout(7))
    assert not np.array_equal(rollout(7), rollout(8))


def test_catch_rewards_and_termination():
    env = CatchEnv(size=16, num_balls=4, max_misses=2)
    env.reset(seed=3)
    rewards, steps, terminated = [], 0, False
    while not terminated:
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        rewards.append(reward)
        steps += 1
    assert sorted(set(rewards)) == [0.0, 1.0] and sum(rewards) == 4 and info["caught"] == 4
    assert steps == 4 * GRID - 1  # 15 falling steps per ball + 1 respawn step between balls
    env.reset(seed=3)
    steps, total, terminated = 0, 0.0, False
    while not terminated:  # run to the wall away from the ball: every ball is missed
        _, reward, terminated, _, info = env.step(2 if env._ball_col < GRID // 2 else 0)
        steps, total = steps + 1, total + reward
    assert (total, info["missed"], info["caught"], steps) == (-2.0, 2, 0, 2 * GRID - 1)


def test_expert_far_better_than_random():
    env = gymnasium.make(CATCH_ID, size=16)
    expert = np.mean([run_episode(env, make_policy("expert", env), seed=s) for s in range(5)])
    random_policy = make_policy("random", env, seed=0)
    random = np.mean([run_episode(env, random_policy, seed=s) for s in range(5)])
    assert expert >= 0.8 * env.unwrapped.num_balls
    assert random <= expert / 2


# --------------------------------------------------------------------------------------------- policies


def test_policies_are_seeded_and_valid():
    env = CatchEnv(size=16)
    env.reset(seed=0)

    def actions(kind, seed, epsilon=0.5):
        policy = make_policy(kind, env, epsilon=epsilon, seed=seed)
        return [int(policy(None)) for _ in range(30)]

    assert actions("random", 1) == actions("random", 1) != actions("random", 2)
    assert actions("epsilon-expert", 4) == actions("epsilon-expert", 4)
    assert set(actions("epsilon-expert", 4)) <= {0, 1, 2} and len(set(actions("random", 1))) == 3
    assert actions("epsilon-expert", 4, epsilon=0.0) == actions("expert", None) == [env.expert_action()] * 30


def test_cartpole_has_a_scripted_expert_from_its_true_state():
    """`--policy expert` / `epsilon-expert` work on CartPole-v1 (envs.policies.EXTERNAL_EXPERTS): the
    controller holds the pole for all 500 steps from every seed tried; ε = 0.3 still far beats random."""
    env = gymnasium.make("CartPole-v1")

    def mean_return(kind, seeds=range(8)):
        policy = make_policy(kind, env, epsilon=0.3, seed=0)
        total = 0.0
        for s in seeds:
            obs, _ = env.reset(seed=s)
            done = False
            while not done:
                obs, r, term, trunc, _ = env.step(policy(obs))
                total += r
                done = term or trunc
        return total / len(seeds)

    assert mean_return("expert") == 500.0
    assert mean_return("epsilon-expert") > 5 * mean_return("random")


def test_policy_errors_name_env_and_kind():
    env = gymnasium.make("Acrobot-v1")
    with pytest.raises(ValueError, match="Acrobot-v1"):
        make_policy("expert", env)
    with pytest.raises(ValueError, match="greedy"):
        make_policy("greedy", env)
    with pytest.raises(ValueError, match="epsilon"):
        make_policy("epsilon-expert", CatchEnv(), epsilon=1.5)


# --------------------------------------------------------------------------------------------- wrappers


class CountingEnv(gymnasium.Env):
    """Reward = step index (1, 2, ...); terminates after ``length`` steps; grey (H, W) image observations."""

    def __init__(self, length: int = 5) -> None:
        self.length = length
        self.observation_space = spaces.Box(0, 255, shape=(10, 20), dtype=np.uint8)
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.full((10, 20), 0, np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.full((10, 20), 10 * self.t, np.uint8), float(self.t), self.t >= self.length, False, {}


def test_action_repeat_sums_rewards_and_stops_at_termination():
    env = ActionRepeat(CountingEnv(length=5), k=2)
    env.reset()
    assert env.step(0)[1] == 1 + 2
    assert env.step(0)[1] == 3 + 4
    _, reward, terminated, _, info = env.step(0)
    assert (reward, terminated, info["repeats"]) == (5, True, 1)


def test_pixel_observation_from_grey_image():
    env = PixelObservation(CountingEnv(), size=8)
    obs, _ = env.reset()
    assert env.observation_space == pixel_box(8) and obs.shape == (8, 8, 3)
    obs, *_ = env.step(0)
    assert (obs == 10).all()  # area resize of a constant image keeps its value, grey → 3 channels


def test_pixel_observation_needs_rgb_render_for_non_images():
    with pytest.raises(ValueError, match="render_mode"):
        PixelObservation(gymnasium.make("CartPole-v1"), size=16)


def test_record_episode_keeps_current_and_last():
    env = RecordEpisode(CountingEnv(length=3))
    env.reset()
    for _ in range(3):
        env.step(1)
    ep = env.last_episode
    assert ep is env.current_episode and ep.terminated and not ep.truncated and len(ep) == 3
    arrays = ep.to_arrays()
    assert arrays["frames"].shape == (4, 10, 20) and arrays["rewards"].tolist() == [1, 2, 3]
    env.reset()
    env.step(0)
    assert len(env.current_episode) == 1 and env.last_episode is ep


# --------------------------------------------------------------------------------------------- make_env


def test_make_env_catch_native_size_with_wrappers():
    env = make_env(CATCH_ID, size=32, action_repeat=2, record=True, num_balls=2)
    assert env.observation_space == pixel_box(32)
    assert isinstance(env, RecordEpisode) and isinstance(env.env, ActionRepeat)
    assert not any(isinstance(w, PixelObservation) for w in _stack(env))  # rendered natively, no resize
    run_episode(env, make_policy("expert", env), seed=0)
    assert env.last_episode.to_arrays()["frames"].shape[1:] == (32, 32, 3)
    assert sum(env.last_episode.rewards) == 2


def _stack(env):
    while isinstance(env, gymnasium.Wrapper):
        yield env
        env = env.env


@needs_pygame
@wrapped_check
def test_make_env_cartpole_passes_env_checker():
    env = make_env("CartPole-v1", size=32)
    assert env.observation_space == pixel_box(32)
    # The render check would rebuild the base env in "human" mode (a window); our wrapper needs rgb_array.
    check_env(env, skip_render_check=True)


@wrapped_check
def test_make_env_ale():
    pytest.importorskip("ale_py")
    env = make_env("ALE/Pong-v5", size=64)
    assert env.observation_space == pixel_box(64)
    check_env(env, skip_render_check=True)


@wrapped_check
def test_make_env_minigrid():
    pytest.importorskip("minigrid")
    env = make_env("MiniGrid-Empty-5x5-v0", size=16, action_repeat=2)
    assert env.observation_space == pixel_box(16)
    check_env(env, skip_render_check=True)


def test_make_env_errors_name_the_id(monkeypatch):
    with pytest.raises(ValueError, match="NoSuchEnv-v0"):
        make_env("NoSuchEnv-v0")
    with pytest.raises(ValueError, match="CartPole-v9.*CartPole-v1"):
        make_env("CartPole-v9")
    # Simulate a missing optional extra: the error names the id and the pip extra to install.
    monkeypatch.setitem(__import__("sys").modules, "minigrid", None)
    with pytest.raises(MissingExtraError, match=r"MiniGrid-Empty-5x5-v0.*worldflow\[minigrid\]"):
        make_env("MiniGrid-Empty-5x5-v0")


def test_catch_read_objects_recovers_state():
    """The frame reader finds the ball and paddle cells the env drew, in uint8 and [0, 1] floats."""
    from worldflow.envs.catch import GRID, PADDLE_HALF, PADDLE_ROW, CatchEnv, read_objects

    env = CatchEnv(size=32)
    obs, _ = env.reset(seed=3)
    for _ in range(4):
        obs, *_ = env.step(2)
    for frames in (obs, obs.astype(np.float32) / 255.0):
        o = read_objects(frames)
        want_ball = np.zeros((GRID, GRID), bool)
        want_ball[env._ball_row, env._ball_col] = True
        np.testing.assert_array_equal(o["ball"], want_ball)
        want_pad = np.zeros(GRID, bool)
        want_pad[env._paddle - PADDLE_HALF: env._paddle + PADDLE_HALF + 1] = True
        if env._ball_row == PADDLE_ROW:  # a caught ball is drawn over the paddle
            want_pad[env._ball_col] = False
        np.testing.assert_array_equal(o["paddle"], want_pad)
    assert not read_objects(np.zeros((2, 32, 32, 3), np.uint8))["ball"].any()
    with pytest.raises(ValueError, match="divisible"):
        read_objects(np.zeros((30, 30, 3), np.uint8))


class _Counter(gymnasium.Env):
    """obs = [seed, t]; reward = 10 * t + action; terminates after ``seed`` steps."""

    observation_space = spaces.Box(-1e9, 1e9, (2,), np.float64)
    action_space = spaces.Discrete(5)

    def reset(self, *, seed=None, options=None):
        self.n, self.t = seed, 0
        return np.array([seed, 0.0]), {}

    def step(self, action):
        assert self.t < self.n, "stepped after the episode ended"
        reward = 10.0 * self.t + action
        self.t += 1
        return np.array([self.n, float(self.t)]), reward, self.t == self.n, False, {}


def test_play_episodes_aligns_frames_actions_rewards_and_caps_by_truncation():
    """The one episode loop: lockstep over envs of different lengths, each env stepped only while its
    episode runs, frames[t + 1] the result of actions[t] which earned rewards[t], the cap truncates."""
    from worldflow.envs.loop import play_episodes

    envs = [_Counter() for _ in range(3)]
    seen = []

    def act(obs):  # batched: always all rows; action = t % 5 (readable from the observation)
        seen.append(obs.shape)
        return (obs[:, 1] % 5).astype(np.int64)

    ended = []
    played = play_episodes(envs, act, seeds=[2, 5, 9], max_steps=6, record=True, on_end=ended.append)
    assert played.lengths.tolist() == [2, 5, 6] and sorted(ended) == [0, 1, 2]
    assert set(seen) == {(3, 2)} and len(seen) == 6
    for rec, n in zip(played.records, [2, 5, 6], strict=True):
        assert len(rec.frames) == n + 1 and len(rec.actions) == n
        assert [f[1] for f in rec.frames] == list(range(n + 1))
        assert rec.actions == [t % 5 for t in range(n)]
        assert rec.rewards == [10.0 * t + t % 5 for t in range(n)]
    assert played.returns.tolist() == [sum(r.rewards) for r in played.records]
    flags = [(r.terminated, r.truncated) for r in played.records]
    assert flags == [(True, False), (True, False), (False, True)]  # the 9-step episode hit the cap at 6


def test_import_worldflow_registers_the_envs_in_a_fresh_interpreter():
    """`import worldflow` is enough for gymnasium.make; gymnasium's module:id form needs no import at all."""
    import subprocess
    import sys

    code = ("import sys, gymnasium as gym, worldflow; gym.make('worldflow/Catch-v0'); "
            "assert gym.spec('worldflow/WorldModel-v0').entry_point.endswith('WorldModelEnv'); "
            "assert 'torch' not in sys.modules; "  # the main classes below are imported on first use
            "assert worldflow.Run.__name__ == 'Run' and worldflow.WorldModelEnv")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    no_import = "import gymnasium as gym; gym.make('worldflow.envs:worldflow/Catch-v0')"
    subprocess.run([sys.executable, "-c", no_import], check=True, timeout=120)


def test_crafter_adapter_passes_the_env_checker_and_reseeds():
    """worldflow/Crafter-v0 (needs the crafter extra): gymnasium's API, seeded worlds, pixel frames."""
    pytest.importorskip("crafter")
    from gymnasium.utils.env_checker import check_env
    from worldflow.envs import make_env
    from worldflow.envs.crafter import CrafterEnv

    check_env(CrafterEnv(size=32), skip_render_check=True)
    env = make_env("worldflow/Crafter-v0", size=32)
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_module_qualified_id_imports_the_users_module(tmp_path, monkeypatch):
    """`--env my_pkg:MyEnv-v0` imports my_pkg (which registers MyEnv-v0) first, as gymnasium.make does;
    a state-vector env is rendered to pixels."""
    from worldflow.envs import make_env

    from worldflow.errors import InputError

    (tmp_path / "wf_user_envs.py").write_text(
        "import gymnasium, numpy as np\n"
        "class Blink(gymnasium.Env):\n"
        "    metadata = {'render_modes': ['rgb_array']}\n"
        "    def __init__(self, render_mode=None):\n"
        "        self.render_mode = render_mode\n"
        "        self.observation_space = gymnasium.spaces.Box(-1, 1, (2,), np.float32)\n"
        "        self.action_space = gymnasium.spaces.Discrete(2)\n"
        "    def reset(self, *, seed=None, options=None):\n"
        "        super().reset(seed=seed); return np.zeros(2, np.float32), {}\n"
        "    def step(self, a):\n"
        "        return np.zeros(2, np.float32), 1.0, False, True, {}\n"
        "    def render(self):\n"
        "        return np.full((12, 20, 3), 200, np.uint8)\n"
        "if 'WfBlink-v0' not in gymnasium.registry:\n"
        "    gymnasium.register('WfBlink-v0', entry_point='wf_user_envs:Blink')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("wf_user_envs:WfBlink-v0", size=8)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (8, 8, 3) and obs.dtype == np.uint8 and int(obs[0, 0, 0]) == 200
    with pytest.raises(InputError, match="cannot import its module 'no_such_pkg_xyz'"):
        make_env("no_such_pkg_xyz:Thing-v0")


def test_catch_frame_validity_accepts_every_real_frame_and_rejects_what_a_game_cannot_show():
    from worldflow.envs import frame_checker
    from worldflow.envs.catch import BALL_COLOUR, GRID, PADDLE_ROW

    valid = frame_checker("worldflow/Catch-v0")
    assert frame_checker("CartPole-v1") is None
    env = gymnasium.make("worldflow/Catch-v0", size=64)
    frames, caught = [], 0
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        frames.append(obs)
        done = False
        while not done:
            policy = env.unwrapped.expert_action() if seed % 2 else env.action_space.sample()
            obs, reward, term, trunc, _ = env.step(policy)
            frames.append(obs)
            caught += reward > 0
            done = term or trunc
    f = np.stack(frames)
    assert caught > 0 and valid(f).all() and valid(f.astype(np.float32) / 255).all()  # caught balls too
    cell = 64 // GRID
    two_balls = f[:1].copy()
    two_balls[0, :cell, :cell] = BALL_COLOUR  # a second ball (the first frame's ball is on row 0 too)
    two_balls[0, :cell, cell:2 * cell] = BALL_COLOUR
    faint = f[:1].copy()
    faint[faint == 255] = 128  # a half-bright ball: a smear, not a sprite
    no_paddle = f[:1].copy()
    no_paddle[0, PADDLE_ROW * cell:] = 0
    blend = ((f[:-1].astype(np.float32) + f[1:]) / 2).astype(np.uint8)  # the mean of two futures
    for bad in (two_balls, faint, no_paddle, np.zeros((1, 64, 64, 3), np.uint8)):
        assert not valid(bad).any()
    assert valid(blend).mean() < 0.05  # only where consecutive frames are equal
