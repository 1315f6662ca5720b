"""``worldflow rollout``: continue real clips with the world model, for any horizon, and write the video.

Two sources, exactly one of them:

- ``--data DIR``: held-out clips of a dataset (``--clips`` of them, the clips ``worldflow eval`` scores),
  a row per clip of ground truth | prediction | |difference|. The true actions are used as far as each
  clip goes; later frames get masked actions, and the truth column turns black where the clip ends.
- ``--video FILE``: one clip of any video file, fitted to the run's frame size
  (:func:`worldflow.data.importing.fit_frames`: short side scaled, centre crop) and resampled to the frame
  rate of the run's training dataset when its manifest is at hand; ``--start`` is the first context
  frame. A video has no actions, so every frame's action is masked (the unlabeled path); an action-free
  run has none anyway. Each frame shows real | generated (real black once the file ends).

Either way the context is encoded, ``--horizon`` frames are generated one at a time through the dynamics
model's bounded KV cache (:func:`worldflow.dynamics.rollout.rollout_stream`), decoded through the
tokenizer's streaming decode cache (the decoder is causal: it is fed the context latents first) and
appended straight to the mp4 (:class:`worldflow.data.video.VideoWriter`, renamed into place when
complete). Nothing is kept per frame, so memory and time per frame are constant however long the
horizon; the mp4 holds every frame, context first (green border) then generation (red border). A GIF
preview of the first ``PREVIEW_FRAMES`` frames is written beside it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from worldflow.argtypes import nonneg_int, positive_int, power_of_two

PREVIEW_FRAMES = 64  # frames in the GIF beside the mp4 (kept in memory until written: bounded)
SCALE = 2  # nearest-neighbour enlargement: the presets' 16-64 pixel frames are small on a screen
DATA_FPS = 8  # playback rate of --data videos (slow enough to follow small game sprites)


class VideoFrames:
    """A video file's frames as the run sees them: fitted to ``size`` x ``size`` and resampled to ``fps``
    (None, or a file without a frame rate: every frame), read lazily ``chunk`` frames at a time, so at
    most one chunk is in memory."""

    def __init__(self, path: str | Path, size: int, fps: float | None, chunk: int = 32):
        from worldflow.data.importing import resample_indices
        from worldflow.data.video import VideoReader

        self.path, self.size, self.chunk = Path(path), size, chunk
        self.reader = VideoReader(path)
        src = self.reader.fps
        resample = fps is not None and src is not None
        self.index = resample_indices(len(self.reader), src, fps) if resample else np.arange(len(self.reader))
        self.fps = float(fps if resample else (src or 15))
        self._lo, self._frames = -1, None

    def __len__(self) -> int:
        return len(self.index)

    def get(self, lo: int, hi: int) -> np.ndarray:
        """Frames lo..hi-1 (after resampling), uint8 (hi - lo, size, size, 3)."""
        from worldflow.data.importing import fit_frames

        return fit_frames(self.reader.get_batch(self.index[lo:hi]), self.size)

    def at(self, k: int) -> np.ndarray | None:
        """Frame k, uint8 (size, size, 3), or None past the end of the file."""
        if not 0 <= k < len(self):
            return None
        if self._frames is None or not self._lo <= k < self._lo + len(self._frames):
            self._lo = k
            self._frames = self.get(k, min(k + self.chunk, len(self)))
        return self._frames[k - self._lo]


def _cell(frame: torch.Tensor | np.ndarray | None, size: int, color: tuple[int, int, int] | None
          ) -> np.ndarray:
    """One uint8 (size, size, 3) cell: a frame (uint8 or float [0, 1]; None: black), optionally framed."""
    from worldflow.data.pixels import to_uint8_numpy

    cell = np.zeros((size, size, 3), np.uint8) if frame is None else to_uint8_numpy(frame).copy()
    if color is not None:
        cell[0, :], cell[-1, :], cell[:, 0], cell[:, -1] = color, color, color, color
    return cell


GIVEN, GENERATED = (0, 200, 0), (220, 0, 0)  # border colours, as in worldflow.eval.visual


def _write(out: Path, fps: float, frames: Iterator[np.ndarray], total: int, progress: bool) -> int:
    """Append every composed frame (H', W', 3) to ``out`` (mp4, lossy yuv420p for players), scaled by
    SCALE; write the GIF preview beside it. Returns the number of frames written."""
    from tqdm.auto import tqdm

    from worldflow.data.video import VideoWriter, pad_even, write_gif

    preview = []
    with VideoWriter(out, fps=fps, lossless=False) as writer:
        for frame in tqdm(frames, total=total, desc="rollout", unit="frame", disable=not progress):
            frame = pad_even(frame.repeat(SCALE, axis=0).repeat(SCALE, axis=1))
            writer.append(frame)
            if len(preview) < PREVIEW_FRAMES:
                preview.append(frame)
    write_gif(out.with_suffix(".gif"), np.stack(preview), fps=round(fps) or 1)
    return writer.frames


def _timed(frames: Iterator[torch.Tensor], clock: list[float]) -> Iterator[torch.Tensor]:
    """The stream's frames, adding the seconds spent producing them (generation + decoding) to clock[0]."""
    while True:
        t0 = time.perf_counter()
        frame = next(frames, None)
        clock[0] += time.perf_counter() - t0
        if frame is None:
            return
        yield frame


def rollout_video(run: str | Path, video: str | Path, context: int, horizon: int, steps: int, start: int,
                  seed: int, out: Path, progress: bool = True) -> dict[str, float]:
    """Continue ``context`` frames of ``video`` from frame ``start`` by ``horizon`` generated frames,
    written to ``out`` as real | generated. Returns frames written, seconds and frames per second of the
    generation (with decoding)."""
    from worldflow import flow
    from worldflow.data.episodes import load_manifest
    from worldflow.distributed import device_of
    from worldflow.dynamics.rollout import rollout_stream
    from worldflow.errors import InputError, WorldflowError
    from worldflow.eval.rollouts import decoded_stream
    from worldflow.run import Run, encode_frames

    r = Run(run)
    model, cfg = r.dynamics()
    device = device_of(cfg)
    model.to(device)
    tok, _ = r.tokenizer(device)
    _check_context(context, model.cfg.context)
    flow.check_steps(steps, cfg.dynamics.k_max, flag="--steps")
    try:
        fps = load_manifest(r.dataset()["data"]).get("fps")  # the rate the model learned dynamics at
    except (OSError, WorldflowError, KeyError):
        fps = None  # the training data is not at hand: keep the file's own rate
    src = VideoFrames(video, tok.image_size, fps)
    if start + context > len(src):
        raise InputError(f"--start {start} + --context {context} needs {start + context} frames but {video} "
                         f"has {len(src)} at {src.fps:g} fps: lower --start or --context")
    # the causal encoder sees up to its window of real history before the first context frame
    lo = max(0, start - (tok.cfg.context - 1))
    ctx = encode_frames(tok, torch.from_numpy(src.get(lo, start + context)))[-context:][None].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    clock = [0.0]
    pred = _timed(decoded_stream(tok, ctx, rollout_stream(model, ctx, None, horizon, steps, generator=gen)),
                  clock)
    size = tok.image_size

    def frames() -> Iterator[np.ndarray]:
        from worldflow.data.video import tile_videos

        for t in range(context + horizon):
            real = src.at(start + t)
            shown = _cell(real, size, GIVEN) if t < context else _cell(next(pred)[0], size, GENERATED)
            yield tile_videos([_cell(real, size, None)[None], shown[None]], cols=2)[0]

    n = _write(out, src.fps, frames(), context + horizon, progress)
    return _report(n, horizon, 1, clock[0], steps)


def rollout_data(run: str | Path, data: str | Path, context: int, horizon: int, steps: int, clips: int,
                 seed: int, out: Path, progress: bool = True) -> dict[str, float]:
    """Continue ``clips`` held-out clips of ``data`` by ``horizon`` frames with their true actions (masked
    past each clip), written to ``out`` as truth | prediction | difference rows."""
    from worldflow.eval.rollouts import heldout_rollouts
    from worldflow.eval.visual import comparison_video

    model, ev = heldout_rollouts(run, data, context, horizon, clips, seed, progress=progress, steps=[steps])
    clock = [0.0]
    pred = _timed(ev.stream(model, steps), clock)

    def frames() -> Iterator[np.ndarray]:
        ctx = ev.real_frames(context, ev.clips)
        for t in range(context):
            yield comparison_video(ctx[:, t : t + 1], ctx[:, t : t + 1], context=1)[0]
        for h in range(1, horizon + 1):
            p = next(pred).cpu()
            truth = ev.truth_at(h).cpu() if h <= ev.truth_horizon else torch.zeros_like(ctx[:, 0])
            yield comparison_video(truth[:, None], p[:, None], context=0)[0]

    n = _write(out, DATA_FPS, frames(), context + horizon, progress)
    return _report(n, horizon, ev.clips, clock[0], steps)


def _check_context(context: int, trained: int) -> None:
    from worldflow.errors import InputError

    if context > trained:
        raise InputError(f"--context {context} exceeds the context the model was trained for ({trained} "
                         f"frames)")


def _report(written: int, horizon: int, clips: int, seconds: float, steps: int) -> dict[str, float]:
    fps = horizon * clips / max(seconds, 1e-9)
    print(f"generated {horizon} frames x {clips} clip(s) in {seconds:.1f} s: {fps:.1f} frames/s (K={steps})")
    return {"frames": written, "seconds": seconds, "frames_per_second": fps}


def main(args: argparse.Namespace) -> int:
    from worldflow.errors import InputError

    if (args.data is None) == (args.video is None):
        raise InputError("worldflow rollout needs exactly one of --data DIR (held-out clips) and "
                         "--video FILE")
    out = Path(args.out).with_suffix(".mp4")
    progress = not args.no_progress
    if args.video is not None:
        rollout_video(args.run, args.video, args.context, args.horizon, args.steps, args.start, args.seed,
                      out, progress)
    else:
        if args.start:
            raise InputError("--start picks the first context frame of --video; with --data the clips are "
                             "fixed: drop --start")
        rollout_data(args.run, args.data, args.context, args.horizon, args.steps, args.clips, args.seed, out,
                     progress)
    print(f"wrote {out} and {out.with_suffix('.gif')} (preview)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="continue real clips (held-out, or a video file) for any horizon",
                       description=__doc__.split("\n\n")[0] + " Exactly one of --data and --video.")
    p.add_argument("--run", required=True)
    p.add_argument("--data", help="dataset directory: roll out its held-out clips with their true actions")
    p.add_argument("--video", help="video file: continue its frames from --start (no actions)")
    p.add_argument("--start", type=nonneg_int, default=0, help="first context frame of --video")
    p.add_argument("--context", type=positive_int, default=8, help="context frames C")
    p.add_argument("--horizon", type=positive_int, default=16, help="frames to generate H (any number)")
    p.add_argument("--steps", type=power_of_two, default=4, help="sampling steps K per frame")
    p.add_argument("--clips", type=positive_int, default=4, help="clips in the video (with --data)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="rollout.mp4",
                   help="output path (.mp4; a GIF preview is written beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
