"""Long rollouts and the distribution distance (issue 16, items 3 and 4) on a tiny action-free run.

``worldflow rollout --video`` continues a video file for any horizon in constant memory, and its streamed
frames equal the batch rollout decoded at once; ``worldflow eval`` reports a Fréchet distance per horizon
window with a sample-matched real floor, on action-free data, past the end of the held-out truth.
"""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from worldflow.cli.app import main

EPISODES, FRAMES, FPS = 8, 24, 10


def moving_square(t: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 (t, size, size, 3): a white square sliding right and wrapping, a learnable toy video."""
    rng = np.random.default_rng(seed)
    x0, y = rng.integers(0, size - 4, 2)
    f = np.zeros((t, size, size, 3), np.uint8)
    for i in range(t):
        x = (x0 + i) % (size - 4)
        f[i, y : y + 4, x : x + 4] = 255
    return f


@pytest.fixture(scope="module")
def free_data(tmp_path_factory) -> Path:
    """An action-free dataset (manifest action_space null), as `worldflow import` writes."""
    from worldflow.data.episodes import DatasetWriter

    root = tmp_path_factory.mktemp("free") / "squares"
    w = DatasetWriter(root, None, None, fps=FPS)
    for e in range(EPISODES):
        trunc = np.zeros(FRAMES - 1, bool)
        trunc[-1] = True
        w.add_episode(moving_square(FRAMES, seed=e), None, None, np.zeros(FRAMES - 1, bool), trunc)
    return root


@pytest.fixture(scope="module")
def free_run(free_data, tiny_cfg, tmp_path_factory) -> Path:
    """Tokenizer + dynamics trained for the tiny preset's few steps on the action-free data; half the
    episodes held out, so the Fréchet floor has two halves to compare."""
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    run = tmp_path_factory.mktemp("runs") / "free"
    cfg = tiny_cfg("data.holdout_fraction=0.6")  # 3 of the 8 (a hash per episode)
    train_tokenizer.train(cfg, free_data, run, progress=False)
    train_dynamics.train(cfg, free_data, run, progress=False)
    return run


@pytest.fixture(scope="module")
def source_video(tmp_path_factory) -> Path:
    """A 40x30 video at 20 fps: fitted to the run's 16 pixels and resampled to its dataset's 10 fps."""
    from worldflow.data.video import write_video

    frames = np.repeat(np.repeat(moving_square(60, size=20, seed=3), 2, axis=1), 2, axis=2)[:, 5:35]
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, frames, fps=20)
    return path


def test_rollout_video_writes_every_frame(free_run, source_video, tmp_path, capsys):
    from worldflow.data.video import VideoReader

    out = tmp_path / "long.mp4"
    assert main(["rollout", "--run", str(free_run), "--video", str(source_video), "--context", "3",
                 "--start", "2", "--horizon", "40", "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    r = VideoReader(out)
    assert len(r) == 3 + 40 and r.fps == pytest.approx(FPS)  # context + horizon, at the dataset's rate
    frame = r.get_batch([0])[0]
    assert frame.shape == (2 * (16 + 4), 2 * (2 * 16 + 6), 3)  # real | generated, 2-pixel pads, 2x
    assert out.with_suffix(".gif").exists()
    assert "frames/s" in capsys.readouterr().out


def test_streamed_frames_equal_rollout_then_decode(free_run):
    """The CLI's path (rollout_stream + the tokenizer's decode cache) equals rollout() + tok.decode of the
    same seed: cached streaming equals recompute, past both models' attention windows."""
    from worldflow.dynamics.rollout import rollout, rollout_stream
    from worldflow.eval.rollouts import decode_rollout, decoded_stream
    from worldflow.run import Run, encode_frames

    r = Run(free_run)
    model, _ = r.dynamics()
    tok, _ = r.tokenizer()
    ctx = torch.stack([encode_frames(tok, torch.from_numpy(moving_square(3, seed=s))) for s in (1, 2)])
    h = 3 * max(tok.cfg.context, model.cfg.context)
    stream = decoded_stream(tok, ctx, rollout_stream(model, ctx, None, h, 2,
                                                     generator=torch.Generator().manual_seed(7)))
    streamed = torch.stack(list(stream), dim=1)
    latents = rollout(model, ctx, None, h, 2, generator=torch.Generator().manual_seed(7))
    whole = decode_rollout(tok, ctx, latents)
    assert streamed.shape == whole.shape == (2, h, 16, 16, 3)
    torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=0)


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process (parameters, caches, anything kept)."""
    seen, total = set(), 0
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type == "cpu":  # type(): no lazy attributes
            try:
                s = o.untyped_storage()
                ptr = s.data_ptr()
            except (RuntimeError, NotImplementedError):  # fake / meta tensors other tests left behind
                continue
            if ptr not in seen:
                seen.add(ptr)
                total += s.nbytes()
    return total


def test_long_video_rollout_constant_memory(free_run, source_video, tmp_path, monkeypatch):
    """Memory at output frames 70, 140 and 210 of a rollout: nothing is kept per frame. At the same point
    of the loop (after the GIF preview's bounded buffer is full) it measures the tensors alive (torch's
    allocations, invisible to tracemalloc) and, traced from frame 70 on, what Python and numpy allocated
    and still hold. Anything kept per frame grows both 70-frame intervals alike; a one-off allocation
    elsewhere in the process (the suite shares it with other tests) can only move one, hence the min."""
    from worldflow.cli import rollout as cli_rollout
    from worldflow.data.video import VideoWriter

    probes, real_append = {}, VideoWriter.append

    def append(self, frames):
        real_append(self, frames)
        if self.frames in (70, 140, 210):
            gc.collect()
            if self.frames == 70:  # tracing slows Python down: only the frames compared
                tracemalloc.start()
            probes[self.frames] = (_live_tensor_bytes(), tracemalloc.get_traced_memory()[0])

    monkeypatch.setattr(VideoWriter, "append", append)
    assert cli_rollout.PREVIEW_FRAMES < 70
    try:
        assert main(["rollout", "--run", str(free_run), "--video", str(source_video), "--context", "2",
                     "--horizon", "208", "--steps", "1", "--out", str(tmp_path / "m.mp4"),
                     "--no-progress"]) == 0
    finally:
        tracemalloc.stop()
    (t70, py70), (t140, py140), (t210, py210) = probes[70], probes[140], probes[210]
    # kept per frame, a latent would add 70 x 128 bytes, a decoded frame 70 x 3 KB, a composed one 630 KB
    assert min(t140 - t70, t210 - t140) < 4096, (t70, t140, t210)
    assert min(py140 - py70, py210 - py140) < 256 * 1024, (py70, py140, py210)


def test_rollout_needs_exactly_one_source(free_run, free_data, source_video, tmp_path, capsys):
    for extra in ([], ["--data", str(free_data), "--video", str(source_video)]):
        assert main(["rollout", "--run", str(free_run), "--out", str(tmp_path / "x.mp4"), *extra]) == 2
        assert "exactly one of --data DIR (held-out clips) and --video FILE" in capsys.readouterr().err
    assert main(["rollout", "--run", str(free_run), "--video", str(source_video), "--start", "28",
                 "--context", "3", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--start 28 + --context 3 needs 31 frames but" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_eval_action_free_frechet_past_the_truth(free_run, free_data, tmp_path):
    """Horizon 30 lies past the 22 frames of truth a 24-frame episode leaves after 2 context frames: its
    PSNR/SSIM are null, its Fréchet distance is reported; nothing to shuffle on an action-free run."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(free_run), "--data", str(free_data), "--context", "2",
                 "--horizons", "1,4,30", "--steps", "1", "--clips", "4", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    # the clips need truth up to h = 4 only (30 cannot have any): 6-frame windows, not whole episodes
    assert res["shuffled_actions"] is None and res["truth_horizon"] == 4
    assert res["psnr"]["30"] is None and res["ssim"]["30"] is None
    assert res["baseline_copy_last"]["psnr"]["30"] is None
    assert all(math.isfinite(res[k][h]) for k in ("psnr", "ssim") for h in ("1", "4"))
    assert res["frechet_samples"] == {"1": 4, "4": 12, "30": 104}  # clips x window width
    for key in ("frechet", "frechet_real_floor"):
        assert set(res[key]) == {"1", "4", "30"}
        assert all(math.isfinite(v) and v >= 0 for v in res[key].values()), res[key]
    for name in ("rollout.mp4", "psnr_vs_horizon.png", "frechet_vs_horizon.png"):
        assert (tmp_path / "eval_media" / name).exists(), name


def test_frechet_floor_matches_sample_counts(free_run, free_data):
    """The floor of a window with fewer samples is higher (the estimator's upward bias at small n): the
    reason the floor is keyed by horizon with the window's sample count."""
    from worldflow.eval.metrics import GaussianMoments
    from worldflow.eval.rollouts import heldout_rollouts

    _, ev = heldout_rollouts(free_run, free_data, 2, 8, 4, progress=False)
    dim = 2 * ev.tok.cfg.latent_dim
    fake = type("S", (), {"moments": {1: GaussianMoments(dim), 8: GaussianMoments(dim)}, "samples": None})()
    fake.moments[1].n, fake.moments[8].n = 4, 60  # only the counts matter to the floor
    r = ev.frechet(fake)
    assert r.samples == {1: 4, 8: 60} and r.floor[1] > r.floor[8] > 0


def test_action_window_masks_past_the_clip():
    """Dataset actions are used as far as they go; before frame 0 and past the end they are masked."""
    from worldflow.dynamics.rollout import action_window

    acts = torch.arange(1, 4)[None]  # (1, 3): actions 1, 2, 3 at frames 0, 1, 2
    a, m = action_window(acts, None, -1, 5)
    assert a.tolist() == [[0, 1, 2, 3, 0, 0]] and m.tolist() == [[False, True, True, True, False, False]]
    a, m = action_window(acts, torch.tensor([[True, False, True]]), 4, 6)
    assert a.tolist() == [[0, 0]] and not m.any()
    assert action_window(None, None, 0, 3) == (None, None)


def test_eval_with_actions_past_the_truth(tiny_run, tiny_data, tmp_path):
    """A run with actions (Catch) scored past its 32-frame held-out episodes: the true actions as far as
    the clip goes, then masked; both baselines and the object accuracy are null there, Fréchet is not."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "2",
                 "--horizons", "1,40", "--steps", "1", "--clips", "2", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["truth_horizon"] == 1 and res["psnr"]["40"] is None and math.isfinite(res["psnr"]["1"])
    for base in (res, res["shuffled_actions"], res["baseline_copy_last"]):
        assert base["psnr"]["40"] is None and math.isfinite(base["psnr"]["1"])
        assert base["objects"]["ball"]["40"] is None
        # the pooled PSNR (of the mean MSE) is never above the per-clip mean (Jensen: log is concave)
        assert base["psnr_pooled"]["40"] is None and base["psnr_pooled"]["1"] <= base["psnr"]["1"] + 1e-4
    assert math.isfinite(res["frechet"]["40"]) and res["frechet_samples"] == {"1": 2, "40": 78}
    assert res["tokenizer_ceiling"]["40"] is None and math.isfinite(res["tokenizer_ceiling"]["1"])
    ceiling = res["tokenizer_ceiling_pooled"]
    assert ceiling["40"] is None and ceiling["1"] <= res["tokenizer_ceiling"]["1"] + 1e-4


def test_tokenizer_ceiling_is_the_true_latents_decoded(tiny_run, tiny_data):
    """tokenizer_ceiling at h = PSNR of decode(context ++ true future latents) at frame C + h - 1 against
    the real frame, computed here in one uncached decode call; past the truth it is null."""
    from worldflow.eval.metrics import psnr
    from worldflow.eval.rollouts import heldout_rollouts

    _, ev = heldout_rollouts(tiny_run, tiny_data, 2, 40, 3, progress=False)
    got = ev.ceiling([1, 3, 40]).psnr
    c, hs = ev.context, [1, 3]
    z = ev._gather("latents", 0, c + max(hs)).to(ev.device)
    decoded = ev.tok.decode(z)  # (B, C + H, h, w, 3) in [0, 1], the whole clip at once
    for h in hs:
        want = float(psnr(decoded[:, c + h - 1], ev.truth_at(h)).mean())
        assert abs(got[h] - want) < 1e-3, (h, got[h], want)
    assert got[40] is None  # held-out episodes end before horizon 40
    perfect = float(psnr(ev.truth_at(1).float() / 255.0, ev.truth_at(1)).mean())
    assert got[1] < perfect  # a lossy tokenizer is below the real frame itself


def test_truth_window_keeps_half_the_episodes_eligible():
    """Scoring windows as long as the longest episode left one episode (random CartPole: 10-94 frames),
    and all 32 clips were the same clip, so shuffled actions scored exactly like the true ones."""
    import torch

    from worldflow.data.clips import fixed_windows
    from worldflow.eval.rollouts import truth_window

    lengths = torch.tensor([94, 12, 30, 10, 41, 25, 18])
    w = truth_window(lengths, context=8)
    assert w == 25 and int((lengths >= w).sum()) >= 4  # the 4th longest of 7
    eps, _ = fixed_windows(lengths, 32, w)
    assert len(set(eps)) == 4
    assert truth_window(torch.tensor([5, 6]), context=8) == 6  # never longer than the longest episode
    assert truth_window(torch.tensor([40, 3, 3]), context=8) == 9  # at least one predicted frame


def test_clip_window_covers_the_scored_horizons_only():
    """Catch episodes of 80 frames scored at h 1..16 with a rollout to 100: 24-frame clips (C 8 + 16) at
    varied offsets, not whole episodes all starting at frame 0 (their respawns then fell on the same
    horizon of every clip, and the suite's Catch row read ball 11% for a model scoring 33% on varied
    windows)."""
    import torch

    from worldflow.data.clips import fixed_windows
    from worldflow.eval.rollouts import clip_window

    lengths = torch.full((10,), 80)
    assert clip_window(lengths, 8, 100, [*range(1, 17), 100]) == 24
    assert clip_window(lengths, 8, 100) == 80  # without the scored horizons: as long as truth allows
    assert clip_window(lengths, 8, 100, [100]) == 80  # nothing scoreable fits: the longest window
    assert clip_window(lengths, 8, 4, [1, 4]) == 12
    _, starts = fixed_windows(lengths, 32, 24)
    assert len(set(starts)) > 8  # many phases of the 8-frame ball cycle, not all at 0
