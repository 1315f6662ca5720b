"""The world model as gymnasium envs (worldflow.gym_env.env) on the tiny trained run shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from worldflow.config import TransformerConfig
from worldflow.dynamics import RolloutStream
from worldflow.errors import InputError
from worldflow.gym_env.env import ENV_ID, WorldModelEnv, WorldModelVectorEnv
from worldflow.gym_env.imagined import RowNoiseStream
from worldflow.nn import SpaceTimeTransformer
from worldflow.state import load_state


def make_env(run, **kw) -> WorldModelEnv:
    return WorldModelEnv(run, steps=kw.pop("steps", 2), **kw)


def end_often(env) -> None:
    """Make episodes end at varied times: the tiny run's continue head hovers near 0.5 and never ends one.

    The replacement is a deterministic pseudo-random function of h_{t+1} (~15% of steps end), so batched
    and single envs still agree whenever their states agree.
    """
    def continue_prob(h, task=None):
        return ((h.sum(-1) * 100).frac().abs() > 0.15).float()

    env.unwrapped.world_model.heads.continue_prob = continue_prob


# ---------------------------------------------------------------------------------------------------
# KV cache rows and the row-noise stream


def test_copy_rows_from_restarts_one_sequence():
    """Replacing row 1 of a batched cache with a row-stream aligned to the same frame index equals
    having streamed that row's sequence there all along."""
    torch.manual_seed(0)
    cfg = TransformerConfig(width=16, depth=2, heads=2, kv_heads=1, temporal_every=1)
    net = SpaceTimeTransformer(cfg).eval()
    window, s = 3, 2
    a, b = torch.randn(3, 6, s, 16), torch.randn(1, 6, s, 16)
    with torch.no_grad():
        batched = net.new_cache(3, window)
        net(a[:, :4], cache=batched)  # frames 0..3
        row = net.new_cache(1, window)
        net(b[:, :4], cache=row, t0=2)  # frames 2..5 of another sequence, ending at the same index
        with pytest.raises(ValueError, match="next_t"):
            batched.copy_rows_from([1], row)
        row = net.new_cache(1, window)
        net(b[:, 2:4], cache=row, t0=2)  # 2 frames fill the window - 1 = 2 slots, ending at frame 3
        batched.copy_rows_from([1], row)
        out = net(torch.cat([a[:1, 4:5], b[:, 4:5], a[2:, 4:5]]), cache=batched)
        ref_a = net(a[:, :5], window=window)[:, -1]  # full recompute of the untouched rows
        ref_b = net(b[:, 2:5], window=window)[:, -1]  # row 1's sequence alone (RoPE is relative)
    torch.testing.assert_close(out[[0, 2], 0], ref_a[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], ref_b[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        batched.copy_rows_from([5], row)


def test_row_noise_stream_matches_rollout_stream(tiny_run):
    """One row of RowNoiseStream is RolloutStream with that generator, bit for bit."""
    env = make_env(tiny_run)
    dyn = env.world_model.dynamics
    lat = torch.randn(1, 3, dyn.latent_tokens, dyn.latent_dim).tanh()
    acts = torch.tensor([[0, 1, 2]])
    outs = []
    for cls in (RolloutStream, RowNoiseStream):
        g = torch.Generator().manual_seed(3)
        stream = RolloutStream(dyn, 1, generator=g) if cls is RolloutStream else RowNoiseStream(dyn, [g])
        with torch.no_grad():
            agent = stream.observe(lat, acts)
            z, agent2 = stream.imagine(2, torch.tensor([[1]]))
        outs.append((agent, z, agent2, stream.t))
    for x, y in zip(*outs):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


# ---------------------------------------------------------------------------------------------------
# Single env


def test_env_checker_and_make(tiny_run):
    check_env(gymnasium.make(ENV_ID, run=tiny_run, steps=2, horizon=5).unwrapped)
    made = gymnasium.make(ENV_ID, run=tiny_run, steps=2, horizon=3)
    assert isinstance(made.unwrapped, WorldModelEnv)
    obs, info = made.reset(seed=0)
    assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8 and made.observation_space.contains(obs)
    assert {"context_episode", "context_start"} <= info.keys()
    for t in range(3):
        obs, reward, terminated, truncated, info = made.step(made.action_space.sample())
        assert isinstance(reward, float) and 0.0 <= info["continue_prob"] <= 1.0
        assert truncated == (t == 2)
    frame = made.render()
    assert np.array_equal(frame, obs)
    made.close()


def test_registered_lazily_by_worldflow_envs():
    """``import worldflow.envs`` registers the id without importing the world-model stack."""
    code = ("import sys, gymnasium, worldflow.envs; spec = gymnasium.spec('worldflow/WorldModel-v0'); "
            "assert spec.entry_point == 'worldflow.gym_env.env:WorldModelEnv', spec; "
            "assert spec.vector_entry_point == 'worldflow.gym_env.env:WorldModelVectorEnv', spec; "
            "assert 'worldflow.gym_env.env' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    spec = gymnasium.spec(ENV_ID)  # and worldflow.gym_env.env registers the same spec
    assert spec.entry_point == "worldflow.gym_env.env:WorldModelEnv"
    assert spec.vector_entry_point == "worldflow.gym_env.env:WorldModelVectorEnv"


def test_bad_actions_raise_clear_errors(tiny_run):
    env = make_env(tiny_run)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"Discrete\(3\).*out of range"):
        env.step(3)
    with pytest.raises(ValueError, match="wrong shape"):
        env.step([0, 1])
    with pytest.raises(ValueError, match="wrong type"):
        env.step(0.5)
    venv = WorldModelVectorEnv(tiny_run, num_envs=2, steps=2)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        venv.step(np.array([0, -1]))
    with pytest.raises(ValueError, match="expected 2"):
        venv.step(np.array([0, 1, 2]))


def test_seeds_give_same_and_different_frames(tiny_run):
    def frames(seed, env):
        out = [env.reset(seed=seed)[0]]
        out += [env.step(a)[0] for a in (0, 1, 2, 1)]
        return np.stack(out)

    a, b = make_env(tiny_run), make_env(tiny_run)
    f0 = frames(0, a)
    assert np.array_equal(f0, frames(0, b))
    assert np.array_equal(f0, frames(0, a))  # reseeding the same env replays it
    f1 = frames(1, a)
    assert not np.array_equal(f0[1:], f1[1:])
    # same context, different noise: the diffusion noise follows the seed, not just the context choice
    cache = next((tiny_run / "dynamics").glob("latents_train_*.safetensors"))
    lat = load_state(cache)["episodes"][0]["latents"][:3]
    first = [env.reset(seed=s, options={"context_latents": lat})[0] for env, s in ((a, 0), (b, 1))]
    assert np.array_equal(*first)  # the decoded context does not depend on the noise
    assert not np.array_equal(a.step(1)[0], b.step(1)[0])


def test_uncertainty_reports_step_disagreement_without_changing_the_episode(tiny_run):
    """uncertainty=True: info['step_disagreement'] is the latent MSE between the frame at K and the same
    noise denoised at 2K; it draws no extra noise, so frames equal those of an env without it."""
    plain, checked = make_env(tiny_run), make_env(tiny_run, uncertainty=True)
    outs = []
    for env in (plain, checked):
        env.reset(seed=3)
        outs.append([env.step(a) for a in (0, 2, 1)])
    for (f_a, r_a, *_, i_a), (f_b, r_b, *_, i_b) in zip(*outs):
        assert np.array_equal(f_a, f_b) and r_a == r_b
        assert "step_disagreement" not in i_a and i_b["step_disagreement"] >= 0
    assert any(step[-1]["step_disagreement"] > 0 for step in outs[1])
    with pytest.raises(InputError, match="finer than the model's k_max 8"):
        make_env(tiny_run, steps=8, uncertainty=True)


# One long episode, shared by the two memory tests below: a 10,000-step imagined episode (K=1) in a world
# model built for them: depth 1 everywhere (still one temporal layer, so both KV caches are exercised) and
# two training steps per phase, the agent's heads from behaviour cloning alone. The weights need not be
# good; a step then costs about half the tiny run's.
MICRO = ["tokenizer.transformer.depth=1", "dynamics.transformer.depth=1",
         "dynamics.transformer.temporal_every=1",
         *(f"train_{p}.{k}" for p in ("tokenizer", "dynamics", "bc") for k in ("steps=2", "eval_every=0"))]


@pytest.fixture(scope="module")
def micro_run(tiny_data, tiny_cfg, tmp_path_factory) -> Path:
    from worldflow.train import agent as train_agent
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    run = tmp_path_factory.mktemp("runs") / "micro"
    train_tokenizer.train(tiny_cfg(*MICRO), tiny_data, run, progress=False)
    train_dynamics.train(tiny_cfg(*MICRO), tiny_data, run, progress=False)
    train_agent.train_bc(tiny_cfg(*MICRO), tiny_data, run, progress=False)
    return run


@pytest.fixture(scope="module")
def long_episode(micro_run) -> dict:
    """Steps one imagined episode 10,000 times and records what the two memory tests check.

    The episode must not end, so the continue probability is a constant 1 — computed after the real
    continue head has run, so a step does all its usual work: the cached dynamics rollout, the streaming
    decoder, the reward and continue heads, the observation copies.
    """
    env = make_env(micro_run, steps=1)
    heads = env.unwrapped.world_model.heads
    real = heads.continue_prob
    heads.continue_prob = lambda h, task=None: torch.ones_like(real(h, task))
    env.reset(seed=0)
    stream, dec = env.stream, env.decode_cache
    rec = {"bad_steps": [], "rss": {}}

    def sizes() -> tuple[int, int, int, int]:
        return stream.cache.nbytes(), dec.nbytes(), stream.cache.length, dec.length

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            _, reward, terminated, truncated, _ = env.step(1 if i < 100 else i % 3)
            if terminated or truncated or not np.isfinite(reward):
                rec["bad_steps"].append(i)

    run(0, 100)
    rec["sizes_100"], rec["rss"][100] = sizes(), _rss()
    for start, stop in ((100, 500), (500, 1000), (1000, 1500)):
        run(start, stop)
        rec["rss"][stop] = _rss()
    run(1500, 1600)
    tracemalloc.start()  # only over the last stretch: tracing slows every allocation down
    run(1600, 2000)
    rec["traced"], _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rec["sizes_2000"], rec["rss"][2000] = sizes(), _rss()
    rec["history_2000"], rec["t_2000"], rec["dec_t_2000"] = list(stream.history), stream.t, dec.next_t
    for start in range(2000, 10_000, 500):
        run(start, start + 500)
        rec["rss"][start + 500] = _rss()
    rec["history"], rec["t"], rec["env_stream_t"] = list(stream.history), stream.t, env.stream.t
    return rec


def test_long_episode_memory_is_flat(long_episode):
    """The first 2,000 steps (K=1) of the long episode: fixed-size caches, no history, bounded Python and
    process memory."""
    rec = long_episode
    assert rec["sizes_2000"] == rec["sizes_100"]
    assert rec["history_2000"] == [] and rec["t_2000"] == rec["dec_t_2000"] == 3 + 2000
    # ~7 kB of allocator noise; keeping one small tensor per step would show as ~80 kB
    traced = rec["traced"]
    assert traced < 48 << 10, f"{traced} bytes of Python objects accumulated over 400 steps"
    if rec["rss"][100] is not None:
        assert rec["rss"][2000] - rec["rss"][100] < 16 << 20


@pytest.mark.slow
def test_10k_step_episode_rss_is_flat(long_episode):
    """One 10,000-step imagined episode (K=1): after a 500-step warm-up, process RSS grows < 50 MB, and the
    episode never ends (continue probability held at 1) nor yields a non-finite reward."""
    rec = long_episode
    assert rec["bad_steps"] == []
    rss0 = rec["rss"][500]
    if rss0 is None:
        pytest.skip("RSS is read from /proc/self/statm (Linux only)")
    peak = max(rss - rss0 for step, rss in rec["rss"].items() if step > 500)
    assert rec["t"] == rec["env_stream_t"] == 3 + 10_000 and rec["history"] == []
    print(f"RSS growth over steps 500..10,000: peak {peak / 2**20:.2f} MB")
    assert peak < 50 << 20, f"RSS grew by {peak / 2**20:.1f} MB over 9,500 steps"


def _rss() -> int | None:
    """Resident set size in bytes (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_dynamics_only_run_falls_back(tiny_run, tmp_path):
    """No agent phase: dynamics alone, reward 0, never terminated. The dataset is gone too: contexts come
    from the latents cached in the run."""
    run = tmp_path / "no_agent"
    run.mkdir()
    for name in ("tokenizer", "dynamics", "config.json"):
        (run / name).symlink_to(tiny_run / name)
    info = json.loads((tiny_run / "dataset.json").read_text())
    (run / "dataset.json").write_text(json.dumps({**info, "data": str(tmp_path / "gone")}))
    with pytest.warns(UserWarning, match="dynamics model alone"):
        env = make_env(run)
    assert env.world_model.heads is None
    env.reset(seed=0)
    for _ in range(3):
        _, reward, terminated, _, info = env.step(0)
        assert reward == 0.0 and not terminated and info["continue_prob"] == 1.0


# ---------------------------------------------------------------------------------------------------
# Vector env


def test_vector_env_matches_single_envs_across_autoreset(tiny_run):
    n, horizon = 3, 6
    venv = gymnasium.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", run=tiny_run,
                              steps=2, horizon=horizon)
    assert isinstance(venv.unwrapped, WorldModelVectorEnv)
    assert venv.single_action_space == gymnasium.spaces.Discrete(3)
    assert venv.observation_space.shape == (n, 16, 16, 3)
    singles = [make_env(tiny_run, horizon=horizon) for _ in range(n)]
    for e in [venv, *singles]:
        end_often(e)
    obs, _ = venv.reset(seed=7)
    ref = np.stack([e.reset(seed=7 + i)[0] for i, e in enumerate(singles)])
    np.testing.assert_array_equal(obs, ref)

    rng = np.random.default_rng(0)
    done, resets, ends = np.zeros(n, bool), 0, 0
    for _ in range(24):
        actions = rng.integers(0, 3, n)
        obs, rewards, terms, truncs, info = venv.step(actions)
        for i, env in enumerate(singles):
            if done[i]:  # NEXT_STEP autoreset: this step resets sub-env i and ignores its action
                o, r, te, tr = *env.reset()[:1], 0.0, False, False
                assert not info["_continue_prob"][i] and info["_context_episode"][i]
                resets += 1
            else:
                o, r, te, tr, inf = env.step(int(actions[i]))
                assert info["continue_prob"][i] == pytest.approx(inf["continue_prob"], abs=1e-5)
            # batching changes float summation order: allow one grey level on a rare rounding edge
            assert np.abs(obs[i].astype(int) - o).max() <= 1
            assert rewards[i] == pytest.approx(r, abs=1e-4)
            assert (terms[i], truncs[i]) == (te, tr)
        ends += int((terms & ~done).sum())
        done = terms | truncs
    assert resets >= 3 and ends >= 2, (resets, ends)  # autoresets happened, staggered by terminations
    assert venv.unwrapped.stream.cache.length == venv.unwrapped.stream.cache.capacity
    frames = venv.render()
    assert len(frames) == n and np.array_equal(frames[0], obs[0])
    venv.close()


def test_vector_partial_reset_and_context_option(tiny_run):
    venv = WorldModelVectorEnv(tiny_run, num_envs=2, steps=2)
    single = make_env(tiny_run)
    venv.reset(seed=3)
    single.reset(seed=4)
    for a in (0, 2):
        venv.step(np.array([1, a]))
        single.step(a)
    obs, info = venv.reset(seed=[None, 11], options={"reset_mask": np.array([False, True])})
    assert list(info["_context_episode"]) == [False, True]
    np.testing.assert_array_equal(obs[1], single.reset(seed=11)[0])
    for a in (1, 1, 0):
        obs, *_ = venv.step(np.array([0, a]))
        assert np.abs(obs[1].astype(int) - single.step(a)[0]).max() <= 1
    lat = torch.zeros(2, 3, 4, 8)
    with pytest.raises(ValueError, match="needs >= 3"):
        venv.reset(options={"context_latents": lat[:, :2]})
    per_env = {"context_latents": lat, "context_actions": [[0, 1, 2], [2, 1, 0]]}
    obs, info = venv.reset(seed=0, options=per_env)
    assert list(info["context_episode"]) == [-1, -1]
    np.testing.assert_array_equal(obs[0], obs[1])  # same latents decode alike; actions only steer dynamics
    with pytest.raises(ValueError, match="context >= 3"):
        WorldModelVectorEnv(tiny_run, num_envs=2, context=2)


def test_reinforce_trains_inside_vector_env(tiny_run):
    """Any gymnasium RL loop runs inside: REINFORCE with a linear softmax policy on flattened pixels."""
    envs = gymnasium.make_vec(ENV_ID, num_envs=4, run=tiny_run, steps=1, horizon=8)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    n_act = int(envs.single_action_space.n)
    policy = torch.nn.Linear(obs_dim, n_act)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    before = policy.weight.detach().clone()
    obs, _ = envs.reset(seed=0)
    done = np.zeros(envs.num_envs, bool)
    for _ in range(3):
        logps, rewards, ends, valid = [], [], [], []
        for _ in range(8):
            x = torch.as_tensor(obs, dtype=torch.float32).flatten(1) / 255.0
            dist = torch.distributions.Categorical(logits=policy(x))
            action = dist.sample()
            valid.append(torch.as_tensor(~done))  # autoreset steps ignore the action
            obs, reward, term, trunc, _ = envs.step(action.numpy())
            done = term | trunc
            logps.append(dist.log_prob(action))
            rewards.append(torch.as_tensor(reward, dtype=torch.float32))
            ends.append(torch.as_tensor(done, dtype=torch.float32))
        valid = torch.stack(valid).float()
        returns, running = torch.zeros_like(valid), torch.zeros(envs.num_envs)
        for t in reversed(range(8)):
            running = rewards[t] + 0.99 * running * (1.0 - ends[t])
            returns[t] = running
        adv = (returns - returns[valid.bool()].mean()) * valid
        loss = -(torch.stack(logps) * adv).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert int(valid.sum()) < valid.numel()  # horizon 8 < 24 steps: autoresets happened mid-batch
    assert not torch.equal(before, policy.weight)
    envs.close()
