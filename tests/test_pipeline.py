"""Smoke tests: every entry point runs end to end on tiny data in seconds, and writes what it promises."""

from __future__ import annotations

import json

import pytest
import torch

from worldflow.cli.app import main


def test_run_object_loads_every_trained_piece(tiny_run):
    from worldflow.agent.model import AgentModel
    from worldflow.dynamics import DynamicsModel
    from worldflow.run import Run
    from worldflow.tokenizer.model import CausalTokenizer

    run = Run(tiny_run)
    assert all(run.has(p) for p in ("tokenizer", "dynamics", "agent_bc", "agent")) and not run.has("nope")
    assert run.config.preset == "tiny" and run.phase_config("dynamics").preset == "tiny"
    assert run.dataset()["action_space"] and run.action_space().n == 3
    tok, _ = run.tokenizer()
    dyn, _ = run.dynamics()
    agent, _, phase = run.agent()
    assert isinstance(tok, CausalTokenizer) and not tok.training
    assert isinstance(dyn, DynamicsModel) and not dyn.training
    assert isinstance(agent, AgentModel) and phase == "agent"
    assert run.agent("agent_bc")[2] == "agent_bc"


def test_run_has_all_phases(tiny_run):
    for phase in ("tokenizer", "dynamics", "agent_bc", "agent"):
        assert (tiny_run / phase / "checkpoints" / "latest.json").exists(), phase
        assert (tiny_run / phase / "metrics.jsonl").exists(), phase
    assert (tiny_run / "config.json").exists()
    assert list((tiny_run / "tokenizer" / "media").glob("recon_*.gif"))
    assert list((tiny_run / "dynamics" / "media").glob("rollout_*.mp4"))


def test_eval_tokenizer_only(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "tok.json"
    assert main(["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--tokenizer-only",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"recon_psnr", "recon_ssim", "recon_objects"}  # tiny data is Catch: objects readable
    assert 0 < res["recon_psnr"] < 100 and -1 <= res["recon_ssim"] <= 1
    assert set(res["recon_objects"]) == {"ball", "paddle"}
    assert all(0 <= v <= 1 for v in res["recon_objects"].values())


def test_eval_rollout_schema(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "2",
                 "--horizons", "1,2,4", "--steps", "2", "--steps-sweep", "1,2", "--clips", "4",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    for key in ("psnr", "ssim"):
        assert set(res[key]) == {"1", "2", "4"}
        for base in ("baseline_copy_last", "shuffled_actions"):
            assert set(res[base][key]) == {"1", "2", "4"}
    assert res["steps"] == 2 and res["frames_per_second"] > 0
    assert res["sampler"] == "euler" and res["network_evaluations"] == 2
    assert set(res["steps_sweep"]) == {"1", "2"}
    # sample quality per K: the Fréchet distance, and on Catch the share of frames a real game can show
    assert set(res["steps_sweep_frechet"]) == set(res["steps_sweep_validity"]) == {"1", "2"}
    assert all(v >= 0 for v in res["steps_sweep_frechet"].values())
    assert set(res["validity"]) == {"1", "2", "4"} and all(0 <= v <= 1 for v in res["validity"].values())
    assert res["steps_sweep_validity"]["2"] == pytest.approx(sum(res["validity"].values()) / 3)
    u = res["uncertainty"]  # hallucination signals: spread over seeds, K vs 2K, their rank correlations
    assert u["samples"] == 3 and u["steps"] == [2, 4]
    for key in ("sample_spread", "step_disagreement"):
        assert set(u[key]) == {"1", "2", "4"} and all(v >= 0 for v in u[key].values())
        r = u["spearman_vs_error"][key]
        assert r is None or -1 <= r <= 1
    # a fixed seed gives the same rollout: the sweep's K = --steps entry is the main result's mean PSNR
    assert res["steps_sweep"]["2"] == pytest.approx(sum(res["psnr"].values()) / 3, rel=1e-6)
    # Catch sprites are read off the pixels: object accuracy per horizon, for the model and both baselines
    for obj in (res, res["baseline_copy_last"], res["shuffled_actions"]):
        assert set(obj["objects"]) == {"ball", "paddle"}
        assert all(0.0 <= v <= 1.0 for v in obj["objects"]["ball"].values())
    assert res["lpips"] is None and res["fvd"] is None  # absent, never faked
    media = tmp_path / "eval_media"
    for name in ("rollout.mp4", "rollout.gif", "psnr_vs_horizon.png", "ssim_vs_horizon.png",
                 "psnr_vs_steps.png", "objects_vs_horizon.png"):
        assert (media / name).exists(), name


def test_eval_with_heun(tiny_run, tiny_data, tmp_path):
    """--sampler heun replaces the run's sampler for the evaluation: 2K - 1 model calls a frame."""
    out = tmp_path / "heun.json"
    assert main(["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "2",
                 "--horizons", "1,2", "--steps", "2", "--clips", "2", "--sampler", "heun",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["sampler"] == "heun" and res["network_evaluations"] == 3
    assert all(v is not None for v in res["psnr"].values())


def test_eval_agent_in_real_env(tiny_run, tmp_path):
    out = tmp_path / "agent.json"
    assert main(["eval", "--run", str(tiny_run), "--env", "worldflow/Catch-v0", "--episodes", "2",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    for key in ("policy_return", "random_return", "expert_return", "bc_return"):
        assert isinstance(res[key], float), key


def test_rollout_command(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "roll.mp4"
    assert main(["rollout", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "2",
                 "--horizon", "3", "--steps", "1", "--clips", "2", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".gif").exists()


def test_help_of_every_command(capsys):
    for argv in (["--help"], ["collect", "--help"], ["train", "tokenizer", "--help"],
                 ["train", "dynamics", "--help"], ["train", "agent", "--help"], ["eval", "--help"],
                 ["rollout", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_bench_quick_smoke(tmp_path, monkeypatch):
    """The benchmark entry point runs and writes its JSON and Markdown (no timing is asserted, so each
    timed call runs once instead of for --quick's 0.5 s)."""
    from worldflow.cli import bench

    real = bench._timeit
    monkeypatch.setattr(bench, "_timeit", lambda fn, min_time=1.0, warmup=1, max_iters=1000:
                        real(fn, 0.0, warmup, max_iters))
    out = tmp_path / "bench.json"
    assert main(["bench", "--presets", "tiny", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["matmul_peak_flop_per_s"] > 0
    for what in ("tokenizer", "dynamics"):
        assert res[what]["tiny"]["tokens_per_s"] > 0 and res[what]["tiny"]["flop_per_step"] > 0
    assert set(res["rollout"]["cache"]) == {"16", "64"}
    phases = res["demo_phase_steps"]
    assert phases.pop("preset") == "tiny" and set(phases) == {"tokenizer", "dynamics", "bc", "imagination"}
    assert all(r["fp32_sec"] > 0 and r["bf16_sec"] > 0 for r in phases.values())
    assert res["machine"]["cpu"].startswith(torch.backends.cpu.get_cpu_capability())
    assert "| imagination |" in out.with_suffix(".md").read_text()


def test_ablations_smoke(tiny_run, tiny_data, tmp_path, monkeypatch):
    """The ablation script trains a variant for a fixed step count, scores it (PSNR and, on Catch, ball
    accuracy at each K) and writes JSON and a Markdown table; a second call resumes instead of retraining."""
    import sys

    from benchmarks import ablations

    out = tmp_path / "abl"
    argv = ["ablations", "--run", str(tiny_run), "--data", str(tiny_data), "--config", "tiny", "--steps", "2",
            "--only", "flow matching x-pred", "--out", str(out)]
    monkeypatch.setattr(ablations, "SWEEP", [1, 2])
    monkeypatch.setattr(ablations, "HORIZONS", [1, 2])
    monkeypatch.setattr(ablations, "CONTEXT", 2)
    monkeypatch.setattr(sys, "argv", argv)
    assert ablations.main() == 0
    rows = json.loads((out / "ablations.json").read_text())
    row = rows["flow matching x-pred"]["0"]
    assert {"psnr_k1", "psnr_k2", "ball_k1", "ball_k2", "copy_last", "ball_copy_last"} <= set(row)
    assert "| flow matching x-pred | 1 |" in (out / "ablations.md").read_text()
    mtime = (out / "ablations.json").stat().st_mtime_ns
    assert ablations.main() == 0  # finished (variant, seed) pairs are not retrained
    assert (out / "ablations.json").stat().st_mtime_ns == mtime


def test_ablations_objectives_smoke(tiny_run, tiny_data, tmp_path, monkeypatch):
    """--objectives trains the three objectives, scores each at every K (flow models also with Heun at
    2K - 1 calls) with PSNR, Fréchet and Catch's validity, and writes JSON, tables and the plot."""
    import sys

    from benchmarks import ablations

    out = tmp_path / "obj"
    argv = ["ablations", "--objectives", "--setting", "catch", "--run", str(tiny_run),
            "--data", str(tiny_data), "--config", "tiny", "--steps", "2", "--out", str(out)]
    for name, value in (("CURVE_SWEEP", [1, 2]), ("HEUN_SWEEP", [1, 2]), ("HORIZONS", [1, 2]),
                        ("CONTEXT", 2), ("CLIPS", 4)):
        monkeypatch.setattr(ablations, name, value)
    monkeypatch.setattr(sys, "argv", argv)
    assert ablations.main() == 0
    res = json.loads((out / "objectives.json").read_text())["catch"]
    assert set(res) == set(ablations.OBJECTIVES)
    shortcut, flow_x = res["shortcut x-pred (default)"]["0"], res["flow matching x-pred"]["0"]
    assert "heun" not in shortcut and flow_x["heun"]["calls"] == {"1": 1, "2": 3}
    assert shortcut["euler"]["calls"] == {"1": 1, "2": 2}
    for metric in ("psnr", "frechet", "validity", "ball"):
        assert all(v is not None for v in shortcut["euler"][metric].values()), metric
    md = (out / "objectives.md").read_text()
    assert "| flow matching v-pred | heun | psnr |" in md
    assert (out / "quality_vs_steps.png").stat().st_size > 0


def test_demo_smoke(tmp_path, capsys):
    """`worldflow demo` runs every stage end to end on the tiny preset and writes what the README promises.

    Each training phase takes 4 steps instead of the preset's 20: every stage, checkpoint and evaluation
    still runs, in under two thirds of the time."""
    run = tmp_path / "demo"
    steps = [f"train_{phase}.steps=4" for phase in ("tokenizer", "dynamics", "bc", "agent")]
    assert main(["demo", "--config", "tiny", "--run", str(run), "--no-progress", *steps]) == 0
    s = json.loads((run / "summary.json").read_text())
    for key in ("tokenizer_recon_psnr", "rollout_psnr_mean_h1_16", "policy_return", "bc_return",
                "random_return", "expert_return", "policy_return_mode", "bc_return_mode", "total_min"):
        assert s[key] is not None, key
    phases = ("tokenizer", "dynamics", "agent_bc", "agent")
    assert set(s["precision"]) == set(phases) and set(s["precision"].values()) <= {"bf16", "fp32"}
    assert s["capped"] == [] and s["cpu"]
    agent = json.loads((run / "eval" / "agent.json").read_text())
    assert agent["episodes"] == 50 and agent["expert_return"] == 10.0
    for name in ("rollout.mp4", "rollout.gif", "psnr_vs_horizon.png", "objects_vs_horizon.png", "eval.json"):
        assert (run / "eval" / name).exists(), name
    out = capsys.readouterr().out
    assert "worldflow demo summary" in out and "precision  tokenizer " in out and "CAPPED" not in out


def test_imagined_batch_serves_imag_reuse_updates(tiny_run, tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """agent.imag_reuse = 2: six phase-3 updates imagine three batches, each used by two updates."""
    import shutil

    from worldflow.train import agent as train_agent

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("agent"))
    calls = []
    real = train_agent.imagine
    monkeypatch.setattr(train_agent, "imagine", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_cfg("agent.imag_reuse=2", "train_agent.steps=6", "train_agent.ckpt_every=2")
    out = train_agent.train_imagination(cfg, tiny_data, run, progress=False)
    assert out["step"] == 6 and len(calls) == 3
    with pytest.raises(ValueError, match="imag_reuse must be >= 1"):
        train_agent.train_imagination(tiny_cfg("agent.imag_reuse=0"), tiny_data, run, progress=False)


def test_online_loop_smoke(tiny_run, tiny_data, tmp_path):
    """`worldflow train agent --online`: each iteration plays the current policy in the real env, grows the
    dataset, fine-tunes every phase; the real return of each collection and of a final evaluation is logged
    against the real env steps its policy was trained on (online.json) and plotted (online_return.png)."""
    import shutil

    from worldflow.data.episodes import load_manifest

    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_data, data)
    before = load_manifest(data)["episodes"]
    steps = [f"online.{k}={v}" for k, v in (("iterations", 2), ("episodes_per_iter", 2),
                                             ("tokenizer_steps", 1), ("dynamics_steps", 1), ("bc_steps", 1),
                                             ("agent_steps", 1))]
    assert main(["train", "agent", "--online", "--env", "worldflow/Catch-v0", "--config", "tiny", "--data",
                 str(data), "--run", str(run), "--no-progress", "data.size=16", "collect.episodes=8",
                 *steps]) == 0
    after = load_manifest(data)["episodes"]
    assert len(after) == len(before) + 4  # two iterations of two episodes; the final evaluation adds none
    curve = json.loads((run / "online.json").read_text())
    assert [(p["iteration"], p["kind"]) for p in curve] == [(0, "collect"), (1, "collect"), (2, "final eval")]
    offline = sum(e["length"] for e in before)
    assert curve[0]["env_steps"] == offline
    assert curve[1]["env_steps"] == offline + sum(e["length"] for e in after[len(before):len(before) + 2])
    assert curve[2]["env_steps"] == sum(e["length"] for e in after)
    assert all(len(p["returns"]) == 2 for p in curve)
    assert (run / "online_return.png").stat().st_size > 0
