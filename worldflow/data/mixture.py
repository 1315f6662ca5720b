"""Training on several datasets at once: ``--data A --data B`` and the ``data.mix`` config key.

Dreamer 4 trains its world model on a large corpus of unlabeled video together with a small set of
action-labelled episodes; the dynamics model learns from both, taking actions only where they exist. Here
each ``--data`` directory is one part of a :class:`MixedClips`. A part may be action-free (imported
videos, manifest ``action_space`` null): its clips carry ``action_mask`` False throughout, so the model
sees the base action embedding alone there (its unlabeled-video path).

How rows are drawn (``data.mix``):

- empty (default): every clip window of every part equally likely, so a part weighs by its size, exactly
  as one dataset holding all the episodes would;
- one weight per ``--data`` (in order, normalised): each row picks its part with that probability, then a
  uniform window inside it, so a small labelled set can be given a fixed share of every batch.

All randomness comes from the trainer's generator, so resume stays exact; with a single dataset the
batches are exactly those of that dataset alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from worldflow import rng
from worldflow.config import Config, DataConfig
from worldflow.data.clips import ClipBank, DiskClips, fixed_windows, load_clips, random_windows
from worldflow.data.episodes import load_manifest
from worldflow.data.spaces import action_shape
from worldflow.errors import DataMismatchError, InputError

__all__ = ["as_roots", "labelled_space", "mixture_space", "MixedClips", "mix", "load_mixture"]

Part = ClipBank | DiskClips


def as_roots(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """``--data`` as a list of dataset directories (one path, or the several a command was given)."""
    roots = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not roots:
        raise InputError("no dataset given: pass --data DIR (more than once to train on several)")
    return list(dict.fromkeys(roots))


def labelled_space(spaces: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The action space of the first labelled dataset among manifest ``action_space`` values (None if
    every one is action-free); :func:`mixture_space` checks that the labelled ones agree."""
    return next((s for s in spaces if s is not None), None)


def mixture_space(roots: Sequence[Path], cfg: Config) -> dict[str, Any] | None:
    """The action space the datasets share (their manifests' ``action_space``; None if all are
    action-free). DataMismatchError when frame sizes differ, when two labelled datasets have different
    action spaces, when ``data.mix`` does not give one weight per dataset, or when an action-free dataset
    is given and ``data.allow_action_free`` is false."""
    manifests = [load_manifest(r) for r in roots]
    shapes = {tuple(m["frame_shape"]) for m in manifests}
    if len(shapes) > 1:
        listing = ", ".join(f"{r}: {tuple(m['frame_shape'])}" for r, m in zip(roots, manifests))
        raise DataMismatchError(f"the datasets have different frame shapes ({listing}): import or collect "
                                f"them at one --size")
    labelled = [(r, m["action_space"]) for r, m in zip(roots, manifests) if m["action_space"] is not None]
    free = [r for r, m in zip(roots, manifests) if m["action_space"] is None]
    if free and not cfg.data.allow_action_free:
        raise DataMismatchError(
            f"{free[0]} is action-free (imported video) but data.allow_action_free is false: pass "
            f"data.allow_action_free=true to train on it too, or drop it")
    spaces = {str(s) for _, s in labelled}
    if len(spaces) > 1:
        listing = "; ".join(f"{r}: {s}" for r, s in labelled)
        raise DataMismatchError(f"datasets with different action spaces cannot be mixed ({listing}): "
                                "train them in separate runs")
    mix = cfg.data.mix
    if mix and len(mix) != len(roots):
        raise DataMismatchError(f"data.mix gives {len(mix)} weights for {len(roots)} --data datasets: give "
                                f"one weight per --data, in order (or data.mix=[] to weigh them by size)")
    if mix and (min(mix) < 0 or sum(mix) <= 0):
        raise DataMismatchError(f"data.mix={list(mix)}: weights must be >= 0 with a positive sum")
    return labelled_space([s for _, s in labelled])


def _null_actions(space: dict[str, Any], rows: int, length: int) -> torch.Tensor:
    """Zero actions (rows, length, *E) of ``space`` (placeholders under action_mask False)."""
    dtype = torch.float32 if space["type"] == "Box" else torch.long
    return torch.zeros((rows, length, *action_shape(space)), dtype=dtype)


class MixedClips:
    """Several datasets' clip sources (:class:`ClipBank` / :class:`DiskClips`) drawn as one.

    Args:
        parts: one clip source per dataset, in ``--data`` order.
        weights: ``data.mix`` (one per part; normalised) or empty for size-proportional draws.
        labelled: per part, whether it has actions.
        space: the labelled parts' action space (manifest form) or None: an action-free part's
            placeholder actions take its event shape and dtype, so rows stack into one batch.

    ``sample`` / ``fixed_batch`` / ``fixed_clips`` / ``map`` / ``lengths`` behave as on a single source;
    batches of several parts carry ``dataset`` (B,) long, the part each row came from.
    """

    def __init__(self, parts: Sequence[Part], weights: Sequence[float] = (), labelled: Sequence[bool] = (),
                 space: dict[str, Any] | None = None):
        self.parts, self.space = list(parts), space
        self.weights = torch.tensor(list(weights), dtype=torch.float64) if weights else None
        self.labelled = list(labelled) if labelled else [True] * len(self.parts)
        sizes = [len(p.lengths) for p in self.parts]
        self.offsets = torch.cumsum(torch.tensor([0, *sizes]), 0)  # part k holds episodes [off_k, off_k+1)

    @property
    def lengths(self) -> torch.Tensor:
        """Frames per episode (E,) over all parts, in part order."""
        return torch.cat([p.lengths for p in self.parts])

    def sample(self, batch: int, clip_len: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` random clips of ``clip_len`` frames (see the module docstring for the draw)."""
        if len(self.parts) == 1:
            return self.parts[0].sample(batch, clip_len, gen)
        if self.weights is None:
            eps, starts = random_windows(self.lengths, batch, clip_len, gen)
            return self._assemble(eps, starts, clip_len)
        part_of_row = rng.multinomial(self.weights, batch, gen, replacement=True).tolist()
        eps, starts = [0] * batch, [0] * batch
        for k, part in enumerate(self.parts):
            rows = [i for i, p in enumerate(part_of_row) if p == k]
            if not rows:
                continue
            e, s = random_windows(part.lengths, len(rows), clip_len, gen)
            for i, ei, si in zip(rows, e, s):
                eps[i], starts[i] = int(self.offsets[k]) + ei, si
        return self._assemble(eps, starts, clip_len)

    def fixed_batch(self, n: int, clip_len: int) -> dict[str, torch.Tensor]:
        """``n`` deterministic windows over all parts' episodes (:func:`fixed_windows`)."""
        if len(self.parts) == 1:
            return self.parts[0].fixed_batch(n, clip_len)
        return self._assemble(*fixed_windows(self.lengths, n, clip_len), clip_len)

    def fixed_clips(self, n: int, clip_len: int, key: str = "frames") -> torch.Tensor:
        return self.fixed_batch(n, clip_len)[key]

    def map(self, fn, key: str, new_key: str, progress: bool = False) -> MixedClips:
        """Each part mapped as :meth:`ClipBank.map` (e.g. frames -> latents)."""
        parts = [p.map(fn, key, new_key, progress) for p in self.parts]
        return MixedClips(parts, self.weights.tolist() if self.weights is not None else (), self.labelled,
                          self.space)

    def _assemble(self, eps: list[int], starts: list[int], clip_len: int) -> dict[str, torch.Tensor]:
        """Rows for global episode positions ``eps``: gathered part by part, put back in draw order."""
        part_of = (torch.searchsorted(self.offsets, torch.tensor(eps), right=True) - 1).tolist()
        pieces: list[tuple[list[int], dict[str, torch.Tensor]]] = []
        for k, part in enumerate(self.parts):
            rows = [i for i, p in enumerate(part_of) if p == k]
            if rows:
                local = [eps[i] - int(self.offsets[k]) for i in rows]
                b = part._gather(local, [starts[i] for i in rows], clip_len)
                b["dataset"] = torch.full((len(rows),), k, dtype=torch.long)
                if not self.labelled[k] and self.space is not None:
                    b["actions"] = _null_actions(self.space, len(rows), clip_len)
                pieces.append((rows, b))
        order = torch.tensor([i for rows, _ in pieces for i in rows]).argsort()
        return {key: torch.cat([b[key] for _, b in pieces])[order] for key in pieces[0][1]}

    def close(self) -> None:
        for p in self.parts:
            if hasattr(p, "close"):
                p.close()


def mix(parts: Sequence[Part], roots: Sequence[Path], data: DataConfig) -> Part | MixedClips:
    """One clip source per dataset of ``roots`` drawn as one (the source itself for a single dataset)."""
    if len(parts) == 1:
        return parts[0]
    spaces = [load_manifest(r)["action_space"] for r in roots]
    return MixedClips(parts, data.mix, [s is not None for s in spaces], labelled_space(spaces))


def load_mixture(data, cfg: DataConfig, split: str = "train", progress: bool = True) -> Part | MixedClips:
    """The split of every ``--data`` dataset as one clip source (:func:`load_clips` each, then
    :func:`mix`)."""
    roots = as_roots(data)
    return mix([load_clips(r, cfg, split, progress) for r in roots], roots, cfg)
