"""``worldflow import``: turn a user's video files into an action-free worldflow dataset (issue 16).

Each video is decoded (decord, PyAV fallback, through :class:`~worldflow.data.video.VideoReader`),
resampled in time to the dataset's frame rate, fitted to square ``size`` × ``size`` frames (short side
resized, centre cropped), cut into episodes of at most ``episode_len`` frames and stored lossless, like
collected episodes, in a dataset whose manifest has ``"action_space": null`` (no actions, no rewards; see
docs/data.md, "Action-free datasets").

The pieces (:func:`find_videos`, :func:`fit_frames`, :func:`resample_indices`, :func:`split_episodes`)
are pure functions on paths or arrays, so which files, which pixels and which frames are tested without
decoding anything; :func:`import_videos` puts them together. A file that cannot be decoded is skipped and
named (in the returned summary and in the manifest's ``skipped`` list), never dropped silently.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worldflow.argtypes import positive_float, positive_int
from worldflow.errors import InputError, one_line

__all__ = [
    "VIDEO_SUFFIXES",
    "ImportSummary",
    "find_videos",
    "fit_frames",
    "import_videos",
    "resample_indices",
    "split_episodes",
]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
DEFAULT_EPISODE_LEN = 1024  # a held-out episode then holds a context of 8 plus a 1000-frame rollout

# Source pixels decoded at once (uint8 H*W*3 per frame): fit_frames works in float32, so the peak is
# about 5x this. A 64x64 source decodes a whole episode per chunk, a 1080p one ~5 frames.
_DECODE_BYTES = 32 * 2**20
_REASON_CHARS = 300  # a skipped file's reason, on one line, in the summary and the manifest


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


# ---------------------------------------------------------------------------------------------------
# Decoding one source video


def _fps_value(fps: float) -> int | float:
    """A frame rate as stored in the manifest: an int when it is integral (30, not 30.0), else the float."""
    x = float(fps)
    return int(x) if x.is_integer() else x


def _source_fps(path: Path, num_frames: int) -> float | None:
    """The average frame rate the container states, or None when it states none.

    GIF frame durations may vary from frame to frame (and are stored in 1/100 s): their rate is the
    average, frames / total duration, and resampling treats the GIF as if played at that constant rate.
    Other containers give their average rate directly (PyAV ``average_rate``; decord ``get_avg_fps`` when
    PyAV cannot open the file).
    """
    try:
        import av

        with av.open(str(path)) as c:
            s = c.streams.video[0]
            if path.suffix.lower() == ".gif":
                seconds = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
                if seconds > 0:
                    return num_frames / seconds
            rate = s.average_rate or s.guessed_rate
            return float(rate) if rate else None
    except Exception:
        pass
    try:
        import decord

        fps = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_avg_fps()
        return float(fps) if fps and fps > 0 else None
    except Exception:
        return None


class _ForwardReader:
    """Frames of a video in decode order with PyAV, forwards only: ``get_batch`` takes non-decreasing
    indices (repeats allowed, as upsampling makes), each call continuing where the last one stopped.

    Index = position in decode order, never a timestamp. VideoReader's PyAV backend places frames by
    timestamp at a constant rate, which fails on files whose frame durations vary (GIFs often do), and
    decord cannot copy out frames of some widths (see worldflow.data.video); in one forward pass
    neither matters, and an import reads every file front to back anyway.
    """

    def __init__(self, path: Path):
        import av

        from worldflow.data.video import VideoDecodeError

        self.path, self._container = path, None
        try:
            with av.open(str(path)) as c:  # count first: stream.frames is 0 in some containers (webm)
                if not c.streams.video:
                    raise VideoDecodeError(f"{path}: no video stream")
                s = c.streams.video[0]
                self._len = s.frames or sum(1 for p in c.demux(s) if p.size > 0)
            self._container = av.open(str(path))
            self._iter = self._container.decode(self._container.streams.video[0])
            self._index, self._frame, self._rgb = -1, None, None
            self._advance()  # decode frame 0 now, so an undecodable file fails here
        except Exception as e:  # PyAV's FFmpegError family
            self.close()
            if isinstance(e, VideoDecodeError):
                raise
            raise VideoDecodeError(f"cannot decode {path} (PyAV): {type(e).__name__}: {e}") from e

    def _advance(self) -> None:
        from worldflow.data.video import VideoDecodeError

        frame = next(self._iter, None)
        if frame is None:
            raise VideoDecodeError(f"{self.path}: the stream ended after {self._index + 1} of {self._len} "
                                   "frames")
        self._index, self._frame, self._rgb = self._index + 1, frame, None

    def __len__(self) -> int:
        return self._len

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB frames at ``indices`` (non-decreasing, and not before the last call's)."""
        from worldflow.data.video import VideoDecodeError

        out = []
        try:
            for i in np.asarray(indices).tolist():
                if i < self._index:
                    raise ValueError(f"_ForwardReader reads forwards only: frame {i} after {self._index}")
                while self._index < i:
                    self._advance()
                if self._rgb is None:
                    self._rgb = self._frame.to_ndarray(format="rgb24")
                out.append(self._rgb)
        except (VideoDecodeError, ValueError):
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot decode frame {self._index + 1} of {self.path} (PyAV): {e}") from e
        if len({f.shape for f in out}) > 1:
            raise VideoDecodeError(f"{self.path}: the frame size changes within the stream")
        return np.stack(out)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class _SourceVideo:
    """One user video opened for import: ``num_frames``, ``fps`` (None if unknown), ``frame_hw`` and
    :meth:`frames` at non-decreasing source indices.

    Reads through :class:`~worldflow.data.video.VideoReader` (decord, PyAV fallback) and switches to a
    :class:`_ForwardReader` when that cannot open or decode the file; GIFs go to the forward reader
    directly (see its docstring for why). Raises VideoDecodeError when neither can decode frame 0.
    """

    def __init__(self, path: Path, backend: str = "auto"):
        from worldflow.data.video import VideoDecodeError, VideoReader

        self.path = path
        self._reader: Any = None
        first_error: Exception | None = None
        if path.suffix.lower() != ".gif":
            reader = VideoReader(path, backend=backend)
            try:
                self.num_frames = len(reader)
                probe = reader.get_batch([0])
                self._reader = reader
            except VideoDecodeError as e:
                reader.close()
                first_error = e
        if self._reader is None:
            try:
                self._reader = _ForwardReader(path)
            except VideoDecodeError as e:
                raise (first_error or e) from None  # the first backend's message names both
            self.num_frames = len(self._reader)
            probe = self._reader.get_batch(np.array([0]))
        self.frame_hw = probe.shape[1:3]
        self.fps = _source_fps(path, self.num_frames)

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) source frames at ``indices`` (non-decreasing across calls)."""
        from worldflow.data.video import VideoDecodeError

        try:
            return self._reader.get_batch(indices)
        except VideoDecodeError:
            if isinstance(self._reader, _ForwardReader):
                raise
            # e.g. VideoReader's PyAV backend on a file whose frame durations vary: read on in decode
            # order instead (decoding forward from frame 0 to where we are).
            self._reader.close()
            self._reader = _ForwardReader(self.path)
            return self._reader.get_batch(indices)

    def __enter__(self) -> _SourceVideo:
        return self

    def __exit__(self, *exc) -> None:
        if self._reader is not None:
            self._reader.close()


def _fitted(video: _SourceVideo, indices: np.ndarray, size: int) -> np.ndarray:
    """uint8 (len(indices), size, size, 3): the source frames at ``indices``, decoded and fitted a few at
    a time (at most ``_DECODE_BYTES`` of source pixels), so a long HD video never sits in memory."""
    h, w = video.frame_hw
    step = max(1, _DECODE_BYTES // (h * w * 3))
    return np.concatenate([fit_frames(video.frames(indices[i : i + step]), size)
                           for i in range(0, len(indices), step)])


# ---------------------------------------------------------------------------------------------------
# Importing


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_videos` did.

    files_imported: source files with at least one episode written. episodes_written, frames_written:
    new episodes and their frames (T+1 each). skipped: (file, reason) of every file left out, or cut
    short by a decode error, in this import. fps: the dataset's frame rate. root: the dataset directory;
    dataset_episodes: how many episodes it holds now.
    """

    files_imported: int
    episodes_written: int
    frames_written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fps: int | float = 0
    root: Path = Path(".")
    dataset_episodes: int = 0


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _check_existing(out: Path, size: int, fps: float | None) -> dict[str, Any] | None:
    """The manifest of the dataset at ``out`` when appending to one (None for a new dataset), after
    checking that imported videos fit it: action-free, frames ``size`` × ``size``, same fps."""
    from worldflow.data.episodes import load_manifest, manifest_path

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a dataset directory (new or existing)")
    if not manifest_path(out).is_file():
        return None
    m = load_manifest(out, allow_empty=True)
    if m.get("action_space") is not None:
        raise InputError(f"cannot import videos into {out}: it holds episodes with actions "
                         f"(env {m.get('env_id')!r}); import into a new directory")
    shape = m.get("frame_shape")
    if shape is not None and list(shape[:2]) != [size, size]:
        raise InputError(f"cannot append to {out}: its frames are {shape[0]}x{shape[1]}, --size is "
                         f"{size}; pass --size {shape[0]} or import into a new directory")
    if fps is not None and float(m["fps"]) != float(fps):
        raise InputError(f"cannot append to {out}: its frame rate is {m['fps']} fps, --fps is "
                         f"{_fps_value(fps)}; pass --fps {m['fps']} (or leave --fps out) or import into "
                         "a new directory")
    return m


class _Importer:
    """The state of one import: the dataset writer (made just before the first episode is stored, so an
    import that stores none writes nothing), the skipped files, and counts. The manifest's ``skipped``
    list is kept current: every manifest write (one per episode) records the skips so far, so an
    interrupted import keeps them."""

    def __init__(self, out: Path, size: int, fps: float | None, episode_len: int, backend: str,
                 existing: dict[str, Any] | None):
        self.out, self.size, self.episode_len, self.backend = out, size, episode_len, backend
        self.fps = fps if fps is not None else (existing["fps"] if existing else None)
        self.skipped_before: list[dict[str, str]] = list(existing.get("skipped", [])) if existing else []
        self.skipped: list[tuple[str, str]] = []
        self.writer = None
        self.files = self.episodes = self.frames = 0

    def recorded_skips(self) -> list[dict[str, str]]:
        return self.skipped_before + [{"file": f, "error": r} for f, r in self.skipped]

    def skip(self, name: str, reason: str, path: Path | None = None) -> None:
        # The summary line names the file already: drop its path from the decoder's message, and
        # decord's log prefix ("[16:20:20] /project/src/video/video_reader.cc:154: ").
        for p in {str(path), name} if path is not None else ():
            for a, b in ((f": {p}:", ":"), (f" {p}:", ":"), (f"'{p}'", p), (p, "the file")):
                reason = reason.replace(a, b)
        reason = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", reason)
        self.skipped.append((name, one_line(reason, _REASON_CHARS)))
        if self.writer is not None:
            self.writer.manifest["skipped"] = self.recorded_skips()

    def _writer(self, fps: float):
        from worldflow.data.episodes import DatasetWriter

        if self.writer is None:
            self.fps = _fps_value(fps)
            self.writer = DatasetWriter(self.out, None, None, fps=self.fps,
                                        meta={"source": "import", "frame_size": self.size})
            self.writer.manifest["skipped"] = self.recorded_skips()
        return self.writer

    def add_file(self, path: Path, on_episode=lambda: None) -> None:
        """Import one file (its episodes are on disk one by one), or skip it with the reason."""
        from worldflow.data.video import VideoDecodeError

        name = str(path.resolve())
        try:
            video = _SourceVideo(path, self.backend)
        except Exception as e:  # VideoDecodeError, or whatever else a hostile file provokes in a decoder
            return self.skip(name, one_line(e), path)
        with video:
            if not video.fps:
                return self.skip(name, "its container states no frame rate, so it cannot be resampled")
            dst = self.fps if self.fps is not None else video.fps
            idx = resample_indices(video.num_frames, video.fps, None if video.fps == dst else dst)
            parts = split_episodes(len(idx), self.episode_len)
            if not parts:
                return self.skip(name, f"{len(idx)} frame(s) at {_fps_value(dst):g} fps; an episode needs at "
                                 "least 2")
            done = 0
            try:
                for part in parts:
                    ep = _fitted(video, idx[part], self.size)
                    t = len(ep) - 1
                    self._writer(dst).add_episode(ep, None, None, np.zeros(t, bool), np.arange(t) == t - 1,
                                       source_file=name, source_start=part.start,
                                       source_fps=_fps_value(video.fps))
                    done, self.episodes, self.frames = done + 1, self.episodes + 1, self.frames + len(ep)
                    on_episode()
            except VideoDecodeError as e:  # a file that opens but breaks later (cut short, damaged)
                kept = f"kept its first {done} episode(s)" if done else "nothing of it was kept"
                self.skip(name, f"decoding failed at source frame {int(idx[parts[done].start])} ({kept}): "
                          f"{one_line(e)}", path)
            self.files += done > 0


def import_videos(
    sources: Sequence[str | Path],
    out: str | Path,
    size: int = 64,
    fps: float | None = None,
    episode_len: int = DEFAULT_EPISODE_LEN,
    progress: bool = True,
    backend: str = "auto",
) -> ImportSummary:
    """Import the video files in ``sources`` (files, or folders searched recursively) into the dataset
    directory ``out`` (created, or appended to); returns an :class:`ImportSummary`.

    Every file is resampled to the dataset's frame rate: ``fps`` when given, else the existing dataset's
    when appending, else the first imported file's average rate. Frames become uint8 (size, size, 3)
    (:func:`fit_frames`), cut into episodes of at most ``episode_len`` frames (a tail under 2 frames is
    dropped), each stored as soon as it is decoded. Episodes have no actions or rewards; terminated is
    False throughout and truncated True at the last transition (a cut video is a time limit, never a
    terminal state). A file that does not decode, or has fewer than 2 frames at the dataset's rate, is
    skipped and named in the summary and the manifest's ``skipped``. InputError (nothing written) when no
    file can be imported, or when the flags do not fit the dataset being appended to. ``backend`` is
    VideoReader's (``"auto"``: decord, falling back to PyAV).
    """
    from tqdm.auto import tqdm

    if size < 1:
        raise InputError(f"--size must be at least 1 pixel, got {size}")
    if episode_len < 2:
        raise InputError(f"--episode-len must be at least 2 frames, got {episode_len}")
    if fps is not None and not fps > 0:
        raise InputError(f"--fps must be above 0, got {fps}")
    out = Path(out)
    # A dataset's own episode videos (out inside a source folder) are never imported into itself.
    files = [p for p in find_videos(sources) if not _inside(p, out)]
    if not files:
        raise InputError(f"every video in {', '.join(map(str, sources))} lies inside --out {out} (the "
                         "dataset's own episodes); give an --out outside the source folders")
    imp = _Importer(out, size, fps, episode_len, backend, _check_existing(out, size, fps))
    bar = tqdm(files, desc="import", unit="file", disable=not progress)
    try:
        for path in bar:
            imp.add_file(path, lambda: bar.set_postfix(episodes=imp.episodes, frames=imp.frames))
    finally:
        bar.close()
    if imp.episodes == 0:  # the writer is made at the first episode: nothing was written
        listed = "; ".join(f"{f}: {r}" for f, r in imp.skipped)
        raise InputError(f"nothing imported (nothing written to {out}): every video was skipped ({listed})")
    imp.writer.update_meta(skipped=imp.recorded_skips())  # skips after the last episode's manifest write
    return ImportSummary(imp.files, imp.episodes, imp.frames, imp.skipped, imp.fps, out,
                         imp.writer.num_episodes)


# ---------------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``worldflow import`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "import",
        help="turn video files into an action-free dataset directory",
        description="Decode video files (" + ", ".join(VIDEO_SUFFIXES) + ") or folders of them (searched "
        "recursively) into a worldflow dataset: frames resized on the short side and centre-cropped to "
        "--size, resampled to --fps, cut into episodes of at most --episode-len frames, stored lossless "
        "without actions or rewards (see docs/data.md). Appends to an existing imported dataset. Files "
        "that cannot be decoded are skipped and named at the end.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="video files and/or folders of them")
    p.add_argument("--out", required=True, help="dataset directory (created, or appended to)")
    p.add_argument("--size", type=positive_int, default=64,
                   help="frame height = width in pixels (default 64)")
    p.add_argument("--fps", type=positive_float, default=None,
                   help="resample every video to this frame rate (default: the dataset's when appending, "
                   "else the first video's)")
    p.add_argument("--episode-len", type=positive_int, default=DEFAULT_EPISODE_LEN,
                   help=f"episodes of at most this many frames (default {DEFAULT_EPISODE_LEN})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    s = import_videos(args.sources, args.out, size=args.size, fps=args.fps, episode_len=args.episode_len,
                      progress=not args.no_progress)
    print(f"imported {s.files_imported} video(s) into {s.root}: {s.episodes_written} episodes, "
          f"{s.frames_written} frames at {s.fps:g} fps, {args.size}x{args.size}, in "
          f"{time.perf_counter() - t0:.1f}s; {s.root} now holds {s.dataset_episodes} episodes")
    if s.skipped:
        print(f"skipped {len(s.skipped)} file(s):")
        for name, reason in s.skipped:
            print(f"  {name}: {reason}")
    return 0
