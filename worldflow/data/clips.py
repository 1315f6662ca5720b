"""In-memory clip banks for training: whole episodes decoded once, clips sliced with a torch.Generator.

Small datasets (the CPU presets) fit in memory many times over; decoding each episode once and slicing
clips from memory removes video decoding from the training loop, and drawing every random choice from
the trainer's ``torch.Generator`` makes resume exact. Large datasets use ``worldflow.data.dataset.ClipDataset``
with DataLoader workers instead.

An episode is a dict of per-step tensors with a common length L (number of frames):
``frames`` uint8 (L, H, W, 3) or ``latents`` float (L, N, D); ``actions`` (L, ...) where row t is the
action taken at frame t (the last row is a fill value); ``action_mask`` bool (L,) False where there is no
action; ``rewards`` float (L,) (reward received for the action at frame t); ``terminated`` bool (L,).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from worldflow import rng
from worldflow.config import DataConfig


def episode_tensors(ep) -> dict[str, torch.Tensor]:
    """Per-frame tensors of one loaded ``worldflow.data.episodes.Episode``, aligned to its L = T + 1 frames."""
    frames = torch.as_tensor(np.asarray(ep.frames))
    n = frames.shape[0]
    acts = torch.as_tensor(np.asarray(ep.actions))
    steps = acts.shape[0]
    if steps not in (n - 1, n):
        raise ValueError(f"episode has {n} frames but {steps} actions")
    fill = torch.zeros((n - steps, *acts.shape[1:]), dtype=acts.dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:steps] = True

    def per_frame(x, dtype):
        x = torch.as_tensor(np.asarray(x)).to(dtype)
        return torch.cat([x, torch.zeros(n - x.shape[0], dtype=dtype)]) if x.shape[0] < n else x

    return {"frames": frames, "actions": torch.cat([acts, fill]), "action_mask": mask,
            "rewards": per_frame(ep.rewards, torch.float32),
            "terminated": per_frame(ep.terminated, torch.bool)}


class ClipBank:
    """Episodes in memory; ``sample`` draws fixed-length clips that never cross episode boundaries."""

    def __init__(self, episodes: Sequence[dict[str, torch.Tensor]], ids: Sequence[int] | None = None):
        if not episodes:
            raise ValueError("ClipBank needs at least one episode")
        self.episodes = list(episodes)
        self.ids = list(ids) if ids is not None else list(range(len(self.episodes)))
        self.lengths = torch.tensor([len(next(iter(e.values()))) for e in self.episodes])

    @classmethod
    def load(cls, root: str | Path, data: DataConfig, split: str = "train", progress: bool = True
             ) -> ClipBank:
        """Decode every episode of a split of a dataset directory into memory."""
        from worldflow.data.dataset import select_episodes
        from worldflow.data.episodes import CorruptEpisodeError, load_episode, load_manifest

        manifest = load_manifest(root)
        entries = select_episodes(manifest, split, data.holdout_fraction)
        eps, ids = [], []
        for e in tqdm(entries, desc=f"loading {split} episodes", disable=not progress, leave=False):
            try:
                eps.append(episode_tensors(load_episode(root, e["index"], manifest=manifest)))
                ids.append(e["index"])
            except CorruptEpisodeError as err:
                if data.on_corrupt != "skip":
                    raise
                warnings.warn(f"skipping corrupt episode: {err}", stacklevel=2)
        if not eps:
            raise ValueError(f"dataset {root} has no usable {split} episodes")
        return cls(eps, ids)

    def _starts(self, clip_len: int) -> torch.Tensor:
        return (self.lengths - clip_len + 1).clamp(min=0)

    def sample(self, batch: int, clip_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` clips of ``clip_len`` frames; episodes weighted by their number of windows.

        Returns each key stacked to (B, clip_len, ...), plus ``episode`` and ``start`` (B,) long.
        """
        n_win = self._starts(clip_len)
        if int(n_win.sum()) == 0:
            raise ValueError(f"no episode has {clip_len} frames (longest: {int(self.lengths.max())})")
        flat = rng.randint(int(n_win.sum()), (batch,), gen, n_win.device)
        cum = torch.cumsum(n_win, 0)
        ep = torch.searchsorted(cum, flat, right=True)
        start = flat - (cum[ep] - n_win[ep])
        return self._gather(ep.tolist(), start.tolist(), clip_len)

    def fixed_clips(self, n: int, clip_len: int, key: str = "frames") -> torch.Tensor:
        """Deterministic evaluation clips: up to ``n`` windows spread evenly over the episodes."""
        return self.fixed_batch(n, clip_len)[key]

    def fixed_batch(self, n: int, clip_len: int) -> dict[str, torch.Tensor]:
        """``n`` deterministic windows: episodes taken in turn, each window at a fixed pseudo-random start.

        Starts are spread by a fixed hash rather than all at frame 0: in a game with a fixed cycle (Catch
        drops a ball every 8 frames) episode-start windows would put the same phase of the cycle (a random
        respawn) at every horizon, and the evaluation would score only the unpredictable part.
        """
        eligible = [i for i, L in enumerate(self.lengths.tolist()) if L >= clip_len]
        if not eligible:
            raise ValueError(f"no episode has {clip_len} frames (longest: {int(self.lengths.max())})")
        picks = [eligible[k % len(eligible)] for k in range(n)]
        starts = [((k + 1) * 7919) % (int(self.lengths[e]) - clip_len + 1) for k, e in enumerate(picks)]
        return self._gather(picks, starts, clip_len)

    def _gather(self, eps: list[int], starts: list[int], clip_len: int) -> dict[str, torch.Tensor]:
        keys = self.episodes[0].keys()
        out = {k: torch.stack([self.episodes[e][k][s : s + clip_len] for e, s in zip(eps, starts)])
               for k in keys}
        out["episode"] = torch.tensor([self.ids[e] for e in eps])
        out["start"] = torch.tensor(starts)
        return out

    def map(self, fn, key: str, new_key: str, progress: bool = False) -> ClipBank:
        """A new bank where ``new_key`` = fn(episode[key]) for every episode (e.g. frames -> latents)."""
        eps = []
        for e in tqdm(self.episodes, desc=f"{key} -> {new_key}", disable=not progress, leave=False):
            d = {k: v for k, v in e.items() if k != key}
            d[new_key] = fn(e[key])
            eps.append(d)
        return ClipBank(eps, self.ids)
