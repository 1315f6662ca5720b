"""`worldflow import` (issue 16): its pieces (finding videos, fitting frames, resampling, splitting) on
plain arrays, then whole imports of tiny videos made here, through import_videos and the CLI."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from worldflow.data.episodes import DatasetWriter, load_episode, load_manifest
from worldflow.data.importing import find_videos, fit_frames, import_videos, resample_indices, split_episodes
from worldflow.data.video import write_gif, write_video
from worldflow.errors import InputError


def test_find_videos_recurses_sorts_and_refuses_non_videos(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for name in ("b/deep/z.MP4", "b/a.webm", "c.gif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = find_videos([tmp_path, tmp_path / "c.gif"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["b/a.webm", "b/deep/z.MP4", "c.gif"]
    with pytest.raises(InputError, match="is not a video file"):
        find_videos([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="does not exist"):
        find_videos([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no video files"):
        find_videos([tmp_path / "empty"])


def test_fit_frames_resizes_the_short_side_and_crops_the_centre():
    # a 40 x 80 frame: left quarter black, middle half white, right quarter black
    f = np.zeros((2, 40, 80, 3), np.uint8)
    f[:, :, 20:60] = 255
    out = fit_frames(f, 20)  # short side 40 -> 20, width 80 -> 40, centre crop keeps columns 10..30 of 40
    assert out.shape == (2, 20, 20, 3) and out.dtype == np.uint8
    assert (out == 255).all()  # only the white middle half survives the crop
    same = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(fit_frames(same, 16), same)  # already square at size: untouched
    tall = fit_frames(np.full((1, 30, 10, 3), 7, np.uint8), 20)  # growing: bilinear, constant stays
    assert tall.shape == (1, 20, 20, 3) and (tall == 7).all()
    with pytest.raises(InputError, match="expected uint8 frames"):
        fit_frames(np.zeros((2, 8, 8), np.uint8), 4)


def test_resample_indices_keep_the_duration():
    assert resample_indices(10, 30, None).tolist() == list(range(10))
    assert resample_indices(30, 30, 15).tolist() == list(range(0, 30, 2))  # half the frames, same 1 s
    assert resample_indices(10, 10, 20).tolist() == [k // 2 for k in range(20)]  # each frame shown twice
    idx = resample_indices(25, 25, 10)  # 1 s at 25 fps -> 10 frames, the one on screen at k / 10 s
    assert idx.tolist() == [int(np.floor(k * 2.5)) for k in range(10)]
    with pytest.raises(InputError, match="frame rates must be > 0"):
        resample_indices(10, 0, 5)


def test_split_episodes_covers_the_video_and_drops_a_too_short_tail():
    parts = split_episodes(10, 4)
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.stop) for s in split_episodes(9, 4)] == [(0, 4), (4, 8)]  # 1-frame tail dropped
    assert split_episodes(1, 4) == []
    with pytest.raises(InputError, match="--episode-len must be at least 2"):
        split_episodes(10, 1)


# ---------------------------------------------------------------------------------------------------
# import_videos and `worldflow import`: tiny videos made here, decoded for real


def _ramp(n: int, h: int, w: int, step: int = 8) -> np.ndarray:
    """uint8 (n, h, w, 3): frame t is the flat grey level step * t, so a frame's value names its index."""
    return np.broadcast_to((np.arange(n, dtype=np.uint8) * step)[:, None, None, None], (n, h, w, 3)).copy()


def _encode(path, frames: np.ndarray, fps, codec: str, pix_fmt: str, pts_ms=None, **options: str):
    """Encode uint8 (T, H, W, 3) with any PyAV encoder (the container follows the suffix); ``pts_ms``
    gives each frame's timestamp in ms (a variable frame rate). Skips the test when there is no encoder."""
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV/FFmpeg build has no {codec} encoder")
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.options = options
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for t, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts_ms is not None:
                vf.pts, vf.time_base = pts_ms[t], Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _levels(root, index: int) -> list[int]:
    """The mean grey level of every frame of episode ``index`` (rounded)."""
    return [int(round(f.mean())) for f in load_episode(root, index).frames]


# suffix, encoder, pixel format, options: lossy ones where that is what people have (vp9, mjpeg, ...)
CONTAINERS = [
    (".mp4", "libx264", "yuv420p", {}),
    (".webm", "libvpx-vp9", "yuv420p", {}),
    (".mkv", "ffv1", "yuv444p", {}),
    (".avi", "mjpeg", "yuvj420p", {}),
    (".mov", "libx264", "yuv420p", {}),
]


@pytest.mark.parametrize("suffix,codec,pix_fmt,options", CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_import_reads_each_container(tmp_path, suffix, codec, pix_fmt, options):
    src = _encode(tmp_path / f"clip{suffix}", _ramp(20, 30, 40, step=10), 10, codec, pix_fmt, **options)
    s = import_videos([src], tmp_path / "ds", size=16, progress=False)
    assert (s.files_imported, s.episodes_written, s.frames_written, s.skipped, s.fps) == (1, 1, 20, [], 10)
    got = _levels(tmp_path / "ds", 0)
    assert np.abs(np.array(got) - np.arange(20) * 10).max() <= 6, got  # every frame, in order (lossy codecs)


def test_import_reads_gifs_with_varying_frame_durations(tmp_path):
    import imageio.v3 as iio

    write_gif(tmp_path / "even.gif", _ramp(12, 16, 24, step=20), fps=10)
    # alternating 50 / 100 ms frames: 12 frames in 0.9 s, an average of 13.33 fps
    data = iio.imwrite("<bytes>", _ramp(12, 16, 24, step=20), extension=".gif",
                       duration=[100 if t % 2 else 50 for t in range(12)], loop=0)
    (tmp_path / "vary.gif").write_bytes(data)
    s = import_videos([tmp_path / "even.gif", tmp_path / "vary.gif"], tmp_path / "ds", size=16,
                      fps=10, progress=False)
    assert s.skipped == [] and s.episodes_written == 2
    eps = load_manifest(tmp_path / "ds")["episodes"]
    assert [e["source_fps"] for e in eps] == [10, pytest.approx(12 / 0.9)]
    assert _levels(tmp_path / "ds", 0) == [20 * k for k in range(12)]
    # 0.9 s at 10 fps: 9 frames, the source frame at k * 13.33 / 10 (the GIF as if played evenly)
    assert _levels(tmp_path / "ds", 1) == [20 * int(np.floor(k * 4 / 3 + 1e-9)) for k in range(9)]


def test_import_reads_a_variable_frame_rate_video_in_decode_order(tmp_path):
    # 150 / 50 ms gaps: VideoReader's PyAV backend (timestamps at a constant rate) cannot place these
    # frames, and decord cannot copy out 48-pixel-wide frames; the importer reads on in decode order.
    pts = np.cumsum([0] + [50 if t % 2 else 150 for t in range(11)]).tolist()
    src = _encode(tmp_path / "vfr.mkv", _ramp(12, 16, 48, step=20), 10, "libx264rgb", "rgb24",
                  pts_ms=pts, crf="0")
    s = import_videos([src], tmp_path / "ds", size=16, progress=False)
    assert s.skipped == [] and s.frames_written == 12
    assert _levels(tmp_path / "ds", 0) == [20 * k for k in range(12)]


def test_import_resizes_the_short_side_and_crops_the_centre_of_a_wide_video(tmp_path):
    # 24 x 48: red outer quarters; the middle 24 x 24 square has white / black / green / blue quadrants
    f = np.zeros((6, 24, 48, 3), np.uint8)
    f[..., 0] = 255
    quads = {(0, 0): (255, 255, 255), (0, 1): (0, 0, 0), (1, 0): (0, 255, 0), (1, 1): (0, 0, 255)}
    for (r, c), rgb in quads.items():
        f[:, 12 * r : 12 * r + 12, 12 + 12 * c : 24 + 12 * c] = rgb
    write_video(tmp_path / "wide.mp4", f, fps=10)
    import_videos([tmp_path / "wide.mp4"], tmp_path / "ds", size=12, progress=False)
    out = load_episode(tmp_path / "ds", 0).frames  # 24 -> 12 on the short side, 48 -> 24, crop 6..18
    assert out.shape == (6, 12, 12, 3)
    for (r, c), rgb in quads.items():
        assert (out[:, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] == rgb).all(), (r, c)
    assert load_manifest(tmp_path / "ds")["frame_shape"] == [12, 12, 3]


def test_import_resamples_to_fps(tmp_path):
    write_video(tmp_path / "thirty.mp4", _ramp(30, 16, 16), fps=30)  # 1 s, frame t at level 8 t
    s = import_videos([tmp_path / "thirty.mp4"], tmp_path / "ds", size=16, fps=10, progress=False)
    assert (s.frames_written, s.fps) == (10, 10)
    assert _levels(tmp_path / "ds", 0) == [8 * 3 * k for k in range(10)]  # frames 0, 3, ..., 27
    m = load_manifest(tmp_path / "ds")
    assert m["fps"] == 10 and isinstance(m["fps"], int) and m["episodes"][0]["source_fps"] == 30
    s = import_videos([tmp_path / "thirty.mp4"], tmp_path / "odd", size=16, fps=7.5, progress=False)
    assert (s.frames_written, load_manifest(tmp_path / "odd")["fps"]) == (7, 7.5)  # 1 s at 7.5 fps: 7 whole
    assert _levels(tmp_path / "odd", 0) == [8 * 4 * k for k in range(7)]  # every 4th frame


def test_import_splits_videos_into_episodes(tmp_path):
    write_video(tmp_path / "long.mp4", _ramp(25, 16, 16), fps=10)
    s = import_videos([tmp_path / "long.mp4"], tmp_path / "ds", size=16, episode_len=8, progress=False)
    m = load_manifest(tmp_path / "ds")
    assert s.episodes_written == 3  # 0..8, 8..16, 16..24; the 1-frame tail (frame 24) is dropped
    assert [(e["source_start"], e["num_frames"]) for e in m["episodes"]] == [(0, 8), (8, 8), (16, 8)]
    assert m["env_id"] is None and m["action_space"] is None and m["source"] == "import"
    assert {e["source_file"] for e in m["episodes"]} == {str((tmp_path / "long.mp4").resolve())}
    for k, e in enumerate(m["episodes"]):
        ep = load_episode(tmp_path / "ds", e["index"])
        assert ep.actions is None and ep.rewards is None
        assert not ep.terminated.any() and ep.truncated.tolist() == [False] * 6 + [True]
        assert _levels(tmp_path / "ds", e["index"]) == [8 * (8 * k + i) for i in range(8)]


def test_import_skips_undecodable_and_too_short_files_naming_them(tmp_path):
    src = tmp_path / "videos"
    write_video(src / "good.mp4", _ramp(8, 16, 16), fps=10)
    (src / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    write_video(src / "single.mp4", _ramp(1, 16, 16), fps=10)
    s = import_videos([src], tmp_path / "ds", size=16, progress=False)
    assert (s.files_imported, s.episodes_written) == (1, 1)
    reasons = dict(s.skipped)
    assert sorted(reasons) == [str((src / n).resolve()) for n in ("garbage.mp4", "single.mp4")]
    assert "cannot open video" in reasons[str((src / "garbage.mp4").resolve())]
    assert "1 frame(s) at 10 fps" in reasons[str((src / "single.mp4").resolve())]
    m = load_manifest(tmp_path / "ds")
    assert [(d["file"], d["error"]) for d in m["skipped"]] == s.skipped


def test_import_keeps_the_episodes_before_a_decode_error_and_names_the_file(tmp_path, monkeypatch):
    from worldflow.data import importing
    from worldflow.data.video import VideoDecodeError

    write_video(tmp_path / "cut.mp4", _ramp(24, 16, 16), fps=10)
    real = importing._SourceVideo.frames

    def frames(self, indices):  # the file breaks after its first 8 frames (a damaged middle)
        if indices.max() >= 8:
            raise VideoDecodeError(f"{self.path}: simulated damage")
        return real(self, indices)

    monkeypatch.setattr(importing._SourceVideo, "frames", frames)
    s = import_videos([tmp_path / "cut.mp4"], tmp_path / "ds", size=16, episode_len=8, progress=False)
    assert (s.files_imported, s.episodes_written) == (1, 1)
    [(name, reason)] = s.skipped
    assert name.endswith("cut.mp4") and "kept its first 1 episode(s)" in reason and "simulated" in reason
    assert load_manifest(tmp_path / "ds")["skipped"] == [{"file": name, "error": reason}]


def test_import_fits_mixed_resolutions_and_frame_rates_to_the_first_video(tmp_path):
    src = tmp_path / "videos"
    write_video(src / "a" / "big.mp4", _ramp(20, 30, 40), fps=20)
    write_video(src / "b" / "small.mkv", _ramp(10, 24, 16), fps=10)
    s = import_videos([src], tmp_path / "ds", size=16, progress=False)
    assert (s.fps, s.episodes_written, s.frames_written) == (20, 2, 40)
    m = load_manifest(tmp_path / "ds")
    assert m["fps"] == 20 and m["frame_shape"] == [16, 16, 3]
    assert [e["source_fps"] for e in m["episodes"]] == [20, 10]
    assert _levels(tmp_path / "ds", 1) == [8 * (k // 2) for k in range(20)]  # 10 fps shown at 20: twice each


def test_import_appends_and_refuses_what_does_not_fit(tmp_path):
    ds = tmp_path / "ds"
    write_video(tmp_path / "one.mp4", _ramp(10, 16, 16), fps=10)
    write_video(tmp_path / "two.mp4", _ramp(30, 16, 16), fps=30)
    (tmp_path / "bad1.mp4").write_bytes(b"not a video")
    (tmp_path / "bad2.webm").write_bytes(b"not a video either")
    import_videos([tmp_path / "one.mp4", tmp_path / "bad1.mp4"], ds, size=16, progress=False)
    s = import_videos([tmp_path / "two.mp4", tmp_path / "bad2.webm"], ds, size=16, progress=False)
    m = load_manifest(ds)
    assert [e["index"] for e in m["episodes"]] == [0, 1] and s.dataset_episodes == 2
    assert m["fps"] == 10 and m["episodes"][1]["num_frames"] == 10  # two.mp4: 30 fps -> the dataset's 10
    assert [Path(d["file"]).name for d in m["skipped"]] == ["bad1.mp4", "bad2.webm"]  # across appends
    before = (ds / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="frame rate is 10 fps, --fps is 15"):
        import_videos([tmp_path / "one.mp4"], ds, size=16, fps=15, progress=False)
    with pytest.raises(InputError, match="frames are 16x16, --size is 8"):
        import_videos([tmp_path / "one.mp4"], ds, size=8, progress=False)
    with pytest.raises(InputError, match="nothing imported"):  # every file skipped: nothing written
        import_videos([tmp_path / "bad1.mp4"], ds, size=16, progress=False)
    assert (ds / "manifest.json").read_bytes() == before

    labelled = tmp_path / "labelled"
    DatasetWriter(labelled, "worldflow/Catch-v0", {"type": "Discrete", "n": 3, "start": 0}).add_episode(
        _ramp(3, 16, 16), np.zeros(2, np.int64), np.zeros(2, np.float32), np.zeros(2, bool), np.ones(2, bool))
    with pytest.raises(InputError, match="holds episodes with actions"):
        import_videos([tmp_path / "one.mp4"], labelled, size=16, progress=False)


def test_import_of_only_bad_files_writes_nothing_and_never_reads_its_own_output(tmp_path):
    (tmp_path / "bad.mov").write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match=r"nothing imported .*bad\.mov"):
        import_videos([tmp_path], tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
    (tmp_path / "bad.mov").unlink()
    write_video(tmp_path / "v.mp4", _ramp(8, 16, 16), fps=10)
    import_videos([tmp_path], tmp_path / "ds", size=16, progress=False)
    s = import_videos([tmp_path], tmp_path / "ds", size=16, progress=False)  # ds/episodes/*.mp4 not re-read
    assert (s.files_imported, s.dataset_episodes) == (1, 2)


def test_worldflow_import_cli(tmp_path, capsys):
    from worldflow.cli.app import main
    from worldflow.data.dataset import ClipDataset

    src = tmp_path / "videos"
    write_video(src / "a.mp4", _ramp(20, 24, 32), fps=10)
    write_gif(src / "nested" / "b.gif", _ramp(12, 16, 16), fps=10)
    (src / "broken.avi").write_bytes(b"RIFF....AVI garbage")
    out = tmp_path / "ds"
    argv = ["import", str(src), "--out", str(out), "--size", "16", "--episode-len", "8", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "imported 2 video(s)" in text and "5 episodes, 32 frames at 10 fps" in text  # 8+8+4, 8+4
    assert "skipped 1 file(s):" in text and f"{(src / 'broken.avi').resolve()}: cannot open video" in text
    clips = ClipDataset(out, clip_len=4)
    item = clips[0]
    assert item["frames"].shape == (4, 16, 16, 3) and not item["action_mask"].any()

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    for args, message in (([str(tmp_path / "empty")], "no video files"),
                          ([str(tmp_path / "notes.txt")], "is not a video file"),
                          ([str(src), "--fps", "0"], "argument --fps: must be a number above 0")):
        try:
            rc = main(["import", *args, "--out", str(tmp_path / "x"), "--no-progress"])
        except SystemExit as e:  # a flag argparse refuses exits while parsing
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("worldflow: error:"), err
        assert message in err, err
    assert not (tmp_path / "x").exists()
