"""Episodes, collection, clip datasets: exact round trips, boundaries, splits, workers, corruption."""

import argparse
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from worldflow.data import collect as collect_mod
from worldflow.data.dataset import ClipDataset, EpisodeDataset, select_episodes
from worldflow.data.episodes import (
    CorruptEpisodeError,
    DatasetNotFoundError,
    DatasetWriter,
    EmptyDatasetError,
    holdout_episodes,
    load_episode,
    load_manifest,
)
from worldflow.data.spaces import space_from_dict, space_to_dict
from worldflow.data.video import write_video

SIZE = 40  # a width every decord build reads (decord2 3.4.0 cannot read 32-wide frames; see video.py)


class DotEnv(gym.Env):
    """Deterministic pixel env: a dot steered left/stay/right; episode k lasts 3 + seed % 5 steps.

    Every frame carries its step index and the episode seed in pixels, so frames are all distinct.
    Logs what it emitted per episode (``self.log``) for comparing with what the dataset returns.
    """

    metadata = {"render_fps": 15}

    def __init__(self, size=SIZE):
        self.size = size
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = spaces.Discrete(3)
        self.log = []

    def _obs(self):
        f = np.zeros((self.size, self.size, 3), np.uint8)
        f[0, :, 0] = self.t * 10
        f[1, :, 1] = self.seed * 7
        f[10:14, self.x : self.x + 4] = (255, 200, 50)
        return f

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.seed, self.t, self.x = seed, 0, seed % (self.size - 4)
        self.length = 3 + seed % 5
        obs = self._obs()
        self.log.append({"seed": seed, "frames": [obs], "actions": [], "rewards": []})
        return obs, {}

    def step(self, action):
        self.x = int(np.clip(self.x + int(action) - 1, 0, self.size - 4))
        self.t += 1
        reward = 0.5 * int(action) + 0.25 * self.t
        obs = self._obs()
        ep = self.log[-1]
        ep["frames"].append(obs)
        ep["actions"].append(int(action))
        ep["rewards"].append(reward)
        return obs, reward, self.t >= self.length, False, {}


@pytest.fixture
def dot_env(monkeypatch):
    env = DotEnv()
    monkeypatch.setattr(collect_mod, "_make_env", lambda env_id, size, action_repeat, **kw: env)

    def policy(kind, env_, epsilon, seed):
        rng = np.random.default_rng(seed)
        return lambda obs: int(rng.integers(3))

    monkeypatch.setattr(collect_mod, "_make_policy", policy)
    return env


@pytest.fixture
def dataset(tmp_path, dot_env):
    """Six episodes of 3..7 steps (4..8 frames), seeds 0..5."""
    root = tmp_path / "ds"
    collect_mod.collect("Dot-v0", 6, root, size=SIZE, progress=False)
    return root, dot_env.log


# ---------------------------------------------------------------------------------------------------
# Format


@pytest.mark.parametrize(
    "space",
    [
        spaces.Discrete(4, start=-1),
        spaces.Box(-1.0, 1.0, (2,), np.float32),
        spaces.Box(np.array([0.0, -np.inf]), np.array([1.0, np.inf]), dtype=np.float64),
        spaces.MultiDiscrete([3, 5]),
        spaces.MultiBinary(4),
    ],
)
def test_space_round_trip(space):
    d = json.loads(json.dumps(space_to_dict(space), allow_nan=False))  # strict JSON
    assert space_from_dict(d) == space


def test_collect_round_trip_is_exact(dataset):
    root, log = dataset
    m = load_manifest(root)
    assert [e["seed"] for e in m["episodes"]] == [0, 1, 2, 3, 4, 5]
    assert m["env_id"] == "Dot-v0" and m["frame_shape"] == [SIZE, SIZE, 3] and m["policy"] == "random"
    assert space_from_dict(m["action_space"]) == spaces.Discrete(3)
    for entry, rec in zip(m["episodes"], log):
        ep = load_episode(root, entry["index"])
        assert np.array_equal(ep.frames, np.stack(rec["frames"]))
        assert ep.actions.tolist() == rec["actions"] and ep.actions.dtype == np.int64
        assert ep.rewards.dtype == np.float32 and np.allclose(ep.rewards, rec["rewards"])
        assert ep.terminated.tolist() == [False] * (len(ep) - 1) + [True] and not ep.truncated.any()
        assert entry["length"] == len(rec["actions"]) and entry["num_frames"] == len(ep.frames)
        assert entry["return"] == pytest.approx(sum(rec["rewards"]))


def test_append_continues_seeds_and_ignores_orphans(dataset, dot_env):
    root, _ = dataset
    # A crash after writing episode 6's files but before the manifest update leaves orphans:
    write_video(root / "episodes" / "ep_000006.mp4", np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert len(load_manifest(root)["episodes"]) == 6
    m = collect_mod.collect("Dot-v0", 2, root, size=SIZE, progress=False)
    assert [e["seed"] for e in m["episodes"]][-2:] == [6, 7]
    assert load_episode(root, 6).frames.shape[0] == m["episodes"][6]["num_frames"]  # orphan replaced
    with pytest.raises(ValueError, match="env_id"):
        DatasetWriter(root, "Other-v0", spaces.Discrete(3))


def test_writer_step_by_step_box_actions(tmp_path):
    w = DatasetWriter(tmp_path / "box", "Box-v0", spaces.Box(-1, 1, (2,), np.float32))
    obs = np.zeros((8, 8, 3), np.uint8)
    ep = w.episode(obs, seed=3)
    for t in range(4):
        ep.step(np.array([t, -t], np.float32) / 4, obs + t + 1, reward=t, terminated=False, truncated=t == 3)
    entry = ep.commit()
    assert entry["truncated"] and not entry["terminated"] and entry["seed"] == 3
    clip = ClipDataset(tmp_path / "box", clip_len=5, split="all", backend="pyav")[0]
    assert clip["actions"].dtype == torch.float32 and clip["actions"].shape == (5, 2)
    assert clip["actions"][3].tolist() == [0.75, -0.75] and clip["actions"][4].tolist() == [0.0, 0.0]
    assert clip["action_mask"].tolist() == [True] * 4 + [False]
    assert clip["truncated"].tolist() == [False, False, False, True, False]
    assert clip["frames"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_empty_and_missing_directories_raise_clearly(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty"):
        ClipDataset(tmp_path / "empty", clip_len=4)
    DatasetWriter(tmp_path / "none", "X-v0", spaces.Discrete(2))._write_manifest()
    with pytest.raises(EmptyDatasetError, match="none"):
        ClipDataset(tmp_path / "none", clip_len=4)


# ---------------------------------------------------------------------------------------------------
# Clips


def test_clips_are_exact_and_never_cross_episodes(dataset):
    root, log = dataset
    m = load_manifest(root)
    ds = ClipDataset(root, clip_len=4, split="all")
    assert len(ds) == sum(e["num_frames"] - 4 + 1 for e in m["episodes"])
    for i in range(len(ds)):
        item = ds[i]
        ep, s = item["episode"], item["start"]
        rec, n = log[ep], m["episodes"][ep]["num_frames"]
        assert 0 <= s and s + 4 <= n
        assert np.array_equal(item["frames"].numpy(), np.stack(rec["frames"][s : s + 4]))
        acts = (rec["actions"] + [0])[s : s + 4]
        assert item["actions"].tolist() == acts and item["actions"].dtype == torch.long
        assert item["action_mask"].tolist() == [t < n - 1 for t in range(s, s + 4)]
        assert np.allclose(item["rewards"].numpy(), (rec["rewards"] + [0.0])[s : s + 4])
        assert item["terminated"].tolist() == [t == n - 2 for t in range(s, s + 4)]
        assert item["is_first"].tolist() == [t == 0 for t in range(s, s + 4)]
    assert ds.windows()[0] == (0, 0)


def test_short_episodes_are_skipped(dataset):
    root, _ = dataset
    ds = ClipDataset(root, clip_len=7, split="all")  # frame counts 4..8: only 7- and 8-frame episodes fit
    assert {ep for ep, _ in ds.windows()} == {3, 4} and sorted(ds.skipped_short) == [0, 1, 2, 5]
    with pytest.raises(EmptyDatasetError, match="clip of 9 frames"):
        ClipDataset(root, clip_len=9, split="all")


def test_cross_episode_clips(dataset):
    root, log = dataset
    ds = ClipDataset(root, clip_len=6, split="all", cross_episode=True, stride=2)
    stream = [f for rec in log for f in rec["frames"]]
    assert len(ds) == (len(stream) - 6) // 2 + 1
    crossed = 0
    for i in range(len(ds)):
        item = ds[i]
        assert np.array_equal(item["frames"].numpy(), np.stack(stream[2 * i : 2 * i + 6]))
        for j in item["is_first"].nonzero().flatten().tolist():
            if j == 0:
                continue
            # a new episode starts at clip position j: the final frame before it has no action, and the
            # transition into that final frame terminated
            assert not item["action_mask"][j - 1] and (j < 2 or item["terminated"][j - 2])
            crossed += 1
    assert crossed > 0


def test_holdout_split_is_disjoint_and_by_episode(dataset):
    root, _ = dataset
    m = load_manifest(root)
    train = ClipDataset(root, clip_len=4, split="train", holdout_fraction=0.3)
    held = ClipDataset(root, clip_len=4, split="heldout", holdout_fraction=0.3)
    tr, he = {e["index"] for e in train.episodes}, {e["index"] for e in held.episodes}
    assert tr.isdisjoint(he) and tr | he == set(range(6)) and len(he) >= 1
    assert {ep for ep, _ in train.windows()} <= tr and {ep for ep, _ in held.windows()} <= he
    # a tiny fraction still holds out one episode; the split is stable when episodes are appended
    assert len(select_episodes(m, "heldout", 0.01)) == 1
    full = holdout_episodes(m["episodes"], 0.5, seed=1)
    assert holdout_episodes(m["episodes"][:4], 0.5, seed=1) == {i for i in full if i < 4}


def test_sampling_and_dataloader_with_workers(dataset):
    root, _ = dataset
    ds = ClipDataset(root, clip_len=4, split="all")
    a, b = ds.sample(np.random.default_rng(3)), ds.sample(np.random.default_rng(3))
    assert a["episode"] == b["episode"] and a["start"] == b["start"]
    ds[0]  # a decoder open in the parent must not be reused by the forked workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=ds.random_sampler(16, seed=0), num_workers=2
    )
    n = 0
    for batch in loader:
        assert batch["frames"].shape == (4, 4, SIZE, SIZE, 3) and batch["frames"].dtype == torch.uint8
        for ep, s, f in zip(batch["episode"], batch["start"], batch["frames"]):
            assert torch.equal(f, ds[int(ds.windows().index((int(ep), int(s))))]["frames"])
        n += 1
    assert n == 4


def test_episode_dataset(dataset):
    root, log = dataset
    eds = EpisodeDataset(root, split="all")
    item = eds[2]
    assert item["frames"].shape == (len(log[2]["frames"]), SIZE, SIZE, 3)
    assert item["actions"].tolist() == log[2]["actions"] and item["episode"] == 2


# ---------------------------------------------------------------------------------------------------
# Corruption


def _break(root, index, how):
    path = root / "episodes" / f"ep_{index:06d}.mp4"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    else:  # a valid video with one frame fewer than the sidecar says
        frames = load_episode(root, index).frames
        write_video(path, frames[:-1])
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage", "short"])
def test_corrupt_video_raises_naming_the_file(dataset, how):
    root, _ = dataset
    path = _break(root, 4, how)
    ds = ClipDataset(root, clip_len=4, split="all")
    i = ds.windows().index((4, 0))
    with pytest.raises(CorruptEpisodeError, match=path.name):
        ds[i]
    with pytest.raises(CorruptEpisodeError, match=path.name):
        load_episode(root, 4)
    with pytest.raises(CorruptEpisodeError, match=path.name):
        ClipDataset(root, clip_len=4, split="all", validate=True)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_video_skip_warns_and_avoids_it(dataset, how):
    root, _ = dataset
    path = _break(root, 4, how)
    ds = ClipDataset(root, clip_len=4, split="all", on_corrupt="skip")
    with pytest.warns(UserWarning, match=path.name):
        items = [ds[i] for i in range(len(ds))]
    assert 4 not in {it["episode"] for it in items}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(ds[i]["episode"] != 4 for i in range(len(ds)))  # warned once only
    eager = ClipDataset(root, clip_len=4, split="all", on_corrupt="skip", validate=False)
    with pytest.warns(UserWarning, match=path.name):
        assert eager.validate() == ["episodes/ep_000004.mp4"]
    assert 4 not in {ep for ep, _ in eager.windows()}


# ---------------------------------------------------------------------------------------------------
# CLI and the real Catch env


def test_cli_flags(dataset, capsys):
    root, _ = dataset
    parser = argparse.ArgumentParser()
    collect_mod.add_parser(parser.add_subparsers())
    flags = f"--env Dot-v0 --episodes 1 --out {root} --policy random --size {SIZE} --seed 0 --epsilon 0.1"
    args = parser.parse_args(
        ["collect", *flags.split(), "--action-repeat", "1", "--max-steps", "2", "--no-progress"]
    )
    assert args.func(args) == 0 and "collected 1 episodes" in capsys.readouterr().out
    last = load_manifest(root)["episodes"][-1]
    assert last["length"] == 2 and last["truncated"] and last["seed"] == 6  # max-steps cap truncates


def test_catch_round_trip(tmp_path):
    envs = pytest.importorskip("worldflow.envs.wrappers")
    root = tmp_path / "catch"
    m = collect_mod.collect(
        "worldflow/Catch-v0",
        2,
        root,
        policy="random",
        size=32,
        seed=5,
        progress=False,
        env_kwargs={"num_balls": 1},
    )
    ds = ClipDataset(root, clip_len=8, split="all")
    for entry in m["episodes"]:
        ep = load_episode(root, entry["index"])
        env = envs.make_env("worldflow/Catch-v0", size=32, num_balls=1)  # replay the stored actions
        obs, _ = env.reset(seed=entry["seed"])
        frames, rewards = [obs], []
        for a in ep.actions:
            obs, r, *_ = env.step(int(a))
            frames.append(obs)
            rewards.append(r)
        assert np.array_equal(ep.frames, np.stack(frames)) and np.allclose(ep.rewards, rewards)
        i = ds.windows().index((entry["index"], 0))
        assert np.array_equal(ds[i]["frames"].numpy(), ep.frames[:8])
