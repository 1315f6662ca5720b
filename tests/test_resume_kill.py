"""Killing a training process (SIGKILL) and resuming gives the same model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from worldflow.cli.app import main

# 40 steps, a checkpoint every 5: the kill lands after step 10, mid-schedule (warm-up 5, cosine to 40), with
# at least 30 steps (~1 s) of margin before the run would end on its own.
STEPS = 40
ARGS = ["--config", "tiny", "data.size=16", f"train_tokenizer.steps={STEPS}", "train_tokenizer.ckpt_every=5",
        "train_tokenizer.eval_every=0", "train_tokenizer.log_every=1"]


def _argv(data: Path, run: Path) -> list[str]:
    return ["train", "tokenizer", "--data", str(data), "--run", str(run), "--no-progress", *ARGS]


def _train(data: Path, run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worldflow.cli", *_argv(data, run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _latest_step(run: Path) -> int:
    p = run / "tokenizer" / "checkpoints" / "latest.json"
    try:
        return json.loads(p.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def _final_weights(run: Path) -> dict:
    d = run / "tokenizer" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"
    return load_file(str(d))


def test_sigkill_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted reference runs the same command in this process (one interpreter start-up fewer)
    assert main(_argv(tiny_data, full)) == 0

    proc = _train(tiny_data, killed)
    deadline = time.time() + 300
    while _latest_step(killed) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 10 <= _latest_step(killed) < STEPS

    resumed = _train(tiny_data, killed)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit-exact on CPU
