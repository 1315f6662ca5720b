"""In-memory clip banks: clips never cross episodes; deterministic under a seeded generator."""

import numpy as np
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
