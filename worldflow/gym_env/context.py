"""Context clips for imagined episodes: a run's encoded dataset episodes, and clips a user passes in.

A world-model env starts each episode from C real latent frames (with their actions): :class:`ContextBank`
draws them uniformly from the run's cached dataset latents (``<run>/dynamics/latents_<split>_<key>.pt``,
written by ``worldflow train dynamics``); :meth:`Clip.given` wraps a context supplied through
``reset(options={'context_latents': ...})``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from worldflow.config import Config
from worldflow.data.spaces import env_values, null_values
from worldflow.errors import DataMismatchError, InputError
from worldflow.run import latent_bank, run_dataset
from worldflow.state import load_state
from worldflow.tokenizer.model import CausalTokenizer

__all__ = ["Clip", "ContextBank"]


@dataclass
class Clip:
    """A context clip: latents (C, N, D), dataset-aligned actions (C, *E) and action_mask (C,) bool.

    ``episode`` / ``start`` say where it came from in the dataset (-1 for a clip passed in by the user).
    """

    latents: Tensor
    actions: Tensor
    action_mask: Tensor
    episode: int = -1
    start: int = -1

    @classmethod
    def given(cls, space: gym.Space, latents: Any, actions: Any = None, action_mask: Any = None) -> Clip:
        """A user-supplied context; without actions the frames count as unlabeled video (mask False)."""
        lat = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
        if lat.dim() != 3 or lat.shape[0] < 1:
            raise InputError(f"context_latents must be (C >= 1, N, D), got {tuple(lat.shape)}")
        c = lat.shape[0]
        if actions is None:
            acts, mask = null_values(space, c), torch.zeros(c, dtype=torch.bool)
        else:
            acts = env_values(space, actions, batched=True)
            mask = torch.ones(c, dtype=torch.bool) if action_mask is None else torch.as_tensor(action_mask)
        if acts.shape[0] != c or mask.shape != (c,):
            raise InputError(f"context actions / action_mask must have {c} rows like the latents")
        return cls(lat, acts, mask.bool())

    def __len__(self) -> int:
        return self.latents.shape[0]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


class ContextBank:
    """A run's encoded dataset episodes, to draw context clips of C frames from.

    Only clips whose last frame has a successor in its episode are drawn (a clip ending on an episode's
    final frame would start the imagined episode in a terminal state). Windows are uniform over all
    valid (episode, start) pairs.
    """

    def __init__(self, episodes: list[dict[str, Tensor]], ids: list[int], context: int):
        self.episodes, self.ids, self.context = episodes, list(ids), context
        lengths = np.array([len(e["latents"]) for e in episodes])
        self.windows = np.maximum(lengths - context, 0)  # starts s with frame s + C inside the episode
        if self.windows.sum() == 0:
            raise ValueError(f"no episode has more than {context} frames (longest: {lengths.max()}): "
                             "use a shorter context")
        self.cum = np.cumsum(self.windows)

    @classmethod
    def load(cls, run: str | Path, split: str, context: int, tok: CausalTokenizer, cfg: Config
             ) -> ContextBank:
        """The split's latents cached by ``train dynamics``; (re)encoded if the dataset is still present."""
        data = run_dataset(run).get("data")
        if data and Path(data).exists():  # validates the cache key against dataset + tokenizer
            bank = latent_bank(run, data, cfg, split, tok, progress=False)
            return cls(bank.episodes, bank.ids, context)
        files = sorted((Path(run) / "dynamics").glob(f"latents_{split}_*.safetensors"), key=_mtime)
        if not files:
            raise DataMismatchError(f"run {run} has no cached {split} latents and its dataset {data} is "
                                    "gone: pass options={'context_latents': ...} to reset")
        saved = load_state(files[-1])  # the newest: written after the latest tokenizer
        return cls(saved["episodes"], saved["ids"], context)

    def sample(self, rng: np.random.Generator) -> Clip:
        k = int(rng.integers(int(self.cum[-1])))
        e = int(np.searchsorted(self.cum, k, side="right"))
        s = k - int(self.cum[e] - self.windows[e])
        ep, sl = self.episodes[e], slice(s, s + self.context)
        return Clip(ep["latents"][sl].float(), ep["actions"][sl], ep["action_mask"][sl].bool(),
                    self.ids[e], s)
