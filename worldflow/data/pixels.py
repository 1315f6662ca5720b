"""Pixel scales: frames are uint8 [0, 255] on disk and in datasets, float [0, 1] in metrics and videos,
float [-1, 1] inside the tokenizer. Shapes are kept; every function takes either kind of input."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_unit", "to_signed", "to_uint8", "to_uint8_numpy"]


def to_unit(frames: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] frames -> float32 [0, 1]."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def to_signed(frames: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] frames -> float32 [-1, 1]."""
    return to_unit(frames) * 2.0 - 1.0


def to_uint8(frames: Tensor) -> Tensor:
    """uint8 or float [0, 1] frames -> uint8 [0, 255] (floats clamped, then rounded)."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def to_uint8_numpy(frames: Tensor | np.ndarray) -> np.ndarray:
    """uint8 or float [0, 1] frames, tensor or array -> a uint8 numpy array (for video writers)."""
    if not torch.is_tensor(frames):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    return to_uint8(frames.detach().cpu()).numpy()
