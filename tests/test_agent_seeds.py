"""benchmarks/agent_seeds.py: the paired statistics, and a smoke run of the whole protocol on the tiny run."""

import json
import math

import pytest


def test_paired_summary_against_hand_computation():
    from benchmarks.agent_seeds import paired_summary

    s = paired_summary([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.303 / math.sqrt(3)  # t(0.975, df 2) * sd / sqrt(n)
    assert s["mean_difference"] == pytest.approx(2.0) and s["ci95"] == pytest.approx([2 - half, 2 + half])
    assert s["improved"] == 3 and s["ratio"] == pytest.approx(2.0)
    assert paired_summary([5.0, 5.0], [4.0, 6.0])["improved"] == 1


def test_agent_seeds_smoke(tiny_run, tiny_data, tmp_path):
    """Two seeds of phases 2 and 3 on the tiny run's world model: per-seed pairs on the same env seeds, the
    summary, and an imagined-vs-real point for every phase-3 checkpoint."""
    from benchmarks.agent_seeds import main

    out = tmp_path / "seeds"
    assert main(["--run", str(tiny_run), "--data", str(tiny_data), "--env", "worldflow/Catch-v0",
                 "--seeds", "2", "--episodes", "2", "--curve-episodes", "1", "--config", "tiny",
                 "--out", str(out), "data.size=16", "train_bc.steps=3", "train_agent.steps=4",
                 "train_agent.ckpt_every=2", "train_bc.eval_every=0", "train_agent.eval_every=0"]) == 0
    res = json.loads((out / "agent_seeds.json").read_text())
    assert [r["seed"] for r in res["rows"]] == [0, 1] and res["summary"]["seeds"] == 2
    for r in res["rows"]:
        assert r["difference"] == pytest.approx(r["policy_return"] - r["bc_return"])
        assert [p["step"] for p in r["curve"]] == [2, 4]  # every checkpoint kept (keep_checkpoints 0)
        assert all(p["imagined_return"] is not None for p in r["curve"])
    assert "Mean difference" in (out / "agent_seeds.md").read_text()
