"""Batched imagination for the world-model envs: B imagined episodes advanced in one forward pass per step.

:class:`ImaginedBatch` holds one :class:`RowNoiseStream` (a dynamics rollout stream whose noise row i
comes from generator i, so a batch reproduces B single episodes) and one tokenizer decode cache of batch
B. Rows start together, restart one by one while the others go on (their cache rows are rebuilt by a small
stream aligned to the batch's absolute frame index and copied in), and step together. Everything runs under
``torch.inference_mode``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from worldflow import rng
from worldflow.agent.model import features
from worldflow.dynamics import DynamicsModel, RolloutStream, shift_actions
from worldflow.gym_env.context import Clip
from worldflow.nn import KVCache
from worldflow.run import WorldModel

__all__ = ["RowNoiseStream", "ImaginedBatch"]


class RowNoiseStream(RolloutStream):
    """A :class:`RolloutStream` whose noise is drawn row by row, row i from ``generators[i]``.

    Row i then sees exactly the noise a 1-row stream with that generator would, whatever the batch: a
    batched env reproduces single envs. Rows with ``active[i]`` False get zero noise and leave their
    generator untouched (a sub-env about to be restarted must not consume its noise). Only the noise
    source differs from the parent (tests check that a 1-row stream equals it bit for bit).
    """

    def __init__(self, model: DynamicsModel, generators: list[torch.Generator], t0: int = 0):
        super().__init__(model, len(generators))
        self.generators = list(generators)
        self.active: np.ndarray | None = None  # (B,) bool, or None = all rows
        self.t = t0  # absolute index of the first frame (an empty cache may start anywhere)

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, I) of ``shape`` = (B, ...), row i from generator i (zeros for inactive rows)."""
        row = (1, *shape[1:])
        return torch.cat([
            rng.randn(row, g, self.device, dtype) if self.active is None or self.active[i]
            else torch.zeros(row, device=self.device, dtype=dtype)
            for i, g in enumerate(self.generators)
        ])


class ImaginedBatch:
    """B imagined episodes in lockstep: one :class:`RowNoiseStream` and one decode cache of batch B.

    ``start`` begins all rows at frame 0; ``restart`` replaces some rows while the others go on; ``step``
    advances every row by one generated frame. Frames are uint8 (B, H, W, 3). All three run under
    ``torch.inference_mode`` (see the module docstring).
    """

    def __init__(self, wm: WorldModel, generators: list[torch.Generator], steps: int, decoder_window: int):
        self.wm, self.generators, self.steps = wm, list(generators), steps
        self.decoder_window = decoder_window
        self.stream: RowNoiseStream | None = None
        self.decode_cache: KVCache | None = None

    @property
    def batch(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        return self.wm.dynamics.head.weight.device

    def _observe(self, clips: list[Clip], gens: list[torch.Generator], t0: int
                 ) -> tuple[RowNoiseStream, KVCache, Tensor]:
        """A fresh stream + decode cache starting at absolute frame t0 that have taken in ``clips`` (all of
        one length C); returns them and the decoded last context frames (b, H, W, 3) uint8."""
        dev = self.device
        lat = torch.stack([c.latents for c in clips]).to(dev)
        acts, mask = shift_actions(torch.stack([c.actions for c in clips]).to(dev),
                                   torch.stack([c.action_mask for c in clips]).to(dev))
        stream = RowNoiseStream(self.wm.dynamics, gens, t0)
        stream.observe(lat, acts, mask)
        cache = self.wm.tokenizer.decoder.new_cache(len(clips), self.decoder_window)
        cache.next_t = t0  # an empty cache starts at any frame index; aligned with the stream's
        frames = self.wm.tokenizer.decode_uint8(lat, cache)[:, -1]
        return stream, cache, frames

    @torch.inference_mode()
    def start(self, clips: list[Clip]) -> Tensor:
        """Begin every row from its clip (one clip per row, equal lengths) -> first frames (B, H, W, 3)."""
        if len({len(c) for c in clips}) != 1:
            raise ValueError("a batched start needs contexts of one length")
        self.stream, self.decode_cache, frames = self._observe(clips, self.generators, 0)
        return frames.cpu()

    @torch.inference_mode()
    def restart(self, rows: list[int], clips: list[Clip]) -> Tensor:
        """Restart ``rows`` from ``clips`` while the others go on -> their first frames (len(rows), H, W, 3).

        The new contexts run through a small stream that ends on the batched stream's current frame
        index (RoPE keys are cached rotated at absolute positions); its cache rows are then copied in.
        """
        out = torch.empty(len(rows), self.wm.size, self.wm.size, 3, dtype=torch.uint8)
        for c in sorted({len(c) for c in clips}):  # one small stream per context length
            sel = [j for j, clip in enumerate(clips) if len(clip) == c]
            sub = [rows[j] for j in sel]
            stream, cache, frames = self._observe([clips[j] for j in sel], [self.generators[i] for i in sub],
                                                  self.stream.t - c)
            self.stream.cache.copy_rows_from(sub, stream.cache)
            self.decode_cache.copy_rows_from(sub, cache)
            out[sel] = frames.cpu()
        return out

    @torch.inference_mode()
    def step(self, actions: Tensor, active: np.ndarray | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Generate one frame per row given env actions (B, *E) (dynamics values).

        ``active`` (B,) bool or None (all): False marks rows whose result will be discarded (they are
        about to restart); they draw no noise, so their generators stay in step with single envs.
        Returns frames (B, H, W, 3) uint8, reward (B,) and continue probability (B,), float32 on the CPU.
        """
        self.stream.active = active
        try:
            z, agent = self.stream.imagine(self.steps, actions.to(self.device)[:, None])
        finally:
            self.stream.active = None
        frames = self.wm.tokenizer.decode_uint8(z, self.decode_cache)[:, 0]
        heads = self.wm.heads
        if heads is None:  # dynamics only: no reward model, the episode never ends
            return frames.cpu(), torch.zeros(self.batch), torch.ones(self.batch)
        h = features(agent)[:, -1]
        return frames.cpu(), heads.reward(h).float().cpu(), heads.continue_prob(h).float().cpu()
