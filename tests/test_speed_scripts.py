"""Smoke tests of the speed scripts in benchmarks/ (issue 18): they run end to end on tiny settings and
write what they promise. They measure nothing here; speed is only ever claimed from a real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


GIT = shutil.which("git") is not None and (ROOT / ".git").exists()


@pytest.mark.skipif(not GIT, reason="needs a git checkout")
def test_speed_vs_against_head_runs_and_reports(tmp_path):
    out = tmp_path / "sv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_vs.py"), "--against", "HEAD",
                        "--rounds", "1", "--repeats", "1", "--batches", "1", "--frames", "2", "--no-env",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["speedup"]) == {"rollout_b1_frames_per_s", "dynamics_step_s", "tokenizer_step_s"}
    assert res["facts"]["tokens_per_frame"] == 27  # the compared shape: 16 + 8 registers + 3
    assert all(v > 0 for v in res["speedup"].values())
    assert "| rollout_b1_frames_per_s |" in out.with_suffix(".md").read_text()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "speed_vs_" not in worktrees  # the temporary worktree is removed


def test_profile_rollout_buckets_add_up(tmp_path):
    out = tmp_path / "prof"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_rollout.py"), "--batches", "1",
                        "--frames", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (r,) = json.loads(out.with_suffix(".json").read_text())["results"]
    total = sum(r["buckets_us_per_unit"].values())
    assert r["buckets_us_per_unit"]["matmul"] > 0
    assert total >= r["us_per_unit_profiled"] * (1 - 1e-9)  # the buckets plus Python overhead cover the wall
