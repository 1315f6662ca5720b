"""Video writing/reading: lossless round trips with both backends, random access, laziness, errors."""

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from worldflow.data import video
from worldflow.data.video import (
    VideoDecodeError,
    VideoReader,
    read_video,
    tile_videos,
    write_gif,
    write_video,
)

BACKENDS = ["pyav"] + (["decord"] if video.decord_available() else [])


def _frames(t=40, h=24, w=40, seed=0):
    """Game-like frames (moving blocks) with a row of random noise, the worst case for a codec."""
    rng = np.random.default_rng(seed)
    f = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        x = (3 * i) % (w - 4)
        f[i, 8:12, x : x + 4] = (255, 64, 64)
        f[i, h - 3 :, (5 * i) % (w - 6) :][:, :6] = (64, 160, 255)
    f[:, :2] = rng.integers(0, 256, (t, 2, w, 3))
    return f


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = _frames()
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, frames, fps=15, gop=8)  # short GOP so random access exercises seeking
    return path, frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_lossless_round_trip_is_pixel_exact(clip, backend):
    path, frames = clip
    r = VideoReader(path, backend=backend)
    assert len(r) == len(frames) and r.backend == backend
    assert np.array_equal(r.read_all(), frames)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_access_any_order_with_repeats(clip, backend):
    path, frames = clip
    r = VideoReader(path, backend=backend)
    for idx in ([39, 0, 17, 17, 5], [30, 31, 32], [3, 2, 1], [20]):
        assert np.array_equal(r.get_batch(idx), frames[idx])
    with pytest.raises(IndexError):
        r.get_batch([40])


def test_odd_sizes_round_trip(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (5, 17, 23, 3), dtype=np.uint8)
    write_video(tmp_path / "odd.mp4", frames)
    for backend in BACKENDS:
        assert np.array_equal(read_video(tmp_path / "odd.mp4", backend=backend), frames)


def test_auto_reads_widths_decord_cannot(tmp_path):
    # decord2 3.4.0 cannot copy out frames 32 pixels wide (and 8, 16, 24, 48, 96, ...); auto must still
    # return exact frames (through PyAV where decord fails).
    frames = _frames(t=6, h=32, w=32)
    write_video(tmp_path / "w32.mp4", frames)
    assert np.array_equal(read_video(tmp_path / "w32.mp4", backend="auto"), frames)


def test_lossy_is_close_not_exact(tmp_path):
    frames = _frames(t=10, h=32, w=32)
    frames[:, :2] = 0  # drop the noise rows: lossy quality on smooth content
    write_video(tmp_path / "lossy.mp4", frames, lossless=False)
    back = read_video(tmp_path / "lossy.mp4").astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((back - frames) ** 2))
    assert back.shape == frames.shape and psnr > 25
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :31], lossless=False)


def test_reader_is_lazy_and_picklable(clip):
    path, frames = clip
    r = VideoReader(path)
    assert not r.is_open
    r.get_batch([1])
    assert r.is_open
    r2 = pickle.loads(pickle.dumps(r))
    assert not r2.is_open and np.array_equal(r2.get_batch([2]), frames[[2]])


def _read_in_child(reader, queue):
    queue.put(reader.get_batch([0, 39]).sum())


def test_reader_opened_before_fork_reopens_in_child(clip):
    path, frames = clip
    r = VideoReader(path)
    r.get_batch([5])  # decoder now open in the parent
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(r, q))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and q.get(timeout=5) == frames[[0, 39]].sum()
    assert np.array_equal(r.get_batch([6]), frames[[6]])  # parent's decoder unaffected


def test_auto_falls_back_to_pyav(clip, monkeypatch):
    path, frames = clip

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(video, "_DecordBackend", Broken)
    r = VideoReader(path, backend="auto")
    assert r.backend == "pyav" and np.array_equal(r.get_batch([3]), frames[[3]])


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_broken_files_raise_naming_the_file(tmp_path, clip, backend):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip[0].read_bytes()[: clip[0].stat().st_size // 2])
    for bad in (garbage, cut, tmp_path / "missing.mp4"):
        with pytest.raises(VideoDecodeError, match=bad.name):
            len(VideoReader(bad, backend=backend))


def test_write_is_atomic(tmp_path, monkeypatch):
    import av

    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_video(tmp_path / "x.mp4", _frames(t=10))
    assert list(tmp_path.iterdir()) == []  # neither a partial file nor a temporary one


def test_gif_grid_and_tiling(tmp_path):
    import imageio.v3 as iio

    a, b = _frames(t=6, h=16, w=16), _frames(t=3, h=16, w=16, seed=1)
    grid = tile_videos([a, b], pad=2)
    assert grid.shape == (6, 20, 38, 3)
    assert np.array_equal(grid[5, 2:18, 20:36], b[2])  # shorter video holds its last frame
    write_gif(tmp_path / "a.gif", a)
    assert iio.imread(tmp_path / "a.gif").shape == (6, 16, 16, 3)
    mp4, gif = video.write_mp4_and_gif(tmp_path / "grid", [a, b], scale=2)
    assert read_video(mp4).shape == (6, 40, 76, 3)
    assert iio.imread(gif).shape == (6, 40, 76, 3)


def test_video_writer_streams_frames_in_one_encoder_path(tmp_path):
    """Frames appended one or several at a time equal write_video's file (lossless: the same pixels); the
    file appears only at close; a frame of another size or no frame at all is an InputError."""
    from worldflow.data.video import VideoWriter
    from worldflow.errors import InputError

    frames = _frames(t=12)
    path = tmp_path / "stream.mp4"
    w = VideoWriter(path, fps=12)
    w.append(frames[0])
    w.append(frames[1:7])
    for f in frames[7:]:
        w.append(f)
    assert w.frames == 12 and not path.exists()  # a temporary until close
    assert w.close() == path and w.close() == path  # idempotent
    r = VideoReader(path, backend="pyav")
    assert np.array_equal(r.read_all(), frames) and r.fps == pytest.approx(12)
    with pytest.raises(InputError, match="differs from the stream"):
        with VideoWriter(tmp_path / "bad.mp4") as bad:
            bad.append(frames[0])
            bad.append(frames[0, :10])
    with pytest.raises(InputError, match="no frames were appended"):
        VideoWriter(tmp_path / "empty.mp4").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.mp4"]  # no partial, no temporary
