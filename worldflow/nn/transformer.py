"""The factorised space/time transformer and its bounded KV cache for streaming.

:class:`SpaceTimeTransformer`: spatial attention inside every frame in every layer, causal temporal attention
(per token position, sliding window) every ``temporal_every``-th layer, and a bounded :class:`KVCache` so
streaming one frame at a time equals a whole-sequence forward with the same window.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from worldflow.config import TransformerConfig
from worldflow.nn.attention import Attention
from worldflow.nn.layers import RMSNorm, SwiGLU, rope_angles, rope_tables

# ---------------------------------------------------------------------------------------------------
# KV cache for temporal layers


class KVCache:
    """Keys/values of the last ``window - 1`` committed frames for every temporal layer.

    Buffers are allocated once, at the first forward that uses the cache, with shape
    (batch * tokens, kv_heads, slots, head_dim) per temporal layer, ``slots`` = 2 (window - 1) + WORK.
    The committed frames occupy the contiguous slots ``start .. start + length - 1``; up to ``WORK``
    new frames outside autograd (one denoising pass, or a commit riding with the next frame's first
    pass) are written right after them, so attention reads one view of the buffer instead of
    concatenating the whole cache on every pass. A commit that overflows the window moves ``start``
    instead of shifting the buffer; only when the free slots run out are the held frames moved back to
    slot 0 (one copy every ``window - 1`` frames instead of one per frame). The buffers never grow, so
    memory is constant however long a rollout runs. Keys are stored already rotated (RoPE with their
    absolute frame index), so a cached frame never needs recomputation. Cached values are detached: the
    cache is an inference device, gradients never flow into earlier committed frames.

    ``next_t`` is the absolute index of the next frame to be committed; ``length`` the number of frames
    currently held (<= window - 1). ``reset()`` empties it and keeps the buffers.
    """

    WORK = 2  # new frames written in place: a denoising pass (1) or commit + next frame's first pass (2)

    def __init__(self, batch: int, window: int, layers: int, kv_heads: int, head_dim: int):
        if window < 1:
            raise ValueError(f"cache window must be >= 1 frame, got {window}")
        self.batch, self.window, self.layers = batch, window, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.length = 0
        self.next_t = 0
        self.start = 0  # slot of the oldest held frame
        self._new_start = 0  # where the held frames begin after the pending commit (set by write)
        self.tokens: int | None = None

    @property
    def capacity(self) -> int:
        """Frames the cache can hold: window - 1 (the current frame is always computed fresh)."""
        return self.window - 1

    @property
    def slots(self) -> int:
        """Frame slots per buffer: the held frames, as many free ones to slide into, and the new ones."""
        return 2 * self.capacity + self.WORK

    def reset(self) -> None:
        self.length = 0
        self.next_t = 0
        self.start = 0

    def _ensure(self, tokens: int, like: Tensor) -> None:
        if self.tokens is None:
            shape = (self.batch * tokens, self.kv_heads, self.slots, self.head_dim)
            self.k = [like.new_zeros(shape) for _ in range(self.layers)]
            self.v = [like.new_zeros(shape) for _ in range(self.layers)]
            self.tokens = tokens
        elif tokens != self.tokens:
            raise ValueError(f"cache was built for {self.tokens} tokens per frame, got {tokens}")

    def reserve(self, frames: int) -> None:
        """Make room for ``frames`` new frames after the held ones (called once per forward, before any
        layer): if they would run past the last slot, move the held frames back to slot 0."""
        if self.start + self.length + min(frames, self.WORK) <= self.slots:
            return
        a, n = self.start, self.length
        for buf in self.k + self.v:
            buf[:, :, :n].copy_(buf[:, :, a : a + n].clone())  # the ranges may overlap
        self.start = 0

    def positions(self, device: torch.device) -> Tensor:
        """Absolute frame indices of the cached frames (length,), oldest first."""
        return torch.arange(self.next_t - self.length, self.next_t, device=device)

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Cached (k, v) of one temporal layer, each (batch * tokens, Hkv, length, hd)."""
        a, b = self.start, self.start + self.length
        return self.k[layer][:, :, a:b], self.v[layer][:, :, a:b]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cached + new keys/values of one temporal layer, each (batch * tokens, Hkv, length + T, hd).

        Up to ``WORK`` new frames outside autograd go into the slots after the cached frames, and the
        result is a view of the buffer (no copy of the cache); otherwise (more frames, or keys that
        carry gradients) the cache is concatenated with the new frames.
        """
        a, n, t = self.start, self.length, k.shape[2]
        if t <= self.WORK and not (k.requires_grad or v.requires_grad) and a + n + t <= self.slots:
            kb, vb = self.k[layer], self.v[layer]
            kb[:, :, a + n : a + n + t].copy_(k)
            vb[:, :, a + n : a + n + t].copy_(v)
            return kb[:, :, a : a + n + t], vb[:, :, a : a + n + t]
        ck, cv = self.get(layer)
        return torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)

    def write(self, layer: int, k_all: Tensor, v_all: Tensor, frames: int | None = None) -> None:
        """Commit the first ``frames`` new frames (all if None) of ``k_all``/``v_all`` from :meth:`extend`:
        keep the newest ``capacity`` frames of the cached + committed ones."""
        n = self.length
        end = k_all.shape[2] if frames is None else n + frames
        keep = min(end, self.capacity)
        if not keep:
            return
        buf = self.k[layer]
        if k_all.data_ptr() == buf[:, :, self.start :].data_ptr():
            # a view of the buffer: the frames sit in their slots already; the window slides over them
            self._new_start = self.start + end - keep
            return
        for buf, src in ((self.k[layer], k_all), (self.v[layer], v_all)):
            buf[:, :, :keep].copy_(src[:, :, end - keep : end].detach())
        self._new_start = 0

    def advance(self, frames: int) -> None:
        """Account for ``frames`` newly committed frames (after every layer has written)."""
        if self.capacity:
            self.start = self._new_start
        self.length = min(self.length + frames, self.capacity)
        self.next_t += frames

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_rows_from(self, rows: list[int] | Tensor, other: KVCache) -> None:
        """Overwrite batch rows ``rows`` with ``other``'s rows: row j of ``other`` -> row ``rows[j]``.

        Restarts some sequences of a batched stream: run their new context through a ``len(rows)``-row
        cache aligned to this cache's frame index, then copy. One ``length`` / ``next_t`` is shared by all
        rows and keys are stored rotated at their absolute frame index, so both caches must hold the same
        frame slots: equal window, layout, ``length`` and ``next_t`` (ValueError otherwise).
        """
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        if other.batch != len(rows):
            raise ValueError(f"other cache has {other.batch} rows, asked to copy into {len(rows)}")
        ids = rows.tolist()
        if len(set(ids)) < len(ids) or any(not 0 <= r < self.batch for r in ids):
            raise ValueError(f"rows {rows.tolist()} must be distinct indices in [0, {self.batch})")
        for name in ("window", "layers", "kv_heads", "head_dim", "length", "next_t"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(f"caches disagree on {name}: {mine} != {theirs} (align the streams first)")
        if other.tokens is None:
            raise ValueError("the source cache was never written")
        if self.tokens is None:
            self._ensure(other.tokens, other.k[0] if other.k else torch.empty(0))
        elif self.tokens != other.tokens:
            raise ValueError(f"caches disagree on tokens per frame: {self.tokens} != {other.tokens}")
        # Buffers are (batch * tokens, ...), batch-major: row r owns entries r*tokens .. (r+1)*tokens - 1.
        idx = (rows[:, None] * self.tokens + torch.arange(self.tokens)).flatten()
        for layer in range(self.layers):
            for mine, theirs in zip(self.get(layer), other.get(layer)):
                mine.index_copy_(0, idx.to(mine.device), theirs.to(mine.device, mine.dtype))


def _committed(commit: bool | int, frames: int) -> int:
    """How many of ``frames`` new frames a forward commits: True all, False none, an int the first n."""
    if isinstance(commit, bool):
        return frames if commit else 0
    if not 0 <= commit <= frames:
        raise ValueError(f"commit={commit} must be a bool or a frame count in [0, {frames}]")
    return commit


def temporal_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Banded causal mask (Lq, Lk): query frame t sees key frames t - window + 1 .. t (all if None)."""
    d = q_pos[:, None] - k_pos[None, :]
    m = d >= 0
    if window is not None:
        m = m & (d < window)
    return m


# ---------------------------------------------------------------------------------------------------
# Space/time transformer


class SpaceTimeBlock(nn.Module):
    """One layer: spatial attention, optional causal temporal attention, SwiGLU; all pre-norm residual."""

    def __init__(self, cfg: TransformerConfig, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm_s = RMSNorm(cfg.width)
        self.attn_s = Attention(cfg)
        if temporal:
            self.norm_t = RMSNorm(cfg.width)
            self.attn_t = Attention(cfg)
        self.norm_m = RMSNorm(cfg.width)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def _drop(self, x: Tensor) -> Tensor:
        # dropout(p=0) returns its input (no RNG draw): skip the module call, per-call overhead adds up
        return self.drop(x) if self.drop.p > 0 else x

    def forward(
        self,
        x: Tensor,
        sp_rope: tuple[Tensor, Tensor],
        sp_mask: Tensor | None,
        t_rope: tuple[Tensor, Tensor],
        t_mask: Tensor,
        cache: KVCache | None,
        cache_layer: int,
        commit: bool | int,
        keep: int | None = None,
    ) -> Tensor:
        """x (B, T, S, D) -> (B, T, S, D), or (B, keep, S, D) with ``keep`` (a temporal block only): every
        frame's temporal keys/values are computed (and cached), but only the last ``keep`` frames query
        them and go on through the MLP; ``t_mask`` then holds those frames' rows (keep, T_k)."""
        b, t, s, d = x.shape
        h = self.norm_s(x).reshape(b * t, s, d)  # b t s d -> (b t) s d
        q, k, v = self.attn_s.project(h, sp_rope)
        h = self.attn_s.attend_out(q, k, v, sp_mask)
        x = x + self._drop(h.reshape(b, t, s, d))
        if self.temporal:
            h = self._temporal(x, t_rope, t_mask, cache, cache_layer, commit, keep)
            x = (x if keep is None else x[:, t - keep :]) + self._drop(h)
        return x + self._drop(self.mlp(self.norm_m(x)))

    def _temporal(
        self,
        x: Tensor,
        t_rope: tuple[Tensor, Tensor],
        t_mask: Tensor,
        cache: KVCache | None,
        cache_layer: int,
        commit: bool | int,
        keep: int | None = None,
    ) -> Tensor:
        """Causal attention of every token position over its own history: (B, T, S, D) -> same, or the
        last ``keep`` frames' outputs (B, keep, S, D) (all frames' keys/values still computed)."""
        b, t, s, d = x.shape
        h = self.norm_t(x).transpose(1, 2).reshape(b * s, t, d)  # b t s d -> (b s) t d
        q, k, v = self.attn_t.project(h, t_rope)
        tq = t if keep is None else keep
        if keep is not None:
            q = q[:, :, t - keep :]  # (b s) H keep hd: only the kept frames query
        if cache is not None:
            k, v = cache.extend(cache_layer, k, v)
        h = self.attn_t.attend_out(q, k, v, t_mask)
        if cache is not None and commit:  # after attention: the commit may shift the buffer k, v view
            cache.write(cache_layer, k, v, _committed(commit, t))
        return h.reshape(b, s, tq, d).transpose(1, 2)  # (b s) tq d -> b tq s d


class SpaceTimeTransformer(nn.Module):
    """Factorised space/time transformer over x (B, T, S, D): T frames of S tokens.

    Layer i has spatial attention (within each frame, 1-D RoPE over token index, optional
    ``spatial_mask``) and, if ``(i + 1) % temporal_every == 0``, causal temporal attention: token
    position s of frame t attends position s of frames ``t - window + 1 .. t`` (RoPE over absolute frame
    index). A final RMSNorm is applied to the output.

    The window bounds each temporal layer; stacked, the receptive field is
    ``temporal_layers * (window - 1) + 1`` frames (frame t - window can still reach frame t through an
    intermediate frame's activations). Streaming with a :class:`KVCache` reproduces exactly this.

    Information flow is therefore fully described by ``spatial_mask`` (inside a frame) plus "same
    position, same or earlier frame" (across frames): a token position that no other position's query
    may attend in space can influence only itself.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.width // cfg.heads
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        every = max(1, cfg.temporal_every)
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(cfg, temporal=(i + 1) % every == 0) for i in range(cfg.depth)
        )
        self.temporal_layers = sum(int(b.temporal) for b in self.blocks)
        self.norm = RMSNorm(cfg.width)
        self.apply(self._init)
        # Scale residual-branch output projections so the residual stream's variance stays O(1) in depth.
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("w2.weight"):
                nn.init.trunc_normal_(p, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self, batch: int, window: int) -> KVCache:
        """An empty bounded cache for streaming ``batch`` sequences with a ``window``-frame context."""
        if window is None:
            raise ValueError("a KV cache needs a finite window (frames); None would grow without bound")
        return KVCache(batch, window, self.temporal_layers, self.cfg.kv_heads, self.head_dim)

    def forward(
        self,
        x: Tensor,
        spatial_mask: Tensor | None = None,
        window: int | None = None,
        cache: KVCache | None = None,
        t0: int | None = None,
        commit: bool | int = True,
        outputs: int | None = None,
    ) -> Tensor:
        """x (B, T, S, D) -> (B, T, S, D), or (B, outputs, S, D).

        spatial_mask: (S, S) bool, True = query token may attend key token (same for every frame).
        window: temporal context in frames (frame t sees t - window + 1 .. t); None = all earlier
            frames. With a cache it defaults to (and must equal) ``cache.window``.
        cache: a :class:`KVCache` from :meth:`new_cache`; x then holds only the new frame(s), which
            attend to the cached frames plus themselves (causally, within the window).
        t0: absolute frame index of x[:, 0] (RoPE and window). Default: ``cache.next_t`` with a cache,
            else 0. With a non-empty cache it must equal ``cache.next_t`` (frames are contiguous).
        commit: with a cache, append the new frames' keys/values (trimmed to the window) and advance
            ``cache.next_t``; False leaves the cache untouched (re-denoising the same frame); an int n
            commits only the first n new frames (a committed frame and the first denoising pass of the
            next one in one call: the later frames attend to it, and are not kept).
        outputs: compute only the last ``outputs`` frames' outputs (None: all). The earlier frames
            still run through every layer up to the last temporal layer's keys/values (cached, and
            attended by the later frames), but not beyond: a committed frame riding with the next
            frame's denoising pass skips that layer's temporal queries, its MLP and every layer after it
            when nothing reads its outputs. The kept frames' outputs equal those of the full forward.
        """
        b, t, s, d = x.shape
        dev = x.device
        if cache is not None:
            window = self._check_cache(cache, b, window, t0)
            t0 = cache.next_t if t0 is None else t0
            if cache.length == 0:
                cache.next_t = t0  # an empty cache may start at any absolute frame index
            cache._ensure(s, x)
            cache.reserve(t)
        t0 = 0 if t0 is None else t0
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame, got {window}")

        sp_rope, t_rope, t_mask = self._tables(s, t0, t, cache, window, dev)
        if spatial_mask is not None and spatial_mask.shape != (s, s):
            raise ValueError(f"spatial_mask must be ({s}, {s}), got {tuple(spatial_mask.shape)}")

        keep = None if outputs is None or outputs >= t else outputs
        if keep is not None and keep < 1:
            raise ValueError(f"outputs={outputs} must be >= 1 frame")
        last = max((i for i, blk in enumerate(self.blocks) if blk.temporal), default=-1)
        if keep is not None and last < 0:  # no temporal layer: frames never meet, drop the others now
            x, keep = x[:, t - keep :], None
        li = 0
        for i, blk in enumerate(self.blocks):
            if i == last and keep is not None:  # the last layer whose keys/values every frame needs
                rows = self._mask_rows(t_mask, keep)
                x = blk(x, sp_rope, spatial_mask, t_rope, rows, cache, li, commit, keep)
            else:
                x = blk(x, sp_rope, spatial_mask, t_rope, t_mask, cache, li, commit)
            li += int(blk.temporal)
        if cache is not None and commit:
            cache.advance(_committed(commit, t))
        return self.norm(x)

    def _tables(self, s: int, t0: int, t: int, cache: KVCache | None, window: int | None, dev: torch.device
                ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
        """Spatial RoPE tables (S, 1, hd), temporal ones (T, 1, hd) and the temporal mask (T, T_k).

        They depend only on their arguments, so they are memoised: streaming re-runs the same frame
        (K denoising passes, then the commit pass) and the spatial tables never change. Computed exactly
        as without the memo (same calls), so results are bit-identical. The key holds the autocast and
        inference-mode state: tables made under ``inference_mode`` must not meet autograd later. The
        tables are constants (no grad), shared by every call with the same key: never modify them.
        """
        flags = (dev, torch.is_autocast_enabled(dev.type), torch.is_inference_mode_enabled())
        hd, base = self.head_dim, self.cfg.rope_base
        memo = self.__dict__.setdefault("_memo", {})
        if len(memo) > 32:
            memo.clear()
        sp_key = ("spatial", s, *flags)
        if sp_key not in memo:
            c, sn = rope_tables(*rope_angles(torch.arange(s, device=dev), hd, base))
            memo[sp_key] = (c[:, None], sn[:, None])  # (S, 1, hd): broadcast over heads
        t_key = ("temporal", t0, t, *flags)  # RoPE rotates by absolute frame index
        if memo.get("temporal_key") != t_key:
            c, sn = rope_tables(*rope_angles(torch.arange(t0, t0 + t, device=dev), hd, base))
            memo["temporal_key"], memo["temporal"] = t_key, (c[:, None], sn[:, None])
        # The mask compares frame indices of queries (t0 .. t0 + t - 1) and keys (the cached frames just
        # before t0, then the queries): it depends on t, the cached length and the window, never on t0.
        m_key = ("mask", t, None if cache is None else cache.length, window, *flags)
        if m_key not in memo:
            q_pos = torch.arange(t0, t0 + t, device=dev)
            k_pos = q_pos if cache is None else torch.cat((cache.positions(dev), q_pos))
            with torch.inference_mode(False):  # a version-tracked tensor, so attend() memoises its bias
                memo[m_key] = temporal_mask(q_pos, k_pos, window)
        return memo[sp_key], memo["temporal"], memo[m_key]

    def _mask_rows(self, t_mask: Tensor, keep: int) -> Tensor:
        """The last ``keep`` query rows of a temporal mask (keep, T_k), memoised with the mask: attend()
        memoises its bias per mask tensor, so the same rows must come back as the same tensor."""
        memo = self.__dict__.setdefault("_memo", {})
        key = ("mask_rows", id(t_mask), keep)
        hit = memo.get(key)
        if hit is None or hit[0] is not t_mask:
            with torch.inference_mode(False):
                hit = memo[key] = (t_mask, t_mask[t_mask.shape[0] - keep :].clone())
        return hit[1]

    def _check_cache(self, cache: KVCache, batch: int, window: int | None, t0: int | None) -> int:
        if cache.batch != batch:
            raise ValueError(f"cache batch {cache.batch} != input batch {batch}")
        if cache.layers != self.temporal_layers:
            raise ValueError("cache was made for a different transformer")
        if window is not None and window != cache.window:
            raise ValueError(f"window {window} differs from the cache's window {cache.window}")
        if t0 is not None and cache.length and t0 != cache.next_t:
            raise ValueError(f"t0={t0} but the cache expects frame {cache.next_t} next")
        return cache.window
