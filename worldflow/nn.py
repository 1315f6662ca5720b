"""Transformer building blocks shared by the tokenizer and the dynamics model.

Everything here works on channel-last tensors. Attention tensors use the layout ``(batch, heads, length,
head_dim)`` of :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA).

Blocks (DESIGN §5): pre-RMSNorm, SwiGLU MLP, rotary position embeddings (RoPE), QK-norm, attention
logit soft-capping and grouped-query attention (GQA). :class:`SpaceTimeTransformer` stacks them into a
factorised space/time transformer: spatial attention inside every frame in every layer, causal temporal
attention (per token position, sliding window) every ``temporal_every``-th layer, and a bounded
:class:`KVCache` so streaming one frame at a time equals a whole-sequence forward with the same window.

Mask convention everywhere: boolean, ``True`` = the query may attend the key (as in SDPA).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflow.config import TransformerConfig

__all__ = [
    "RMSNorm",
    "SwiGLU",
    "swiglu_hidden",
    "rope_angles",
    "apply_rope",
    "rope_tables",
    "rotate",
    "softcap_logits",
    "attend",
    "Attention",
    "KVCache",
    "SpaceTimeBlock",
    "SpaceTimeTransformer",
    "temporal_mask",
]

# SDPA grew ``enable_gqa`` in torch 2.5; older versions get kv heads repeated explicitly.
_SDPA_HAS_GQA = torch.__version__ >= (2, 5)  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------------
# Norms and MLP


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned gain: ``x / rms(x) * g``.

    Statistics are computed in float32 so bf16 activations normalise accurately.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim)."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def swiglu_hidden(width: int, mlp_ratio: float, multiple: int = 8) -> int:
    """SwiGLU hidden size: ``mlp_ratio * width * 2/3`` (matches a GELU MLP's parameter count), rounded
    up to a multiple of ``multiple`` for friendlier matmul shapes."""
    h = int(mlp_ratio * width * 2 / 3)
    return max(multiple, multiple * math.ceil(h / multiple))


class SwiGLU(nn.Module):
    """``W2 (silu(W1 x) * W3 x)``; W1 and W3 are fused into one matmul."""

    def __init__(self, width: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden = swiglu_hidden(width, mlp_ratio)
        self.w13 = nn.Linear(width, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., width) -> (..., width)."""
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_angles(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cos/sin tables for RoPE.

    positions: (L,) integer or float positions (absolute frame or token indices). dim: the rotated
    (head) dim, even. Returns ``(cos, sin)``, each (L, dim // 2) float32. Angles are formed in float64
    so very long rollouts (positions ~1e6) keep accurate phases.
    """
    if dim % 2:
        raise ValueError(f"RoPE needs an even dim, got {dim}")
    ang = positions.to(torch.float64)[:, None] * _inv_freq(dim, base, positions.device)[None, :]
    return ang.cos().float(), ang.sin().float()


_INV_FREQ: dict[tuple[int, float, torch.device], Tensor] = {}


def _inv_freq(dim: int, base: float, device: torch.device) -> Tensor:
    """RoPE frequencies ``base ** (-(0, 2, 4, ...) / dim)`` (dim // 2,) float64, memoised (a constant)."""
    key = (dim, float(base), device)
    if key not in _INV_FREQ:
        with torch.inference_mode(False):  # usable in and out of inference mode
            _INV_FREQ[key] = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return _INV_FREQ[key]


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Half tables (L, dim/2) -> full-width tables (L, dim) for :func:`rotate`: C = [cos, cos],
    S = [-sin, sin]."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """RoPE with full-width tables from :func:`rope_tables`: ``x * C + roll(x, dim/2) * S``.

    Same result as :func:`apply_rope` in four elementwise ops (no split/concat of x); the tables must
    broadcast against x (e.g. (L, 1, dim) for x laid out (N, L, heads, dim)).
    """
    return x * c.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * s.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., L, dim) by the tables (L, dim // 2) from :func:`rope_angles`.

    Half-split convention (GPT-NeoX): dimension i is paired with i + dim/2, i.e.
    ``[x1 cos - x2 sin, x1 sin + x2 cos]`` for ``x = [x1, x2]``.
    """
    return rotate(x, *rope_tables(cos, sin))


# ---------------------------------------------------------------------------------------------------
# Attention kernel


def softcap_logits(logits: Tensor, cap: float) -> Tensor:
    """Attention logit soft-capping ``cap * tanh(logits / cap)`` (identity when cap <= 0)."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _as4d(mask: Tensor) -> Tensor:
    """Left-pad a broadcastable mask to 4 dims (B|1, H|1, Lq, Lk)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


# Values derived from a mask, memoised per mask tensor: every layer of a stack attends with the same spatial
# (and temporal) mask, and streaming re-runs one frame with the same masks K + 1 times. Keyed by identity,
# validated by a weak reference and the version counter (an in-place change invalidates); only small,
# version-tracked masks are memoised (inference tensors have no version counter).
_MASK_MEMO: dict[int, tuple[weakref.ref, int, dict[Any, Any]]] = {}
_MASK_MEMO_NUMEL = 1 << 14


def _mask_memo(mask: Tensor) -> dict[Any, Any] | None:
    """The memo dict of ``mask`` (empty on first use), or None for a mask that is not memoised."""
    if mask.numel() > _MASK_MEMO_NUMEL or mask.is_inference():
        return None
    hit = _MASK_MEMO.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    if len(_MASK_MEMO) >= 64:
        _MASK_MEMO.clear()
    memo: dict[Any, Any] = {}
    _MASK_MEMO[id(mask)] = (weakref.ref(mask), mask._version, memo)
    return memo


def _mask_bias(mask: Tensor, h: int, hkv: int, dtype: torch.dtype, memo: dict[Any, Any] | None) -> Tensor:
    """Additive float bias (0 / -inf) of a bool mask, laid out for the grouped logits (B, Hkv, G, Lq, Lk)."""
    key = ("bias", h, hkv, dtype, torch.is_inference_mode_enabled())
    if memo is not None and key in memo:
        return memo[key]
    g = h // hkv
    m = _as4d(mask)
    m = m.reshape(m.shape[0], hkv, g, *m.shape[2:]) if m.shape[1] == h and h > 1 else m.unsqueeze(2)
    bias = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    if memo is not None:
        memo[key] = bias
    return bias


def _attend_explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, softcap: float,
                     memo: dict[Any, Any] | None = None) -> Tensor:
    """Reference/soft-cap path: logits materialised, capped, masked, softmaxed (float32).

    GQA without copying kv: q is viewed as (B, Hkv, G, Lq, hd) so each group of G query heads
    multiplies its shared kv head by broadcasting.
    """
    b, h, lq, hd = q.shape
    hkv = k.shape[1]
    g = h // hkv
    # Fold the 1/sqrt(hd) (and 1/cap) scale into q: q is smaller than the (Lq, Lk) logits.
    q5 = q.reshape(b, hkv, g, lq, hd) * (hd**-0.5 / (softcap if softcap > 0 else 1.0))
    logits = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)).float()  # (B, Hkv, G, Lq, Lk)
    if softcap > 0:
        logits = torch.tanh(logits)
    bias = None if mask is None else _mask_bias(mask, h, hkv, logits.dtype, memo)
    cap = softcap if softcap > 0 else 1.0
    if bias is not None:  # one op for both "* cap" and "+ mask bias"
        logits = torch.add(bias, logits, alpha=cap)
    elif softcap > 0:
        logits = logits * cap
    probs = logits.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v.unsqueeze(2)).reshape(b, h, lq, hd)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attend_xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """xformers memory-efficient attention (CUDA only; imported lazily). Takes (B, L, H, hd)."""
    import xformers.ops as xops  # noqa: PLC0415  (optional dependency)

    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    bias = None
    if mask is not None:
        b, h, lq, _ = q.shape
        full = _as4d(mask).expand(b, h, lq, k.shape[2])
        bias = torch.zeros(full.shape, dtype=q.dtype, device=q.device).masked_fill(~full, float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)
    return out.transpose(1, 2)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with optional GQA, boolean mask and logit soft-capping.

    q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd) with Hkv dividing H (query head h uses kv head
    h // (H / Hkv)). mask: bool, broadcastable to (B, H, Lq, Lk), True = may attend. Returns (B, H, Lq, hd).

    Paths:
    - ``softcap > 0`` or ``backend == "math"``: logits are computed explicitly (SDPA has no hook for a
      tanh on the logits, so capping cannot use a fused kernel; this path costs an (Lq, Lk) logit tensor
      per head).
    - otherwise SDPA (fused flash / memory-efficient kernels where torch has them, CPU included).
    - ``backend == "xformers"``: xformers, only on CUDA tensors; on CPU it silently falls back to SDPA.
    Query rows whose mask is all False output zeros (softmax over nothing would be NaN).
    """
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({h})")
    row_ok, memo = None, None
    if mask is not None:
        memo = _mask_memo(mask)
        if memo is None or not memo.get("rows_ok", False):
            row_ok = mask.any(dim=-1, keepdim=True)  # (..., Lq, 1)
            if bool(row_ok.all()):
                row_ok = None
                if memo is not None:
                    memo["rows_ok"] = True  # every query row may attend something: nothing to fix
            else:  # let empty rows attend everything (finite result), then zero them below
                mask, memo = mask | ~row_ok, None
    if softcap > 0 or backend == "math":
        out = _attend_explicit(q, k, v, mask, softcap, memo)
    elif backend == "xformers" and q.is_cuda:
        out = _attend_xformers(q, k, v, mask)
    else:
        out = _attend_sdpa(q, k, v, mask)
    if row_ok is not None:
        out = out * _as4d(row_ok).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Attention layer


class Attention(nn.Module):
    """Multi-head attention with QK-norm, RoPE, GQA and soft-capping over sequences (N, L, D).

    The caller supplies the RoPE tables and mask, so the same module serves spatial attention (RoPE
    over token index) and temporal attention (RoPE over absolute frame index, plus cached keys).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} not divisible by heads {cfg.heads}")
        if cfg.heads % cfg.kv_heads:
            raise ValueError(f"kv_heads {cfg.kv_heads} must divide heads {cfg.heads}")
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.width // cfg.heads
        self.softcap, self.backend = cfg.softcap, cfg.backend
        self.qkv = nn.Linear(cfg.width, (cfg.heads + 2 * cfg.kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # their gains are applied fused in project()
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, L, D), rope = full tables (L, 1, hd) from :func:`rope_tables` ->
        q (N, H, L, hd), k and v (N, Hkv, L, hd); q and k RMS-normed per head and rotated.

        q and k are normed and rotated together (one set of elementwise ops instead of two).
        """
        n, length, _ = x.shape
        hq = self.heads + self.kv_heads
        qkv = self.qkv(x).view(n, length, hq + self.kv_heads, self.head_dim)
        qk, v = qkv.split([hq, self.kv_heads], dim=2)
        if self.qk_norm:
            w = torch.cat((self.q_norm.weight.expand(self.heads, -1),
                           self.k_norm.weight.expand(self.kv_heads, -1)))
            qkf = qk.float()
            qk = (qkf * torch.rsqrt(qkf.pow(2).mean(-1, keepdim=True) + self.q_norm.eps)).to(qk.dtype) * w
        qk = rotate(qk, *rope)
        q, k = qk.split([self.heads, self.kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend_out(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention over given (possibly cache-extended) k/v, then output projection -> (N, L, D)."""
        o = attend(q, k, v, mask, self.softcap, self.backend)
        n, h, length, hd = o.shape
        return self.out(o.transpose(1, 2).reshape(n, length, h * hd))  # n h l d -> n l (h d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """Self-attention: x (N, L, D), cos/sin (L, hd/2) from :func:`rope_angles`, mask (L, L) or
        broadcastable -> (N, L, D)."""
        c, s = rope_tables(cos, sin)
        q, k, v = self.project(x, (c[:, None], s[:, None]))
        return self.attend_out(q, k, v, mask)


# ---------------------------------------------------------------------------------------------------
# KV cache for temporal layers


class KVCache:
    """Keys/values of the last ``window - 1`` committed frames for every temporal layer.

    Buffers are allocated once, at the first forward that uses the cache, with shape
    (batch * tokens, kv_heads, window - 1, head_dim) per temporal layer; they never grow, so memory is
    constant however long a rollout runs. Keys are stored already rotated (RoPE with their absolute
    frame index), so a cached frame never needs recomputation. Cached values are detached: the cache is
    an inference device, gradients never flow into earlier committed frames.

    ``next_t`` is the absolute index of the next frame to be committed; ``length`` the number of frames
    currently held (<= window - 1). ``reset()`` empties it and keeps the buffers.
    """

    def __init__(self, batch: int, window: int, layers: int, kv_heads: int, head_dim: int):
        if window < 1:
            raise ValueError(f"cache window must be >= 1 frame, got {window}")
        self.batch, self.window, self.layers = batch, window, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.length = 0
        self.next_t = 0
        self.tokens: int | None = None

    @property
    def capacity(self) -> int:
        """Frames the cache can hold: window - 1 (the current frame is always computed fresh)."""
        return self.window - 1

    def reset(self) -> None:
        self.length = 0
        self.next_t = 0

    def _ensure(self, tokens: int, like: Tensor) -> None:
        if self.tokens is None:
            shape = (self.batch * tokens, self.kv_heads, self.capacity, self.head_dim)
            self.k = [like.new_zeros(shape) for _ in range(self.layers)]
            self.v = [like.new_zeros(shape) for _ in range(self.layers)]
            self.tokens = tokens
        elif tokens != self.tokens:
            raise ValueError(f"cache was built for {self.tokens} tokens per frame, got {tokens}")

    def positions(self, device: torch.device) -> Tensor:
        """Absolute frame indices of the cached frames (length,), oldest first."""
        return torch.arange(self.next_t - self.length, self.next_t, device=device)

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Cached (k, v) of one temporal layer, each (batch * tokens, Hkv, length, hd)."""
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def write(self, layer: int, k_all: Tensor, v_all: Tensor) -> None:
        """Store the newest ``capacity`` frames of (cached + new) keys/values of one layer."""
        keep = min(k_all.shape[2], self.capacity)
        if keep:
            self.k[layer][:, :, :keep].copy_(k_all[:, :, -keep:].detach())
            self.v[layer][:, :, :keep].copy_(v_all[:, :, -keep:].detach())

    def advance(self, frames: int) -> None:
        """Account for ``frames`` newly committed frames (after every layer has written)."""
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
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine.index_copy_(0, idx.to(mine.device), theirs.to(mine.device, mine.dtype))


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
        commit: bool,
    ) -> Tensor:
        """x (B, T, S, D) -> (B, T, S, D)."""
        b, t, s, d = x.shape
        h = self.norm_s(x).reshape(b * t, s, d)  # b t s d -> (b t) s d
        q, k, v = self.attn_s.project(h, sp_rope)
        h = self.attn_s.attend_out(q, k, v, sp_mask)
        x = x + self._drop(h.reshape(b, t, s, d))
        if self.temporal:
            x = x + self._drop(self._temporal(x, t_rope, t_mask, cache, cache_layer, commit))
        return x + self._drop(self.mlp(self.norm_m(x)))

    def _temporal(
        self,
        x: Tensor,
        t_rope: tuple[Tensor, Tensor],
        t_mask: Tensor,
        cache: KVCache | None,
        cache_layer: int,
        commit: bool,
    ) -> Tensor:
        """Causal attention of every token position over its own history: (B, T, S, D) -> same."""
        b, t, s, d = x.shape
        h = self.norm_t(x).transpose(1, 2).reshape(b * s, t, d)  # b t s d -> (b s) t d
        q, k, v = self.attn_t.project(h, t_rope)
        if cache is not None:
            ck, cv = cache.get(cache_layer)
            k, v = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
            if commit:
                cache.write(cache_layer, k, v)
        h = self.attn_t.attend_out(q, k, v, t_mask)
        return h.reshape(b, s, t, d).transpose(1, 2)  # (b s) t d -> b t s d


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
        commit: bool = True,
    ) -> Tensor:
        """x (B, T, S, D) -> (B, T, S, D).

        spatial_mask: (S, S) bool, True = query token may attend key token (same for every frame).
        window: temporal context in frames (frame t sees t - window + 1 .. t); None = all earlier
            frames. With a cache it defaults to (and must equal) ``cache.window``.
        cache: a :class:`KVCache` from :meth:`new_cache`; x then holds only the new frame(s), which
            attend to the cached frames plus themselves (causally, within the window).
        t0: absolute frame index of x[:, 0] (RoPE and window). Default: ``cache.next_t`` with a cache,
            else 0. With a non-empty cache it must equal ``cache.next_t`` (frames are contiguous).
        commit: with a cache, append the new frames' keys/values (trimmed to the window) and advance
            ``cache.next_t``; False leaves the cache untouched (re-denoising the same frame).
        """
        b, t, s, d = x.shape
        dev = x.device
        if cache is not None:
            window = self._check_cache(cache, b, window, t0)
            t0 = cache.next_t if t0 is None else t0
            if cache.length == 0:
                cache.next_t = t0  # an empty cache may start at any absolute frame index
            cache._ensure(s, x)
        t0 = 0 if t0 is None else t0
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame, got {window}")

        sp_rope, t_rope, t_mask = self._tables(s, t0, t, cache, window, dev)
        if spatial_mask is not None and spatial_mask.shape != (s, s):
            raise ValueError(f"spatial_mask must be ({s}, {s}), got {tuple(spatial_mask.shape)}")

        li = 0
        for blk in self.blocks:
            x = blk(x, sp_rope, spatial_mask, t_rope, t_mask, cache, li, commit)
            li += int(blk.temporal)
        if cache is not None and commit:
            cache.advance(t)
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
