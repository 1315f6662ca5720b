"""The pieces of `worldflow import` (issue 16): finding videos, fitting frames, resampling, splitting."""

from __future__ import annotations

import numpy as np
import pytest

from worldflow.data.importing import find_videos, fit_frames, resample_indices, split_episodes
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
