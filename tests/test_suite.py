"""``worldflow bench --suite`` end to end on the tiny preset: a row of numbers per member, named skips."""

from __future__ import annotations

import json
import math

import numpy as np

from worldflow.cli.app import main

FAST = ["data.size=16", "collect.episodes=3", "collect.random_episodes=0", "train_tokenizer.steps=4",
        "train_dynamics.steps=4", "train_tokenizer.eval_every=4", "train_dynamics.eval_every=4",
        "dynamics.long_every=0"]


def test_suite_runs_catch_and_imported_video_and_names_what_it_skips(tmp_path, monkeypatch):
    from worldflow.cli import suite
    from worldflow.data.video import write_video

    videos = tmp_path / "videos"
    rng = np.random.default_rng(0)
    write_video(videos / "a.mp4", rng.integers(0, 255, (70, 24, 32, 3), dtype=np.uint8), fps=10)
    missing = suite.Member("nothere", "Nothere-v0", "no_such_module_xyz", "nothere", "random", 10)
    monkeypatch.setitem(suite.MEMBERS, "nothere", missing)
    out = tmp_path / "suite.json"
    assert main(["bench", "--suite", "catch,video,nothere", "--config", "tiny", "--videos", str(videos),
                 "--suite-dir", str(tmp_path / "runs"), "--out", str(out), "--no-progress", *FAST]) == 0
    rows = {r["member"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("catch", "video"):
        r = rows[name]
        assert "error" not in r, r
        for key in ("model_psnr", "copy_last_psnr", "ceiling_psnr", "ceiling_h1", "copy_last_h1",
                    "ceiling_pooled_h1", "copy_last_pooled_h1", "frechet_last"):
            assert math.isfinite(r[key]), (name, key, r[key])
        assert r["copy_last_pooled_h1"] <= r["copy_last_h1"] + 1e-4  # pooled never above the per-clip mean
    assert math.isfinite(rows["catch"]["shuffled_psnr"]) and rows["video"]["shuffled_psnr"] is None
    assert set(rows["catch"]["objects"]) >= {"ball"}
    assert 0 <= rows["catch"]["validity"] <= 1 and rows["video"]["validity"] is None
    assert rows["nothere"]["skipped"] == "needs no_such_module_xyz: pip install -e .[nothere]"
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") >= 4 and "| nothere | needs no_such_module_xyz" in md
