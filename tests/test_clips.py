"""Clip sources: clips never cross episodes; deterministic under a seeded generator; streamed = in memory."""

import dataclasses

import numpy as np
import pytest
import torch

from worldflow.data.clips import ClipBank, episode_tensors
from worldflow.data.episodes import Episode


def _episode(i, n):
    frames = np.full((n + 1, 4, 4, 3), i, np.uint8)
    frames[:, 0, 0, 0] = np.arange(n + 1)  # frame index stamped in a pixel
    return Episode(frames=frames, actions=np.arange(n) % 3, rewards=np.arange(n, dtype=np.float32),
                   terminated=np.arange(n) == n - 1, truncated=np.zeros(n, bool), index=i)


def test_episode_tensors_alignment():
    t = episode_tensors(_episode(0, 5))
    assert t["frames"].shape[0] == 6 and t["actions"].shape[0] == 6
    assert t["action_mask"].tolist() == [True] * 5 + [False]
    assert t["rewards"].tolist() == [0, 1, 2, 3, 4, 0]


def test_clips_stay_inside_episodes():
    bank = ClipBank([episode_tensors(_episode(i, n)) for i, n in enumerate([3, 10, 25])], ids=[5, 6, 7])
    gen = torch.Generator().manual_seed(0)
    b = bank.sample(64, 6, gen)
    ep_value = b["frames"][:, :, 1, 1, 0]  # constant per episode
    assert (ep_value == ep_value[:, :1]).all()
    idx = b["frames"][:, :, 0, 0, 0].long()
    assert (idx == b["start"][:, None] + torch.arange(6)).all()  # consecutive frames
    assert set(b["episode"].tolist()) <= {6, 7}  # the 4-frame episode is too short
    again = bank.sample(64, 6, torch.Generator().manual_seed(0))
    assert torch.equal(again["start"], b["start"])


# ---------------------------------------------------------------------------------------------------
# Streaming from disk (DiskClips) against the in-memory bank


def test_streamed_batches_equal_in_memory_ones(tiny_data, tiny_cfg):
    """DiskClips draws the same windows from the same generator state and decodes the same tensors as a
    ClipBank of the split, with or without worker processes; load_clips picks by data.memory_mb."""
    from worldflow.data.clips import DiskClips, load_clips

    data = tiny_cfg().data
    bank = ClipBank.load(tiny_data, data, "train", progress=False)
    inline = DiskClips(tiny_data, data, "train")
    pooled = DiskClips(tiny_data, dataclasses.replace(data, num_workers=2), "train")
    try:
        assert inline.ids == bank.ids and torch.equal(inline.lengths, bank.lengths)
        for seed in range(3):
            want = bank.sample(5, 6, torch.Generator().manual_seed(seed))
            for disk in (inline, pooled):
                got = disk.sample(5, 6, torch.Generator().manual_seed(seed))
                assert got.keys() == want.keys()
                for k in want:
                    assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        fixed, fixed_disk = bank.fixed_batch(7, 6), pooled.fixed_batch(7, 6)
        assert all(torch.equal(fixed[k], fixed_disk[k]) for k in fixed)
        mapped = inline.map(lambda f: f.float().mean((1, 2, 3)), "frames", "brightness")
        ref = bank.map(lambda f: f.float().mean((1, 2, 3)), "frames", "brightness")
        assert all(torch.equal(a["brightness"], b["brightness"])
                   for a, b in zip(mapped.episodes, ref.episodes, strict=True))
    finally:
        pooled.close()
    assert isinstance(load_clips(tiny_data, data, "train", progress=False), ClipBank)
    assert isinstance(load_clips(tiny_data, dataclasses.replace(data, memory_mb=0.0), "train"), DiskClips)


def test_streamed_training_resumes_exactly_and_matches_in_memory(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """A tokenizer trained from streamed clips (workers on, killed mid-run, resumed) ends bit-equal to one
    trained from memory without a break."""
    from safetensors.torch import load_file

    from worldflow.data.clips import DiskClips
    from worldflow.train import tokenizer as train_tokenizer

    common = ["train_tokenizer.steps=8", "train_tokenizer.ckpt_every=4", "train_tokenizer.eval_every=0"]
    train_tokenizer.train(tiny_cfg(*common), tiny_data, tmp_path / "memory", progress=False)

    streamed = tiny_cfg(*common, "data.memory_mb=0", "data.num_workers=2")
    real, calls = DiskClips.sample, []

    def killed_at_step_6(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(DiskClips, "sample", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer.train(streamed, tiny_data, tmp_path / "disk", progress=False)
    monkeypatch.setattr(DiskClips, "sample", real)
    train_tokenizer.train(streamed, tiny_data, tmp_path / "disk", progress=False)  # resumes from step 4

    final = "tokenizer/checkpoints/step_00000008/model.safetensors"
    a, b = load_file(str(tmp_path / "memory" / final)), load_file(str(tmp_path / "disk" / final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
