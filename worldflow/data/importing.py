"""Turning a user's video files into episodes: find, fit to a square frame, resample in time, split.

The pieces ``worldflow import`` is built from (issue 16). Each is a pure function on paths or arrays, so
the importer's behaviour (which files, which pixels, which frames) is tested without decoding anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worldflow.errors import InputError

__all__ = ["VIDEO_SUFFIXES", "find_videos", "fit_frames", "resample_indices", "split_episodes"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")


def find_videos(sources: Iterable[str | Path]) -> list[Path]:
    """Video files among ``sources``: files as given, folders searched recursively (sorted, so the order
    and hence the episode numbering never depend on the file system). InputError for a path that does not
    exist, a file that is not a video, or sources holding no video at all."""
    found: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found += sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif src.is_file():
            if src.suffix.lower() not in VIDEO_SUFFIXES:
                raise InputError(f"{src} is not a video file (expected one of {', '.join(VIDEO_SUFFIXES)})")
            found.append(src)
        else:
            raise InputError(f"{src} does not exist")
    if not found:
        raise InputError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {', '.join(map(str, sources))}")
    return list(dict.fromkeys(found))  # a file named twice is imported once


def fit_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, size, size, 3): resize so the short side is ``size`` (area-averaging
    when shrinking, bilinear when growing), then crop the centre square. Aspect ratio is kept."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if (nh, nw) != (h, w):
        mode = "area" if scale < 1 else "bilinear"
        x = F.interpolate(x, size=(nh, nw), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def resample_indices(n_frames: int, src_fps: float, dst_fps: float | None) -> np.ndarray:
    """Source frame indices for a clip of ``n_frames`` at ``src_fps`` shown at ``dst_fps``: output frame k
    is the source frame on screen at time k / dst_fps (nearest earlier frame). ``None`` keeps every frame.
    Dropping frames speeds nothing up: the clip keeps its duration."""
    if dst_fps is None:
        return np.arange(n_frames)
    if src_fps <= 0 or dst_fps <= 0:
        raise InputError(f"frame rates must be > 0, got source {src_fps}, target {dst_fps}")
    duration = n_frames / src_fps
    k = np.arange(int(np.floor(duration * dst_fps + 1e-9)))
    return np.minimum(np.floor(k * src_fps / dst_fps + 1e-9).astype(np.int64), n_frames - 1)


def split_episodes(n_frames: int, episode_len: int, min_len: int = 2) -> list[slice]:
    """Consecutive episodes of at most ``episode_len`` frames covering ``n_frames``; a last piece shorter
    than ``min_len`` is dropped (it holds no transition a model could learn from)."""
    if episode_len < 2:
        raise InputError(f"--episode-len must be at least 2 frames, got {episode_len}")
    out = [slice(s, min(s + episode_len, n_frames)) for s in range(0, n_frames, episode_len)]
    return [s for s in out if s.stop - s.start >= min_len]
