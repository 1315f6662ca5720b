"""Seeded random draws that work on any device: the only place the code draws with a ``torch.Generator``.

A CPU ``torch.Generator`` cannot fill a CUDA tensor (torch refuses the call), yet the trainer keeps its
generator on the CPU so that checkpoints and resumes are device-independent. Every helper here therefore
draws on the generator's device (on the target device when there is no generator) and then moves the
result with ``.to(device)``. For a given seed the numbers are then the same whether the model runs on
the CPU or on CUDA, and on the CPU the draw is exactly the plain torch call, so seeded results do not
change. ``device=None`` leaves the result where it was drawn (the generator's device, else torch's
default device).

tests/test_rng.py fails if a draw with ``generator=`` anywhere else in the package bypasses these helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["randn", "rand", "randint", "randperm", "multinomial"]

Device = torch.device | str | None


def _source(generator: torch.Generator | None, device: Device) -> Device:
    """Where to draw: the generator's device when there is one, else the target device."""
    return generator.device if generator is not None else device


def _to(x: Tensor, device: Device) -> Tensor:
    return x if device is None else x.to(device)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
          device: Device = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal N(0, 1) samples of ``shape``, ``dtype``, on ``device``."""
    out = torch.randn(shape, generator=generator, device=_source(generator, device), dtype=dtype)
    return _to(out, device)


def rand(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
         device: Device = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform U[0, 1) samples of ``shape`` (``()`` for a scalar), ``dtype``, on ``device``."""
    out = torch.rand(shape, generator=generator, device=_source(generator, device), dtype=dtype)
    return _to(out, device)


def randint(high: int, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
            device: Device = None, low: int = 0) -> Tensor:
    """Integers uniform on {low, …, high − 1}, int64 of ``shape``, on ``device``."""
    out = torch.randint(low, high, shape, generator=generator, device=_source(generator, device))
    return _to(out, device)


def randperm(n: int, generator: torch.Generator | None = None, device: Device = None) -> Tensor:
    """A uniformly random permutation of {0, …, n − 1}, int64 (n,), on ``device``."""
    return _to(torch.randperm(n, generator=generator, device=_source(generator, device)), device)


def multinomial(probs: Tensor, num_samples: int, generator: torch.Generator | None = None,
                replacement: bool = False) -> Tensor:
    """Category indices drawn from the rows of ``probs`` (n,) or (R, n) -> int64 (num_samples,) or
    (R, num_samples), on ``probs.device``; rows need not sum to one (non-negative weights)."""
    src = _source(generator, probs.device)
    out = torch.multinomial(probs.to(src), num_samples, replacement, generator=generator)
    return out.to(probs.device)
