"""Where the time of one generated frame goes: a torch.profiler breakdown of cached rollouts.

    python benchmarks/profile_rollout.py [--batches 1 8 32] [--frames 16] [--out benchmarks/profile_rollout]

The rollout model is the one ``benchmarks/speed_vs.py`` compares (width 128, depth 2 with one temporal
layer, 27 tokens per frame, K = 4); ``--train`` profiles one training step of the small preset's dynamics
model and tokenizer instead. For each case a warm-up call runs, then a profiled one; every aten op's
*self* CPU time is put in a bucket (matmuls, attention, norms and RoPE, other elementwise, copies and
cache writes, tensor creation, other), and what the ops do not account for is Python and dispatcher
overhead (wall time minus the summed self times). Reported per generated frame (or step), in
microseconds and as shares of the wall time; JSON and Markdown next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import gymnasium as gym
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed_vs import CONFIG_YAML  # noqa: E402  (the same shapes as the speed comparison)

BUCKETS = {
    "matmul": (
        "aten::addmm",
        "aten::mm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "aten::baddbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::dot",
    ),
    "attention softmax/cap": ("aten::_softmax", "aten::softmax", "aten::tanh", "aten::_safe_softmax"),
    "norms and RoPE": ("aten::rsqrt", "aten::pow", "aten::mean", "aten::_fused_rms_norm", "aten::rms_norm"),
    "copies and cache": (
        "aten::copy_",
        "aten::cat",
        "aten::clone",
        "aten::contiguous",
        "aten::_to_copy",
        "aten::index_copy_",
        "aten::stack",
    ),
    "tensor creation": (
        "aten::empty",
        "aten::zeros",
        "aten::full",
        "aten::fill_",
        "aten::arange",
        "aten::empty_strided",
        "aten::zero_",
        "aten::randn",
        "aten::normal_",
        "aten::ones",
    ),
    "elementwise": (
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::silu",
        "aten::div",
        "aten::neg",
        "aten::add_",
        "aten::mul_",
        "aten::masked_fill_",
        "aten::where",
        "aten::clamp",
        "aten::sigmoid",
        "aten::round",
        "aten::embedding",
        "aten::index_select",
        "aten::lerp",
    ),
}


def bucket_of(name: str) -> str:
    for b, names in BUCKETS.items():
        if name in names:
            return b
    return "other ops"


def breakdown(fn, units: int) -> dict:
    """Profile one call of ``fn`` (after a warm-up call); per-unit µs by bucket, the rest Python overhead."""
    fn()  # warm-up: memos, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    per, counts, ops = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.key_averages():
        per[bucket_of(e.key)] += e.self_cpu_time_total
        counts[bucket_of(e.key)] += e.count
        ops[e.key] += e.self_cpu_time_total
    # the profiler's own cost inflates wall; time the same call unprofiled for the real figure
    t0 = time.perf_counter()
    fn()
    plain = time.perf_counter() - t0
    wall_us = wall * 1e6 / units
    op_us = {k: v / units for k, v in per.items()}
    op_us["Python and dispatch (wall - ops)"] = max(0.0, wall_us - sum(op_us.values()))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {
        "us_per_unit_profiled": wall_us,
        "us_per_unit_unprofiled": plain * 1e6 / units,
        "buckets_us_per_unit": op_us,
        "ops_per_unit": sum(counts.values()) / units,
        "top_ops_us_per_unit": {k: v / units for k, v in top},
    }


def profile_batch(model, batch: int, frames: int) -> dict:
    """One generated frame (of a ``frames``-frame cached rollout, K = 4) at ``batch`` rollouts."""
    from worldflow.dynamics import rollout

    n, dim = model.latent_tokens, model.latent_dim
    ctx = torch.zeros(batch, 1, n, dim)
    acts = torch.zeros(batch, 1 + frames, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    res = breakdown(lambda: rollout(model, ctx, acts, frames, 4, generator=gen), frames)
    res["frames_per_s_unprofiled"] = batch * frames * 1e6 / (res["us_per_unit_unprofiled"] * frames)
    return {"label": f"batch {batch}", **res}


def profile_train_steps() -> list[dict]:
    """One AdamW step of the small preset's dynamics model (16 x 8 frames) and tokenizer (16 x 2), fp32."""
    from worldflow.cli.bench import adamw_step, random_clip, random_frames
    from worldflow.config import load_config
    from worldflow.dynamics import dynamics_loss
    from worldflow.dynamics.model import build_dynamics
    from worldflow.tokenizer.model import TokenizerTraining

    cfg = load_config("small", ["device=cpu"])
    torch.manual_seed(0)
    dyn = build_dynamics(cfg, gym.spaces.Discrete(3))
    gen = torch.Generator().manual_seed(0)
    b = random_clip(cfg, 16, 8)
    dyn_step = adamw_step(dyn, lambda: dynamics_loss(dyn, b["latents"], b["actions"], b["action_mask"],
                                                      cfg.dynamics, gen)[0])
    tok = TokenizerTraining(cfg)
    x = random_frames(cfg, 16, 2)
    tok_step = adamw_step(tok, lambda: tok(x)[0])
    return [
        {"label": "dynamics step (small)", **breakdown(dyn_step, 1)},
        {"label": "tokenizer step (small)", **breakdown(tok_step, 1)},
    ]


def markdown(res: list[dict], cpu: str, unit: str) -> str:
    names = list(res[0]["buckets_us_per_unit"])
    head = " | ".join(r["label"] for r in res)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"CPU capability {cpu}, {torch.get_num_threads()} threads, {stamp}. µs per {unit}, profiled;"
        " share of the profiled wall time in brackets.",
        "",
        f"| bucket | {head} |",
        "|---|" + "---|" * len(res),
    ]
    for nme in names:
        cells = []
        for r in res:
            v = r["buckets_us_per_unit"].get(nme, 0.0)
            cells.append(f"{v:.0f} ({100 * v / r['us_per_unit_profiled']:.0f}%)")
        lines.append(f"| {nme} | " + " | ".join(cells) + " |")
    for key, label in (
        ("us_per_unit_profiled", "wall, profiled"),
        ("us_per_unit_unprofiled", "wall, unprofiled"),
        ("ops_per_unit", "aten ops"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.0f}" for r in res) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--train", action="store_true", help="profile the small preset's training steps instead")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "profile_rollout"))
    a = p.parse_args(argv)
    import tempfile

    from worldflow.config import load_config
    from worldflow.dynamics.model import build_dynamics

    if a.train:
        res, unit = profile_train_steps(), "training step"
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(CONFIG_YAML)
            f.flush()
            cfg = load_config(f.name)
        torch.manual_seed(0)
        model = build_dynamics(cfg, gym.spaces.Discrete(3)).eval()
        res = [profile_batch(model, b, a.frames) for b in a.batches]
        unit = "generated frame (K = 4; the commit pass rides with the next frame's first denoising pass)"
    cpu = torch.backends.cpu.get_cpu_capability()
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "results": res}, indent=1) + "\n")
    md = markdown(res, cpu, unit)
    out.with_suffix(".md").write_text(md)
    print(md)
    for r in res:
        top = ", ".join(f"{k} {v:.0f}" for k, v in r["top_ops_us_per_unit"].items())
        print(f"{r['label']} top ops (µs): {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
