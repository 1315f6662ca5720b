"""Where the time of one generated frame goes: a torch.profiler breakdown of cached rollouts.

    python benchmarks/profile_rollout.py [--batches 1 8 32] [--frames 16] [--out benchmarks/profile_rollout]

The model is the one ``benchmarks/speed_vs.py`` compares (width 128, depth 2 with one temporal layer, 27
tokens per frame, K = 4). For each batch size a warm-up rollout runs, then a profiled one; every aten op's
*self* CPU time is put in a bucket (matmuls, attention, norms and RoPE, other elementwise, copies and
cache writes, tensor creation, other), and what the ops do not account for is Python and dispatcher
overhead (wall time minus the summed self times). Reported per generated frame, in microseconds and as
shares of the wall time; JSON and Markdown next to ``--out``.
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


def profile_batch(model, batch: int, frames: int) -> dict:
    from worldflow.dynamics import rollout

    n, dim = model.latent_tokens, model.latent_dim
    ctx = torch.zeros(batch, 1, n, dim)
    acts = torch.zeros(batch, 1 + frames, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    rollout(model, ctx, acts, frames, 4, generator=gen)  # warm-up: memos, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        rollout(model, ctx, acts, frames, 4, generator=gen)
        wall = time.perf_counter() - t0
    per = defaultdict(float)
    counts = defaultdict(int)
    ops = defaultdict(float)
    for e in prof.key_averages():
        per[bucket_of(e.key)] += e.self_cpu_time_total
        counts[bucket_of(e.key)] += e.count
        ops[e.key] += e.self_cpu_time_total
    # the profiler's own cost inflates wall; time the same rollout unprofiled for the real figure
    t0 = time.perf_counter()
    rollout(model, ctx, acts, frames, 4, generator=gen)
    plain = time.perf_counter() - t0
    wall_us = wall * 1e6 / frames
    op_us = {k: v / frames for k, v in per.items()}
    op_us["Python and dispatch (wall - ops)"] = max(0.0, wall_us - sum(op_us.values()))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {
        "batch": batch,
        "frames": frames,
        "us_per_frame_profiled": wall_us,
        "us_per_frame_unprofiled": plain * 1e6 / frames,
        "frames_per_s_unprofiled": batch * frames / plain,
        "buckets_us_per_frame": op_us,
        "ops_per_frame": sum(counts.values()) / frames,
        "top_ops_us_per_frame": {k: v / frames for k, v in top},
    }


def markdown(res: list[dict], cpu: str) -> str:
    names = list(res[0]["buckets_us_per_frame"])
    head = " | ".join(f"batch {r['batch']}" for r in res)
    lines = [
        f"CPU capability {cpu}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
        " µs per generated frame (K = 4 denoising passes; the commit pass rides with the next frame's"
        " first), profiled; share of the wall"
        " time in brackets.",
        "",
        f"| bucket | {head} |",
        "|---|" + "---|" * len(res),
    ]
    for nme in names:
        cells = []
        for r in res:
            v = r["buckets_us_per_frame"].get(nme, 0.0)
            cells.append(f"{v:.0f} ({100 * v / r['us_per_frame_profiled']:.0f}%)")
        lines.append(f"| {nme} | " + " | ".join(cells) + " |")
    lines.append("| wall, profiled | " + " | ".join(f"{r['us_per_frame_profiled']:.0f}" for r in res) + " |")
    lines.append(
        "| wall, unprofiled | " + " | ".join(f"{r['us_per_frame_unprofiled']:.0f}" for r in res) + " |"
    )
    lines.append("| aten ops per frame | " + " | ".join(f"{r['ops_per_frame']:.0f}" for r in res) + " |")
    lines.append(
        "| frames/s, unprofiled | " + " | ".join(f"{r['frames_per_s_unprofiled']:.0f}" for r in res) + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "profile_rollout"))
    a = p.parse_args(argv)
    import tempfile

    from worldflow.config import load_config
    from worldflow.dynamics.model import build_dynamics

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(CONFIG_YAML)
        f.flush()
        cfg = load_config(f.name)
    torch.manual_seed(0)
    model = build_dynamics(cfg, gym.spaces.Discrete(3)).eval()
    res = [profile_batch(model, b, a.frames) for b in a.batches]
    cpu = torch.backends.cpu.get_cpu_capability()
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "results": res}, indent=1) + "\n")
    md = markdown(res, cpu)
    out.with_suffix(".md").write_text(md)
    print(md)
    for r in res:
        print(
            f"batch {r['batch']} top ops (µs/frame):",
            ", ".join(f"{k} {v:.0f}" for k, v in r["top_ops_us_per_frame"].items()),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
