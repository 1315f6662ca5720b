"""Where a game starts: real context clips of C frames, from a dataset's held-out episodes or a video file.

Each Reset draws a new clip with the game's ``numpy`` generator and never the same (episode, start) twice
in a row. :class:`HeldoutClips` draws from the run's cached latents of a dataset's held-out split (the
ones ``worldflow eval`` scores: never trained on), through :class:`worldflow.gym_env.context.ContextBank`,
exactly as the world-model env draws its contexts; a dataset without held-out episodes falls back to its
training split, and says so. :class:`VideoClips` encodes C frames of a video file from a random start,
fitted to the run's frame size and resampled to its frame rate as ``worldflow rollout --video`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from worldflow.config import Config
from worldflow.errors import InputError
from worldflow.gym_env.context import Clip, ContextBank
from worldflow.tokenizer.model import CausalTokenizer

__all__ = ["Context", "HeldoutClips", "VideoClips"]

_REDRAWS = 8  # tries to avoid repeating the previous clip (a dataset may hold a single window)


@dataclass
class Context:
    """A context clip (latents (C, N, D), dataset-aligned actions, mask) and where it came from.

    ``episode`` / ``start``: the dataset episode index and first frame (-1 for a video file's clip,
    whose first frame is ``start`` of the resampled video).
    """

    clip: Clip
    label: str
    episode: int = -1
    start: int = -1

    def info(self) -> dict[str, object]:
        return {"label": self.label, "episode": self.episode, "start": self.start, "frames": len(self.clip)}


class HeldoutClips:
    """Context clips drawn from a dataset's held-out episodes (``data`` None: the run's own dataset).

    ``episode_actions(ctx)`` gives the dataset actions that led from the episode's first frame to the
    clip's last one (for replaying them in the real env, :mod:`worldflow.play.real`).
    """

    def __init__(self, run: str | Path, data: str | Path | None, context: int, tok: CausalTokenizer,
                 cfg: Config):
        from worldflow.run import latent_bank, run_dataset

        self.data = Path(data) if data is not None else _existing(run_dataset(run).get("data"))
        self.split, self.note = "heldout", ""
        if self.data is not None and not _has_heldout(self.data, cfg):
            self.split = "train"
            self.note = f"{self.data} holds no held-out episode: contexts come from its training split"
        if data is None:  # the run's own dataset, or its cached latents where the dataset is gone
            self.bank = ContextBank.load(run, self.split, context, tok, cfg)
        else:
            bank = latent_bank(run, self.data, cfg, self.split, tok, progress=False)
            self.bank = ContextBank(bank.episodes, bank.ids, context)
        self.context = context

    def draw(self, rng: np.random.Generator, previous: Context | None = None) -> Context:
        for _ in range(_REDRAWS):
            clip = self.bank.sample(rng)
            if previous is None or (clip.episode, clip.start) != (previous.episode, previous.start):
                break
        last = clip.start + len(clip) - 1
        label = f"{self.split} episode {clip.episode}, frames {clip.start}-{last}"
        return Context(clip, label, clip.episode, clip.start)

    def episode_actions(self, ctx: Context) -> torch.Tensor:
        """Dataset actions 0 .. start + C - 2 of the clip's episode: (start + C - 1, *E)."""
        ep = self.bank.episodes[self.bank.ids.index(ctx.episode)]
        return ep["actions"][: ctx.start + len(ctx.clip) - 1]


class VideoClips:
    """Context clips of a video file: C frames from a random start, encoded by the run's tokenizer.

    The causal encoder sees up to its window of real frames before the clip, as in ``worldflow rollout
    --video``. A video has no actions: every context action is masked (the unlabeled path).
    """

    def __init__(self, path: str | Path, context: int, tok: CausalTokenizer, space: gym.Space | None,
                 fps: float | None):
        from worldflow.cli.rollout import VideoFrames

        self.frames = VideoFrames(path, tok.image_size, fps)
        if len(self.frames) < context:
            raise InputError(f"--video {path} has {len(self.frames)} frames at {self.frames.fps:g} fps, "
                             f"fewer than the {context} context frames: use a longer video or --context")
        self.path, self.context, self.tok, self.space = Path(path), context, tok, space
        self.note = ""

    def draw(self, rng: np.random.Generator, previous: Context | None = None) -> Context:
        from worldflow.data.spaces import null_values
        from worldflow.run import encode_frames

        starts = len(self.frames) - self.context + 1
        for _ in range(_REDRAWS):
            s = int(rng.integers(starts))
            if previous is None or s != previous.start or starts == 1:
                break
        lo = max(0, s - (self.tok.cfg.context - 1))
        lat = encode_frames(self.tok, torch.from_numpy(self.frames.get(lo, s + self.context)))[-self.context:]
        c = self.context
        acts = null_values(self.space, c) if self.space is not None else torch.zeros(c, dtype=torch.long)
        clip = Clip(lat.float(), acts, torch.zeros(c, dtype=torch.bool))
        return Context(clip, f"{self.path.name}, frames {s}-{s + c - 1}", -1, s)


def _existing(data: str | None) -> Path | None:
    return Path(data) if data and Path(data).exists() else None


def _has_heldout(data: Path, cfg: Config) -> bool:
    from worldflow.data.dataset import select_episodes
    from worldflow.data.episodes import load_manifest

    return bool(select_episodes(load_manifest(data), "heldout", cfg.data.holdout_fraction))
