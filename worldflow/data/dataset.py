"""Torch datasets over an episode directory: fixed-length clips for training, whole episodes for eval.

A clip is ``clip_len`` consecutive frames with the step data *leaving* each frame (see docs/data.md):

==============  =====================  ==========================================================
key             dtype, shape           meaning at clip position i (episode frame t = start + i)
==============  =====================  ==========================================================
frames          uint8 (L, H, W, 3)     observation frames[t]
actions         (L, ...) long | float  action taken at frames[t]; 0 where action_mask is False
action_mask     bool (L,)              False at an episode's final frame (no action was taken there)
rewards         float32 (L,)           reward of the transition frames[t] → frames[t+1]; 0 if masked
terminated      bool (L,)              that transition ended the episode by termination
truncated       bool (L,)              that transition ended it by a time limit / step cap
is_first        bool (L,)              frames[t] is an episode's first observation (t == 0)
episode         int                    manifest ``index`` of the episode of the clip's first frame
start           int                    t of the clip's first frame within that episode
==============  =====================  ==========================================================

Actions are long for Discrete / MultiDiscrete / MultiBinary spaces and float32 for Box.

Clips stay inside one episode unless ``cross_episode=True``; then they run across the boundary into the
next episode of the split (``is_first`` marks where). Without ``cross_episode`` an episode with fewer
than ``clip_len`` frames has no clip and is skipped (listed in ``skipped_short``); padding would feed the
model frames that never happened.

Videos are opened lazily, on first use, in the process that reads them (each DataLoader worker has its
own decoders); at that first open the frame count is checked against the sidecar and the last frame is
decoded, so a truncated or corrupt file raises :class:`CorruptEpisodeError` naming it instead of
yielding garbage. With ``on_corrupt="skip"`` the episode is dropped with a warning naming the file and
the request is served by the next clip that avoids it (``validate=True`` finds every broken file up
front instead, so the index never contains them).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, RandomSampler

from worldflow.data.episodes import (
    CorruptEpisodeError,
    EmptyDatasetError,
    Episode,
    episode_files,
    holdout_episodes,
    load_episode,
    load_manifest,
    read_sidecar,
)
from worldflow.data.video import VideoDecodeError, VideoReader
from worldflow.errors import InputError

SPLITS = ("train", "heldout", "all")

__all__ = [
    "ClipDataset",
    "CorruptEpisodeError",
    "EpisodeDataset",
    "select_episodes",
]


def select_episodes(
    manifest: dict[str, Any], split: str, holdout_fraction: float = 0.1, seed: int = 0
) -> list[dict[str, Any]]:
    """Manifest entries of ``split`` (train | heldout | all), in manifest order (see holdout_episodes)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {SPLITS}")
    entries = manifest["episodes"]
    if split == "all":
        return list(entries)
    held = holdout_episodes(entries, holdout_fraction, seed)
    return [e for e in entries if (e["index"] in held) == (split == "heldout")]


def _action_torch_dtype(space: dict[str, Any] | None) -> torch.dtype:
    return torch.float32 if space is not None and space["type"] == "Box" else torch.long


class ClipDataset(Dataset):
    """Fixed-length clips from an episode directory; map-style over every valid window.

    Args:
        root: dataset directory (manifest.json + episodes/).
        clip_len: frames per clip L.
        split: ``"train"``, ``"heldout"`` or ``"all"``; held-out episodes are chosen per episode by a
            seeded hash (:func:`worldflow.data.episodes.holdout_episodes`), at least one when there are ≥ 2.
        holdout_fraction: share of episodes held out.
        cross_episode: let clips span consecutive episodes of the split.
        on_corrupt: ``"error"`` raises :class:`CorruptEpisodeError`; ``"skip"`` warns and avoids the file.
        seed: seed of the held-out split.
        backend: video backend (``"auto"``, ``"decord"``, ``"pyav"``).
        stride: window starts are multiples of ``stride`` (1: every start; L: non-overlapping clips).
        validate: open and check every episode now (then close them) instead of on first use.
        max_open: open decoders kept per process (least recently used ones are closed).

    ``ds[i]`` is window i in a fixed order (for deterministic evaluation); ``ds.sample(rng)`` draws a
    uniformly random window, and ``ds.random_sampler(n, seed)`` gives a DataLoader sampler for training.
    """

    def __init__(
        self,
        root: str | Path,
        clip_len: int,
        split: str = "train",
        holdout_fraction: float = 0.1,
        cross_episode: bool = False,
        on_corrupt: str = "error",
        seed: int = 0,
        backend: str = "auto",
        stride: int = 1,
        validate: bool = False,
        max_open: int = 16,
    ):
        if clip_len < 1 or stride < 1:
            raise InputError(f"clip_len and stride must be >= 1, got {clip_len}, {stride}")
        if on_corrupt not in ("error", "skip"):
            raise InputError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.root = Path(root)
        self.clip_len, self.stride = clip_len, stride
        self.split, self.cross_episode, self.on_corrupt = split, cross_episode, on_corrupt
        self.backend, self.max_open = backend, max_open
        self.manifest = load_manifest(self.root)
        self.action_space = self.manifest["action_space"]
        self.episodes = select_episodes(self.manifest, split, holdout_fraction, seed)
        if not self.episodes:
            raise EmptyDatasetError(
                f"dataset {str(self.root)!r} has no {split!r} episodes "
                f"({len(self.manifest['episodes'])} in total, holdout_fraction={holdout_fraction})"
            )
        self._sidecars: dict[int, dict[str, np.ndarray]] = {}
        self._readers: OrderedDict[int, VideoReader] = OrderedDict()
        self._checked: set[int] = set()  # episode positions whose files passed the first-open check
        self._bad: set[int] = set()
        self._backend_now = backend  # "auto" becomes "pyav" after decord fails on a readable file
        self._build_index()
        if validate:
            self.validate()

    # -- index ----------------------------------------------------------------------------------------
    def _build_index(self) -> None:
        """Window bookkeeping. Positions p index self.episodes; windows are counted per episode
        (no crossing) or over the concatenated frames of all good episodes (crossing)."""
        frames = np.array([int(e["num_frames"]) for e in self.episodes], dtype=np.int64)
        good = np.array([p not in self._bad for p in range(len(self.episodes))])
        self._frames = frames
        if self.cross_episode:
            self._stream = np.flatnonzero(good)  # positions in stream order
            self._offsets = np.concatenate([[0], np.cumsum(frames[self._stream])])
            total = int(self._offsets[-1])
            n = (total - self.clip_len) // self.stride + 1 if total >= self.clip_len else 0
            self.skipped_short = []
        else:
            ok = good & (frames >= self.clip_len)
            self._stream = np.flatnonzero(ok)
            per = (frames[self._stream] - self.clip_len) // self.stride + 1
            self._offsets = np.concatenate([[0], np.cumsum(per)])
            n = int(self._offsets[-1])
            self.skipped_short = [self.episodes[p]["index"] for p in np.flatnonzero(good & ~ok)]
        self._len = int(n)
        if self._len == 0:
            raise EmptyDatasetError(
                f"dataset {str(self.root)!r} split {self.split!r}: no clip of {self.clip_len} frames fits "
                f"(episode frame counts {frames.tolist()[:10]}{'...' if len(frames) > 10 else ''}"
                f"{', broken episodes skipped' if self._bad else ''}); lower clip_len or use cross_episode"
            )

    def __len__(self) -> int:
        return self._len

    def _segments(self, i: int) -> list[tuple[int, int, int]]:
        """Window i as [(episode position, first frame, end frame)] pieces, in order."""
        if self.cross_episode:
            g0 = i * self.stride
            k = int(np.searchsorted(self._offsets, g0, side="right")) - 1
            segs, need = [], self.clip_len
            t = g0 - int(self._offsets[k])
            while need > 0:
                p = int(self._stream[k])
                take = min(need, int(self._frames[p]) - t)
                segs.append((p, t, t + take))
                need, k, t = need - take, k + 1, 0
            return segs
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        p = int(self._stream[k])
        t = (i - int(self._offsets[k])) * self.stride
        return [(p, t, t + self.clip_len)]

    def windows(self) -> list[tuple[int, int]]:
        """(episode manifest index, start frame) of every window, in index order."""
        out = []
        for i in range(len(self)):
            p, t, _ = self._segments(i)[0]
            out.append((int(self.episodes[p]["index"]), t))
        return out

    # -- files ----------------------------------------------------------------------------------------
    def _sidecar(self, p: int) -> dict[str, np.ndarray]:
        if p not in self._sidecars:
            entry = self.episodes[p]
            _, side_path = episode_files(self.root, entry)
            side = read_sidecar(side_path)
            if int(side["num_frames"]) != int(entry["num_frames"]):
                raise CorruptEpisodeError(
                    f"episode sidecar {side_path} says {int(side['num_frames'])} frames, the manifest "
                    f"{entry['num_frames']}"
                )
            self._sidecars[p] = side
        return self._sidecars[p]

    def _reader(self, p: int) -> VideoReader:
        """The open, checked reader of episode position p (LRU-cached, at most max_open open)."""
        if p in self._readers:
            self._readers.move_to_end(p)
            return self._readers[p]
        video, _ = episode_files(self.root, self.episodes[p])
        reader = VideoReader(video, backend=self._backend_now)
        if p not in self._checked:
            self._check(p, reader, video)
        if self._backend_now == "auto" and reader.backend == "pyav":
            # decord could not read a file PyAV reads (decord2 fails on some frame widths, and all
            # episodes share one size): stop trying decord in this process.
            self._backend_now = "pyav"
        self._readers[p] = reader
        while len(self._readers) > self.max_open:
            self._readers.popitem(last=False)[1].close()
        return reader

    def _check(self, p: int, reader: VideoReader, video: Path) -> None:
        """First open: frame count must equal the sidecar's, and the last frame must decode."""
        expected = int(self._sidecar(p)["num_frames"])
        try:
            n = len(reader)
            if n != expected:
                raise CorruptEpisodeError(
                    f"episode video {video} has {n} frames, its sidecar says {expected}"
                )
            reader.get_batch([n - 1])
        except VideoDecodeError as e:
            reader.close()
            raise CorruptEpisodeError(f"episode video {video} is unreadable: {e}") from e
        except CorruptEpisodeError:
            reader.close()
            raise
        self._checked.add(p)

    def _mark_bad(self, p: int, err: CorruptEpisodeError) -> None:
        if self.on_corrupt == "error":
            raise err
        warnings.warn(f"skipping corrupt episode {self.episodes[p]['video']}: {err}", stacklevel=3)
        self._bad.add(p)
        reader = self._readers.pop(p, None)
        if reader is not None:
            reader.close()

    def validate(self) -> list[str]:
        """Open and check every episode of the split now, then close the decoders.

        With ``on_corrupt="error"`` the first broken episode raises; with ``"skip"`` broken episodes are
        warned about and removed from the index. Returns the video paths of broken episodes.
        """
        for p in range(len(self.episodes)):
            if p in self._checked or p in self._bad:
                continue
            try:
                self._reader(p)
            except CorruptEpisodeError as e:
                self._mark_bad(p, e)
        for reader in self._readers.values():
            reader.close()  # nothing stays open, so forking DataLoader workers afterwards is safe
        self._readers.clear()
        self._build_index()
        return [self.episodes[p]["video"] for p in sorted(self._bad)]

    # -- items ----------------------------------------------------------------------------------------
    def _load(self, segs: list[tuple[int, int, int]]) -> dict[str, Any]:
        space = self.action_space
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("frames", "actions", "mask", "rew", "term", "trunc")
        }
        for p, t0, t1 in segs:
            side = self._sidecar(p)
            reader = self._reader(p)
            try:
                frames = reader.get_batch(np.arange(t0, t1))
            except VideoDecodeError as e:
                raise CorruptEpisodeError(f"episode video {reader.path} is unreadable: {e}") from e
            n_act = len(side["terminated"])  # T: frames[T] (index num_frames − 1) has no action
            a1 = min(t1, n_act)
            pad = t1 - max(a1, t0)

            def fill(x: np.ndarray, a1=a1, pad=pad, t0=t0) -> np.ndarray:
                body = x[t0:a1]
                return np.concatenate([body, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else body

            labelled = "actions" in side  # an action-free episode: zero placeholders, mask False throughout
            parts["frames"].append(frames)
            parts["actions"].append(fill(side["actions"]) if labelled else np.zeros(t1 - t0, np.int64))
            parts["mask"].append((np.arange(t0, t1) < n_act) & labelled)
            parts["rew"].append(fill(side["rewards"].astype(np.float32)) if labelled
                                else np.zeros(t1 - t0, np.float32))
            parts["term"].append(fill(side["terminated"].astype(bool)))
            parts["trunc"].append(fill(side["truncated"].astype(bool)))
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        is_first = np.concatenate([np.arange(t0, t1) == 0 for _, t0, t1 in segs])
        p0, start, _ = segs[0]
        return {
            "frames": torch.from_numpy(cat["frames"]),
            "actions": torch.as_tensor(cat["actions"], dtype=_action_torch_dtype(space)),
            "action_mask": torch.from_numpy(cat["mask"]),
            "rewards": torch.from_numpy(cat["rew"]),
            "terminated": torch.from_numpy(cat["term"]),
            "truncated": torch.from_numpy(cat["trunc"]),
            "is_first": torch.from_numpy(is_first),
            "episode": int(self.episodes[p0]["index"]),
            "start": int(start),
        }

    def _next_clean(self, i: int) -> int:
        """The first window at or after i (wrapping) that touches no known-bad episode."""
        for _ in range(len(self.episodes) + 1):
            bad = [p for p, _, _ in self._segments(i) if p in self._bad]
            if not bad:
                return i
            # jump past the last bad episode this window touches
            k = int(np.flatnonzero(self._stream == bad[-1])[0])
            if self.cross_episode:
                i = math.ceil(int(self._offsets[k + 1]) / self.stride)
                i = i if i < len(self) and i * self.stride + self.clip_len <= self._offsets[-1] else 0
            else:
                i = int(self._offsets[k + 1]) % len(self)
        raise EmptyDatasetError(f"every episode of {str(self.root)!r} split {self.split!r} is corrupt")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip index {i} out of range for {len(self)} clips")
        i = int(i) % len(self)
        while True:
            i = self._next_clean(i) if self._bad else i
            segs = self._segments(i)
            try:
                return self._load(segs)
            except CorruptEpisodeError as e:
                p = self._culprit(segs, e)
                self._mark_bad(p, e)

    def _culprit(self, segs: list[tuple[int, int, int]], err: CorruptEpisodeError) -> int:
        msg = str(err)
        for p, _, _ in segs:
            video, side = episode_files(self.root, self.episodes[p])
            if str(video) in msg or str(side) in msg:
                return p
        return segs[0][0]

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """A uniformly random window (every valid start equally likely)."""
        return self[int(rng.integers(len(self)))]

    def random_sampler(self, num_samples: int, seed: int = 0) -> RandomSampler:
        """A seeded sampler of ``num_samples`` random windows (with replacement) for a DataLoader."""
        g = torch.Generator().manual_seed(seed)
        return RandomSampler(self, replacement=True, num_samples=num_samples, generator=g)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # decoders never travel to another process
        return state


class EpisodeDataset(Dataset):
    """Whole episodes of a split, for evaluation: item = dict of tensors.

    frames uint8 (T+1, H, W, 3); actions (T, ...) long | float32; rewards float32 (T,); terminated,
    truncated bool (T,); episode int (manifest index). An action-free episode has zero actions (T,) and
    rewards, and ``labelled`` False. ``load(i)`` returns the numpy
    :class:`~worldflow.data.episodes.Episode` instead. Broken files raise :class:`CorruptEpisodeError`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "heldout",
        holdout_fraction: float = 0.1,
        seed: int = 0,
        backend: str = "auto",
    ):
        self.root = Path(root)
        self.backend = backend
        self.manifest = load_manifest(self.root)
        self.episodes = select_episodes(self.manifest, split, holdout_fraction, seed)
        if not self.episodes:
            raise EmptyDatasetError(f"dataset {str(self.root)!r} has no {split!r} episodes")

    def __len__(self) -> int:
        return len(self.episodes)

    def load(self, i: int) -> Episode:
        return load_episode(
            self.root, self.episodes[i]["index"], backend=self.backend, manifest=self.manifest
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        ep = self.load(i)
        t = len(ep)
        return {
            "frames": torch.from_numpy(ep.frames),
            "actions": torch.as_tensor(ep.actions if ep.actions is not None else np.zeros(t, np.int64),
                                       dtype=_action_torch_dtype(self.manifest["action_space"])),
            "rewards": torch.from_numpy(ep.rewards if ep.rewards is not None else np.zeros(t, np.float32)),
            "labelled": ep.actions is not None,
            "terminated": torch.from_numpy(ep.terminated),
            "truncated": torch.from_numpy(ep.truncated),
            "episode": int(self.episodes[i]["index"]),
        }
