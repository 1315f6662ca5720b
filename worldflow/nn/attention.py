"""Attention: the kernel (masks, soft-capping, GQA over SDPA / explicit / xformers) and the layer.

Attention tensors use the layout ``(batch, heads, length, head_dim)`` of
:func:`torch.nn.functional.scaled_dot_product_attention` (SDPA). Mask convention: boolean, ``True`` = the
query may attend the key (as in SDPA).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflow.config import TransformerConfig
from worldflow.nn.layers import RMSNorm, rms_norm, rope_tables, rotate

# SDPA grew ``enable_gqa`` in torch 2.5; older versions get kv heads repeated explicitly.
_SDPA_HAS_GQA = torch.__version__ >= (2, 5)  # type: ignore[operator]


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

    GQA without copying kv: the G query heads sharing a kv head are stacked along the query axis, q viewed
    as (B, Hkv, G * Lq, hd), so each kv head is multiplied once by one (G * Lq, hd) matrix. (Broadcasting k
    over a G axis instead made matmul copy k G times and run G times as many tiny products: streaming's
    one-query temporal attention (Lq = 1) ran 3.3x slower that way, AVX-512, 2026-12-04.)
    """
    b, h, lq, hd = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    # Fold the 1/sqrt(hd) (and 1/cap) scale into q: q is smaller than the (Lq, Lk) logits.
    q4 = q.reshape(b, hkv, g * lq, hd) * (hd**-0.5 / (softcap if softcap > 0 else 1.0))
    logits = torch.matmul(q4, k.transpose(-1, -2)).float().view(b, hkv, g, lq, lk)  # (B, Hkv, G, Lq, Lk)
    if softcap > 0:
        logits = torch.tanh(logits)
    bias = None if mask is None else _mask_bias(mask, h, hkv, logits.dtype, memo)
    cap = softcap if softcap > 0 else 1.0
    if bias is not None:  # one op for both "* cap" and "+ mask bias"
        logits = torch.add(bias, logits, alpha=cap)
    elif softcap > 0:
        logits = logits * cap
    probs = logits.softmax(dim=-1).to(v.dtype).reshape(b, hkv, g * lq, lk)
    return torch.matmul(probs, v).reshape(b, h, lq, hd)  # (B, Hkv, G * Lq, hd) -> (B, H, Lq, hd)


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
            qk = rms_norm(qk, self.q_norm.eps) * w
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
