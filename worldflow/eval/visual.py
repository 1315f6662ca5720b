"""What people look at: ground truth | prediction | difference videos, and metric plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from worldflow.data.pixels import to_uint8_numpy
from worldflow.data.video import tile_videos, write_mp4_and_gif


def comparison_video(truth: torch.Tensor, pred: torch.Tensor, context: int = 0) -> np.ndarray:
    """One grid video: a row per clip with ground truth | prediction | |difference| (amplified x2).

    truth, pred: (B, T, H, W, 3) uint8 or float [0, 1]. The first ``context`` frames of the prediction
    are shown as given (they are the conditioning frames) and framed by a thin green border; predicted
    frames get a red border so a viewer can tell them apart. Returns uint8 (T, H', W', 3).
    """
    gt, pr = to_uint8_numpy(truth), to_uint8_numpy(pred)
    diff = np.clip(np.abs(gt.astype(np.int16) - pr.astype(np.int16)) * 2, 0, 255).astype(np.uint8)
    pr = pr.copy()
    if context > 0:
        _border(pr[:, :context], (0, 200, 0))
    _border(pr[:, context:], (220, 0, 0))
    cells = []
    for b in range(gt.shape[0]):
        cells += [gt[b], pr[b], diff[b]]
    return tile_videos(cells, cols=3)


def _border(v: np.ndarray, color: tuple[int, int, int]) -> None:
    if v.size == 0:
        return
    v[..., 0, :, :] = color
    v[..., -1, :, :] = color
    v[..., :, 0, :] = color
    v[..., :, -1, :] = color


def write_media(video: np.ndarray, path: str | Path, fps: int = 8, scale: int = 2) -> tuple[Path, Path]:
    """Write ``<path>.mp4`` and ``<path>.gif`` (upscaled so small frames are viewable).

    In a multi-process run only rank 0 writes (every rank may run the same evaluation)."""
    from worldflow.distributed import is_main

    if not is_main():
        p = Path(path)
        return p.with_name(p.name + ".mp4"), p.with_name(p.name + ".gif")
    return write_mp4_and_gif(path, video, fps=fps, scale=scale)


def plot_curves(path: str | Path, curves: Mapping[str, Mapping[int, float] | Sequence[float]],
                xlabel: str, ylabel: str, title: str = "", logx: bool = True) -> Path:
    """Line plot of named curves (each a map x -> y) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for name, curve in curves.items():
        items = sorted((float(k), float(v)) for k, v in dict(curve).items())
        ax.plot([x for x, _ in items], [y for _, y in items], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
