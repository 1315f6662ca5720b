"""One imagined episode for a player: the world model's frames, one per call, in bounded memory.

Nothing here rolls out on its own; both dreams drive the library's streaming pieces:

- :class:`ActedDream` (a run with actions) is one row of the world-model env's
  :class:`~worldflow.gym_env.imagined.ImaginedBatch`: the dynamics model's bounded KV cache
  (:class:`~worldflow.dynamics.rollout.RolloutStream`), the tokenizer's streaming decode cache, and the
  reward / continue heads read off each frame's commit pass, exactly as ``WorldModelEnv.step`` does.
- :class:`FreeDream` (an action-free run) is the open-loop stream of ``worldflow rollout --video``:
  :meth:`RolloutStream.imagine` with ``defer_commit`` (K model calls per frame) and the decode cache.

K (sampling steps) may change between any two frames. Memory and time per frame are constant however long
a game runs: the caches hold the last model-context − 1 frames and keep no history.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worldflow.data.spaces import env_values
from worldflow.dynamics import RolloutStream
from worldflow.gym_env.context import Clip
from worldflow.gym_env.imagined import ImaginedBatch
from worldflow.nn import KVCache
from worldflow.run import WorldModel

__all__ = ["ActedDream", "FreeDream", "Step"]

Step = tuple[np.ndarray, float | None, float | None]  # frame (H, W, 3) uint8, reward, continue probability


class ActedDream:
    """An action-driven imagined episode: a one-row :class:`ImaginedBatch` of the world-model env."""

    def __init__(self, wm: WorldModel, decoder_window: int, generator: torch.Generator):
        self.wm = wm
        self.batch = ImaginedBatch(wm, [generator], steps=1, decoder_window=decoder_window)

    def start(self, clip: Clip) -> np.ndarray:
        """Observe the context clip -> the decoded last context frame (H, W, 3) uint8."""
        return self.batch.start([clip])[0].numpy()

    def step(self, action: Any, steps: int) -> Step:
        """Generate the frame that ``action`` (an env value) leads to, in ``steps`` sampling steps."""
        self.batch.steps = steps
        frames, reward, cont = self.batch.step(env_values(self.wm.action_space, action, batched=False)[None])
        heads = self.wm.heads is not None
        return frames[0].numpy(), float(reward[0]) if heads else None, float(cont[0]) if heads else None

    @property
    def cache(self) -> KVCache | None:
        """The dynamics KV cache (bounded: its buffers never grow)."""
        return None if self.batch.stream is None else self.batch.stream.cache


class FreeDream:
    """An action-free imagined video: the open-loop rollout stream and the tokenizer's decode cache."""

    def __init__(self, wm: WorldModel, generator: torch.Generator):
        self.wm, self.generator = wm, generator
        self.stream: RolloutStream | None = None
        self.decode_cache: KVCache | None = None

    @torch.inference_mode()
    def start(self, clip: Clip) -> np.ndarray:
        dev = self.wm.dynamics.head.weight.device
        lat = clip.latents[None].to(dev)
        self.stream = RolloutStream(self.wm.dynamics, 1, generator=self.generator)
        self.stream.observe(lat)
        self.decode_cache = self.wm.tokenizer.new_decode_cache(1)
        return self.wm.tokenizer.decode_uint8(lat, self.decode_cache)[0, -1].cpu().numpy()

    @torch.inference_mode()
    def step(self, action: Any, steps: int) -> Step:
        """The next frame (``action`` is ignored: the run has none); no reward or continue heads."""
        # open loop: nothing reads the frame's agent outputs, so its commit pass rides with the next frame
        z, _ = self.stream.imagine(steps, None, defer_commit=True)
        return self.wm.tokenizer.decode_uint8(z, self.decode_cache)[0, 0].cpu().numpy(), None, None

    @property
    def cache(self) -> KVCache | None:
        return None if self.stream is None else self.stream.cache
