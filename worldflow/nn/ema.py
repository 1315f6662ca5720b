"""An exponential moving average of a module's parameters, kept as buffers so checkpoints carry it.

θ̄ ← δ·θ̄ + (1 − δ)·θ after every optimiser step, as Shortcut Models (Frans et al. 2024) and most diffusion
models keep it: the average sits nearer the centre of the last steps' wandering than θ does, so its
samples are usually cleaner, and it changes slowly enough to serve as a bootstrap target.

The average lives in buffers of the owning module, so ``state_dict`` / strict loading, atomic checkpoints
and exact resume need nothing extra. :meth:`EMAWeights.params` gives it in the shape
:func:`torch.func.functional_call` takes, so a forward pass with the averaged weights needs no copy of
the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")  # buffer names cannot hold dots


class EMAWeights(nn.Module):
    """The EMA of ``model``'s parameters (captured at construction: build it after every parameter).

    decay δ in (0, 1). The average starts equal to the parameters (no bias correction: the first steps
    weigh the initial weights, which is what a bootstrap target wants early on).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        for n, p in model.named_parameters():
            self.register_buffer(_buffer_name(n), p.detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← δ·θ̄ + (1 − δ)·θ for every parameter of ``model`` (the module it was built from)."""
        for n, p in model.named_parameters():
            getattr(self, _buffer_name(n)).lerp_(p.detach(), 1.0 - self.decay)

    def params(self) -> dict[str, Tensor]:
        """{parameter name: averaged tensor}, for ``torch.func.functional_call(model, ema.params(), ...)``."""
        return {n: getattr(self, _buffer_name(n)) for n in self.names}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the average (inference with the EMA weights)."""
        for n, p in model.named_parameters():
            p.copy_(getattr(self, _buffer_name(n)))
