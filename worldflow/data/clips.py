"""Training clips drawn with a torch.Generator: from memory (ClipBank) or streamed from disk (DiskClips).

Small datasets (the CPU presets) fit in memory many times over; decoding each episode once and slicing
clips from memory removes video decoding from the training loop. A split whose decoded frames exceed
``data.memory_mb`` is streamed instead: :class:`DiskClips` decodes each batch's clips from the videos,
in ``data.num_workers`` worker processes. Both draw the same windows from the same generator state, so a
seed gives the same batches either way, and every random choice comes from the trainer's generator, so
resume is exact in both. :func:`load_clips` picks one.

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
from worldflow.errors import DataMismatchError


def _too_short(clip_len: int, lengths: torch.Tensor) -> DataMismatchError:
    return DataMismatchError(
        f"no episode has {clip_len} frames (longest: {int(lengths.max())}): lower the clip length that asks "
        f"for them (data.clip_len, tokenizer.clip_len or dynamics.long_len; for evaluation the context plus "
        f"horizon) or collect longer episodes")


def random_windows(lengths: torch.Tensor, batch: int, clip_len: int, gen: torch.Generator
                   ) -> tuple[list[int], list[int]]:
    """``batch`` random (episode position, start) windows of ``clip_len`` frames inside episodes of
    ``lengths`` (E,) frames; every window equally likely (so episodes weigh by their window count)."""
    n_win = (lengths - clip_len + 1).clamp(min=0)
    if int(n_win.sum()) == 0:
        raise _too_short(clip_len, lengths)
    flat = rng.randint(int(n_win.sum()), (batch,), gen, n_win.device)
    cum = torch.cumsum(n_win, 0)
    ep = torch.searchsorted(cum, flat, right=True)
    start = flat - (cum[ep] - n_win[ep])
    return ep.tolist(), start.tolist()


def fixed_windows(lengths: torch.Tensor, n: int, clip_len: int) -> tuple[list[int], list[int]]:
    """``n`` deterministic windows: episodes taken in turn, each window at a fixed pseudo-random start.

    Starts are spread by a fixed hash rather than all at frame 0: in a game with a fixed cycle (Catch
    drops a ball every 8 frames) episode-start windows would put the same phase of the cycle (a random
    respawn) at every horizon, and the evaluation would score only the unpredictable part.
    """
    eligible = [i for i, L in enumerate(lengths.tolist()) if L >= clip_len]
    if not eligible:
        raise _too_short(clip_len, lengths)
    picks = [eligible[k % len(eligible)] for k in range(n)]
    starts = [((k + 1) * 7919) % (int(lengths[e]) - clip_len + 1) for k, e in enumerate(picks)]
    return picks, starts


def episode_tensors(ep) -> dict[str, torch.Tensor]:
    """Per-frame tensors of one loaded ``worldflow.data.episodes.Episode``, aligned to its L = T + 1 frames.

    An action-free episode (``ep.actions`` None) gets zero actions (L,) long and rewards, mask False."""
    frames = torch.as_tensor(np.asarray(ep.frames))
    n = frames.shape[0]
    labelled = ep.actions is not None
    acts = torch.as_tensor(np.asarray(ep.actions)) if labelled else torch.zeros(n - 1, dtype=torch.long)
    steps = acts.shape[0]
    if steps not in (n - 1, n):
        raise ValueError(f"episode has {n} frames but {steps} actions")
    fill = torch.zeros((n - steps, *acts.shape[1:]), dtype=acts.dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:steps] = labelled

    def per_frame(x, dtype):
        x = torch.as_tensor(np.asarray(x)).to(dtype)
        return torch.cat([x, torch.zeros(n - x.shape[0], dtype=dtype)]) if x.shape[0] < n else x

    return {"frames": frames, "actions": torch.cat([acts, fill]), "action_mask": mask,
            "rewards": per_frame(ep.rewards if labelled else np.zeros(n, np.float32), torch.float32),
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

    def sample(self, batch: int, clip_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` clips of ``clip_len`` frames; episodes weighted by their number of windows.

        Returns each key stacked to (B, clip_len, ...), plus ``episode`` and ``start`` (B,) long.
        """
        return self._gather(*random_windows(self.lengths, batch, clip_len, gen), clip_len)

    def fixed_clips(self, n: int, clip_len: int, key: str = "frames") -> torch.Tensor:
        """Deterministic evaluation clips: up to ``n`` windows spread evenly over the episodes."""
        return self.fixed_batch(n, clip_len)[key]

    def fixed_batch(self, n: int, clip_len: int) -> dict[str, torch.Tensor]:
        """``n`` deterministic windows (:func:`fixed_windows`)."""
        return self._gather(*fixed_windows(self.lengths, n, clip_len), clip_len)

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


# ---------------------------------------------------------------------------------------------------
# Streaming from disk

CLIP_KEYS = ("frames", "actions", "action_mask", "rewards", "terminated")  # what a ClipBank episode holds


def split_megabytes(root: str | Path, data: DataConfig, split: str) -> float:
    """Decoded size of a split's frames in MiB (uint8 RGB), from the manifest alone."""
    from worldflow.data.dataset import select_episodes
    from worldflow.data.episodes import load_manifest

    manifest = load_manifest(root)
    h, w, c = manifest["frame_shape"]
    frames = sum(int(e["num_frames"]) for e in select_episodes(manifest, split, data.holdout_fraction))
    return frames * h * w * c / 2**20


def load_clips(root: str | Path, data: DataConfig, split: str = "train", progress: bool = True
               ) -> ClipBank | DiskClips:
    """The split as a :class:`ClipBank` when its decoded frames fit ``data.memory_mb``, else streamed."""
    if split_megabytes(root, data, split) <= data.memory_mb:
        return ClipBank.load(root, data, split, progress)
    return DiskClips(root, data, split)


class DiskClips:
    """A split's clips decoded from disk per batch; the same ``sample`` / ``fixed_batch`` as ClipBank.

    Episode lengths come from the manifest and windows are drawn by :func:`random_windows` exactly as a
    ClipBank of the same split draws them, so the same generator state gives the same batch. With
    ``data.num_workers > 0`` a pool of that many processes decodes a batch's clips in parallel (each with
    its own decoders); the batch is assembled in draw order, so results do not depend on the worker
    count. With ``data.on_corrupt == "skip"`` every episode is checked once up front and broken ones are
    left out, as ClipBank.load leaves them out.
    """

    def __init__(self, root: str | Path, data: DataConfig, split: str = "train"):
        from worldflow.data.dataset import ClipDataset

        self.dataset = ClipDataset(root, clip_len=1, split=split, holdout_fraction=data.holdout_fraction,
                                   on_corrupt=data.on_corrupt, validate=data.on_corrupt == "skip")
        self.positions = [p for p in range(len(self.dataset.episodes)) if p not in self.dataset._bad]
        entries = [self.dataset.episodes[p] for p in self.positions]
        self.ids = [int(e["index"]) for e in entries]
        self.lengths = torch.tensor([int(e["num_frames"]) for e in entries])
        self.num_workers = data.num_workers
        self._pool = None

    def sample(self, batch: int, clip_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` clips of ``clip_len`` frames, as ClipBank.sample."""
        return self._gather(*random_windows(self.lengths, batch, clip_len, gen), clip_len)

    def fixed_clips(self, n: int, clip_len: int, key: str = "frames") -> torch.Tensor:
        return self.fixed_batch(n, clip_len)[key]

    def fixed_batch(self, n: int, clip_len: int) -> dict[str, torch.Tensor]:
        return self._gather(*fixed_windows(self.lengths, n, clip_len), clip_len)

    def map(self, fn, key: str, new_key: str, progress: bool = False) -> ClipBank:
        """A ClipBank where ``new_key`` = fn(episode[key]), decoding one episode at a time (e.g. frames ->
        latents: only the latents stay in memory)."""
        eps = []
        for i in tqdm(range(len(self.ids)), desc=f"{key} -> {new_key}", disable=not progress, leave=False):
            e = self._read((self.positions[i], 0, int(self.lengths[i])))
            d = {k: v for k, v in e.items() if k != key}
            d[new_key] = fn(e[key])
            eps.append(d)
        return ClipBank(eps, self.ids)

    def _read(self, seg: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return _read_clip(self.dataset, seg)

    def _gather(self, eps: list[int], starts: list[int], clip_len: int) -> dict[str, torch.Tensor]:
        segs = [(self.positions[e], s, s + clip_len) for e, s in zip(eps, starts)]
        if self.num_workers > 0:
            if self._pool is None:
                import multiprocessing as mp

                # spawn, not fork: forking a process that runs torch's (and tqdm's) threads can copy a held
                # lock into the child, which then waits forever (seen once in the test suite)
                self._pool = mp.get_context("spawn").Pool(self.num_workers, _init_worker, (self.dataset,))
            items = self._pool.map(_read_in_worker, segs)
        else:
            items = [self._read(seg) for seg in segs]
        out = {k: torch.stack([it[k] for it in items]) for k in CLIP_KEYS}
        out["episode"] = torch.tensor([self.ids[e] for e in eps])
        out["start"] = torch.tensor(starts)
        return out

    def close(self) -> None:
        """Stop the worker processes and close the decoders."""
        if getattr(self, "_pool", None) is not None:
            self._pool.terminate()
            self._pool = None
        if hasattr(self, "dataset"):
            self.dataset.close()

    def __del__(self):  # also after a failed __init__, hence the getattr guards in close
        self.close()


_WORKER_DATASET = None  # each worker process's own ClipDataset (own decoders)


def _init_worker(dataset) -> None:
    global _WORKER_DATASET
    torch.set_num_threads(1)  # the workers share the cores with the training process
    _WORKER_DATASET = dataset  # spawned: a pickled copy, which carries no decoder of the parent's


def _read_in_worker(seg: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    return _read_clip(_WORKER_DATASET, seg)


def _read_clip(dataset, seg: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """One (episode position, first frame, end frame) window of a ClipDataset, with a ClipBank's keys."""
    item = dataset._load([seg])
    return {k: item[k] for k in CLIP_KEYS}
