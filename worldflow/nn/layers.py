"""Norms, the SwiGLU MLP and rotary position embeddings (RoPE): the per-token pieces of every block.

Channel-last tensors throughout. Blocks follow Dreamer 4's efficient transformer (pre-RMSNorm, SwiGLU, RoPE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------
# Norms and MLP


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """``x / rms(x)`` over the last dim (times ``weight`` if given): (..., dim) -> (..., dim).

    Statistics in float32 so bf16 activations normalise accurately; in fp32 inference torch's fused
    kernel (one op instead of five, same formula). Training keeps the explicit formula.
    """
    if x.dtype == torch.float32 and not torch.is_grad_enabled():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


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
        return rms_norm(x, self.eps, self.weight)


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
