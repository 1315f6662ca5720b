"""Benchmarks (``worldflow bench`` / ``make bench``): throughput measured as ratios within one run.

- matmul peak: achieved FLOP/s of a large fp32 matmul on this machine, now;
- training throughput of tokenizer and dynamics per preset: tokens/s and achieved FLOP/s (counted with
  torch.utils.flop_counter on one step) as a fraction of the matmul peak;
- rollout frames/s versus horizon with and without the KV cache, and the per-frame cost at a long
  horizon over a short one (constant with the cache, growing without);
- seconds per step of every demo phase at the preset's batch shapes, fp32 against bf16 autocast (whether
  this CPU runs bf16 natively, and what a preset's step budget costs here);
- imagination steps/s of WorldModelVectorEnv at several batch sizes (when a trained run is given).

Models are randomly initialised: speed does not depend on the weights. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from torch.utils.flop_counter import FlopCounterMode

from worldflow.config import Config, load_config


def _timeit(fn: Callable[[], Any], min_time: float = 1.0, warmup: int = 1, max_iters: int = 1000) -> float:
    """Seconds per call (median-free mean over as many calls as fit in ``min_time``)."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < max_iters:
        fn()
        n += 1
        if time.perf_counter() - t0 >= min_time:
            break
    return (time.perf_counter() - t0) / n


def matmul_peak(size: int = 1024, min_time: float = 2.0) -> float:
    """Achieved FLOP/s of a (size x size) @ (size x size) fp32 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    sec = _timeit(lambda: a @ b, min_time)
    return 2 * size**3 / sec


def _count_flops(fn: Callable[[], Any], forward: Callable[[], Any] | None = None) -> tuple[int, str]:
    """FLOPs of one training step and how they were counted.

    The counter traces forward and backward. Where it cannot (it fails inside the shortcut loss's no-grad
    bootstrap passes), ``forward()`` runs one plain forward pass of the model under the counter and
    returns the number of extra no-grad forwards per step; the count is (3 + extra) x that forward (a
    backward costs about twice a forward).
    """
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops(), "counted"
    except AssertionError:
        if forward is None:
            raise
        with FlopCounterMode(display=False) as fc:
            extra = forward()
        fn()  # still warm up the real step
        return int((3 + extra) * fc.get_total_flops()), "estimated from the forward"


def _bench_config(preset: str) -> Config:
    return load_config(preset, ["device=cpu"])


def adamw_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One AdamW update (lr 1e-4) on ``loss()``: the training step every benchmark here times."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        loss().backward()
        opt.step()

    return step


def random_frames(cfg: Config, batch: int, frames: int) -> torch.Tensor:
    """Random uint8 frames (B, T, H, W, 3) at the config's frame size."""
    return torch.randint(0, 256, (batch, frames, cfg.data.size, cfg.data.size, 3), dtype=torch.uint8)


def random_clip(cfg: Config, batch: int, frames: int) -> dict[str, torch.Tensor]:
    """A labelled clip batch of random latents (B, T, N, D) in (-1, 1), random Discrete(3) actions, no
    rewards or terminations: the shapes a dynamics or agent step trains on."""
    n, dim = cfg.tokenizer.num_latents(cfg.data.size), cfg.tokenizer.latent_dim
    shape = (batch, frames)
    return {"latents": torch.rand(*shape, n, dim) * 2 - 1, "actions": torch.randint(0, 3, shape),
            "action_mask": torch.ones(shape, dtype=torch.bool), "rewards": torch.zeros(shape),
            "terminated": torch.zeros(shape, dtype=torch.bool)}


def tokenizer_throughput(preset: str, batch: int, frames: int, min_time: float) -> dict[str, float]:
    """One AdamW training step of the tokenizer on random frames: tokens/s and FLOP/s."""
    from worldflow.tokenizer.model import TokenizerTraining

    cfg = _bench_config(preset)
    model = TokenizerTraining(cfg)
    x = random_frames(cfg, batch, frames)
    step = adamw_step(model, lambda: model(x)[0])
    tok = model.tokenizer
    tokens = batch * frames * 2 * tok.tokens_per_frame  # encoder + decoder
    return _throughput(step, tokens, min_time, sum(p.numel() for p in model.parameters()))


def dynamics_throughput(preset: str, batch: int, frames: int, min_time: float) -> dict[str, float]:
    """One AdamW training step of the dynamics model (shortcut forcing) on random latents."""
    from worldflow.dynamics import dynamics_loss
    from worldflow.dynamics.model import build_dynamics

    cfg = _bench_config(preset)
    space = gym.spaces.Discrete(3)
    model = build_dynamics(cfg, space)
    gen = torch.Generator().manual_seed(0)
    b = random_clip(cfg, batch, frames)
    z, acts, mask = b["latents"], b["actions"], b["action_mask"]
    step = adamw_step(model, lambda: dynamics_loss(model, z, acts, mask, cfg.dynamics, gen)[0])
    tokens = batch * frames * model.tokens_per_frame
    tau, d = torch.full((batch, frames), 0.5), torch.full((batch, frames), 1 / cfg.dynamics.k_max)

    def forward() -> float:
        model(z, tau, d, acts, mask)
        # bootstrap rows (a share of the batch) run two extra no-grad forward passes
        return 2 * cfg.dynamics.bootstrap_fraction if cfg.dynamics.objective == "shortcut" else 0.0

    return _throughput(step, tokens, min_time, sum(p.numel() for p in model.parameters()), forward)


def _throughput(step: Callable[[], None], tokens: int, min_time: float, params: int,
                forward: Callable[[], Any] | None = None) -> dict[str, Any]:
    flops, how = _count_flops(step, forward)  # also the warm-up call
    sec = _timeit(step, min_time, warmup=0, max_iters=50)
    return {"params": params, "tokens_per_step": tokens, "sec_per_step": sec, "tokens_per_s": tokens / sec,
            "flop_per_step": flops, "flop_per_s": flops / sec, "flops_counted": how}


def rollout_speed(preset: str, horizons: list[int], steps: int, use_cache: bool, batch: int = 1
                  ) -> dict[int, float]:
    """Frames/s of an autoregressive rollout of ``h`` frames (after 1 context frame) for each horizon."""
    from worldflow.dynamics import rollout
    from worldflow.dynamics.model import build_dynamics

    cfg = _bench_config(preset)
    model = build_dynamics(cfg, gym.spaces.Discrete(3)).eval()
    n, dim = cfg.tokenizer.num_latents(cfg.data.size), cfg.tokenizer.latent_dim
    out = {}
    for h in horizons:
        ctx = torch.zeros(batch, 1, n, dim)
        acts = torch.zeros(batch, 1 + h, dtype=torch.long)
        t0 = time.perf_counter()
        rollout(model, ctx, acts, h, steps, use_cache=use_cache)
        out[h] = batch * h / (time.perf_counter() - t0)
    return out


def vector_env_speed(run: str, num_envs: list[int], steps: int, n_steps: int = 20) -> dict[int, float]:
    """Imagination steps/s (sub-env steps per second) of WorldModelVectorEnv built from a trained run."""
    from worldflow.gym_env.env import WorldModelVectorEnv

    out = {}
    for n in num_envs:
        env = WorldModelVectorEnv(run, num_envs=n, steps=steps)
        env.reset(seed=0)
        acts = env.action_space.sample()
        env.step(acts)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            env.step(acts)
        out[n] = n * n_steps / (time.perf_counter() - t0)
        env.close()
    return out


def demo_phase_steps(preset: str = "small", min_time: float = 3.0) -> dict[str, dict[str, float]]:
    """Seconds per step of each demo phase at the preset's own batch shapes, in fp32 and under bf16 autocast.

    tokenizer / dynamics / bc: one AdamW step; imagination: one imagined batch (``agent.imag_batch``
    rollouts of ``agent.horizon`` frames at K = ``agent.imag_steps``), the cost phase 3 pays per
    ``agent.imag_reuse`` updates. The bf16/fp32 ratio says whether this device runs bf16 natively (well
    under 1) or emulates it (several times 1): what ``bf16: auto`` decides on (worldflow.precision).
    """
    from worldflow.agent.model import AgentModel, imagine
    from worldflow.dynamics import dynamics_loss
    from worldflow.tokenizer.model import TokenizerTraining
    from worldflow.train.agent import bc_losses

    cfg = _bench_config(preset)
    space = gym.spaces.Discrete(3)
    gen = torch.Generator().manual_seed(0)
    tok = TokenizerTraining(cfg)
    frames = random_frames(cfg, cfg.train_tokenizer.batch, cfg.tokenizer.clip_len)
    dyn_b = random_clip(cfg, cfg.train_dynamics.batch, cfg.data.clip_len)
    agent = AgentModel(cfg, space)
    bc_b = random_clip(cfg, cfg.train_bc.batch, cfg.data.clip_len)
    ctx = random_clip(cfg, cfg.agent.imag_batch, max(1, min(cfg.data.clip_len, cfg.dynamics.context - 1)))
    k = cfg.agent.imag_steps
    steps = {
        "tokenizer": adamw_step(tok, lambda: tok(frames)[0]),
        "dynamics": adamw_step(agent.dynamics, lambda: dynamics_loss(
            agent.dynamics, dyn_b["latents"], dyn_b["actions"], dyn_b["action_mask"], cfg.dynamics, gen)[0]),
        "bc": adamw_step(agent, lambda: bc_losses(agent, bc_b, cfg, gen)[0]),
        "imagination": lambda: imagine(agent, ctx, cfg.agent.horizon, k, gen),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in steps.items():
        row = {}
        for prec in ("fp32", "bf16"):
            def run(fn=fn, on=prec == "bf16") -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                    fn()

            row[f"{prec}_sec"] = _timeit(run, min_time, warmup=1, max_iters=20)
        row["bf16_over_fp32"] = row["bf16_sec"] / row["fp32_sec"]
        out[name] = row
    return out


def machine() -> dict[str, Any]:
    from worldflow.precision import describe_cpu

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": describe_cpu(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_all(presets: list[str], run: str | None, quick: bool = False) -> dict[str, Any]:
    mt = 0.5 if quick else 3.0
    res: dict[str, Any] = {"machine": machine(), "matmul_peak_flop_per_s": matmul_peak(min_time=mt)}
    # CPU-sized batches; the base preset is measured at batch 1 (one step already takes seconds)
    shapes = {"tiny": (8, 8), "small": (4, 4), "base": (1, 2)}
    for what, fn in (("tokenizer", tokenizer_throughput), ("dynamics", dynamics_throughput)):
        res[what] = {}
        for p in presets:
            b, t = shapes.get(p, (2, 4))
            r = fn(p, b, t, mt)
            r["batch"], r["frames"] = b, t
            r["fraction_of_matmul_peak"] = r["flop_per_s"] / res["matmul_peak_flop_per_s"]
            res[what][p] = r
    horizons = [16, 64] if quick else [16, 64, 256]
    rp = "tiny" if quick else "small"
    res["rollout"] = {"preset": rp, "steps": 4,
                      "cache": rollout_speed(rp, horizons, 4, True),
                      "no_cache": rollout_speed(rp, horizons, 4, False)}
    long, short = max(horizons), min(horizons)
    for k in ("cache", "no_cache"):
        fps = res["rollout"][k]
        res["rollout"][f"{k}_per_frame_cost_ratio_{long}_over_{short}"] = fps[short] / fps[long]
    res["demo_phase_steps"] = {"preset": "tiny" if quick else "small",
                               **demo_phase_steps("tiny" if quick else "small", 0.01 if quick else 3.0)}
    if run:
        res["vector_env"] = {"run": str(run), "steps": 4,
                             "steps_per_s": vector_env_speed(run, [1, 8] if quick else [1, 8, 64], 4)}
    return res


def markdown(res: dict[str, Any]) -> str:
    """The Markdown tables for docs/benchmarks.md."""
    m = res["machine"]
    peak = res["matmul_peak_flop_per_s"]
    lines = [f"Measured {m['date']} on {m['processor']} ({m.get('cpu', '?')}; {m['threads']} threads), "
             f"torch {m['torch']}, "
             f"{m['platform']}. Matmul peak (fp32 1024², same run): {peak / 1e9:.1f} GFLOP/s.", ""]
    lines += ["| model | preset | params | batch×frames | tokens/s | GFLOP/s | share of matmul peak |",
              "|---|---|---|---|---|---|---|"]
    for what in ("tokenizer", "dynamics"):
        for p, r in res[what].items():
            lines.append(f"| {what} | {p} | {r['params'] / 1e6:.2f}M | {r['batch']}×{r['frames']} | "
                         f"{r['tokens_per_s']:.0f} | {r['flop_per_s'] / 1e9:.1f} | "
                         f"{r['fraction_of_matmul_peak']:.0%} |")
    ro = res["rollout"]
    lines += ["", f"Rollout ({ro['preset']} preset, K={ro['steps']}, batch 1), frames/s:", "",
              "| horizon | with cache | full recompute |", "|---|---|---|"]
    for h in ro["cache"]:
        lines.append(f"| {h} | {ro['cache'][h]:.1f} | {ro['no_cache'][h]:.1f} |")
    for k, v in ro.items():
        if "ratio" in k:
            lines.append(f"\n{k.replace('_', ' ')}: {v:.2f}")
    if "demo_phase_steps" in res:
        ph = dict(res["demo_phase_steps"])
        lines += ["", f"Demo phase steps ({ph.pop('preset')} preset's batch shapes, CPU: "
                  f"{m.get('cpu', '?')}), seconds per step (imagination: per imagined batch):", "",
                  "| phase | fp32 | bf16 autocast | bf16 / fp32 |", "|---|---|---|---|"]
        for name, r in ph.items():
            lines.append(f"| {name} | {r['fp32_sec']:.3f} | {r['bf16_sec']:.3f} | "
                         f"{r['bf16_over_fp32']:.2f} |")
    if "vector_env" in res:
        lines += ["", "WorldModelVectorEnv imagination steps/s (K=4):", "", "| envs | steps/s |", "|---|---|"]
        for n, v in res["vector_env"]["steps_per_s"].items():
            lines.append(f"| {n} | {v:.1f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return suite_main(args)
    res = run_all(args.presets.split(","), args.run, quick=args.quick)
    return _write(Path(args.out or "benchmarks/results.json"), res, markdown(res))


def _write(out: Path, res: dict[str, Any], md: str) -> int:
    """Results as JSON at ``out`` and Markdown beside it (``.md``), both atomically; prints the Markdown."""
    from worldflow.io import atomic_write_text

    atomic_write_text(out, json.dumps(res, indent=2))
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure training/rollout/imagination throughput", description=__doc__)
    p.add_argument("--presets", default="tiny,small,base", help="comma-separated presets")
    p.add_argument("--run", default=None, help="a trained run for the WorldModelVectorEnv benchmark")
    p.add_argument("--quick", action="store_true", help="short timings (smoke run)")
    p.add_argument("--out", default=None,
                   help="JSON (a .md is written beside); default benchmarks/results.json, with --suite "
                        "benchmarks/suite.json")
    p.add_argument("--suite", nargs="?", const="all", default=None, metavar="MEMBERS",
                   help="run collect -> tokenizer -> dynamics -> eval on the env suite: comma-separated "
                        "members of catch,cartpole,pong,minigrid,crafter,video (default all)")
    p.add_argument("--config", default="small", help="preset of the suite runs (default small)")
    p.add_argument("--videos", default=None, help="a folder of videos for the suite's 'video' member")
    p.add_argument("--suite-dir", default="runs/suite", help="where the suite's datasets and runs go")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="config overrides of the suite runs")
    p.set_defaults(func=main)


def suite_main(args: argparse.Namespace) -> int:
    from worldflow.cli.suite import SUITE, run_suite
    from worldflow.cli.suite import markdown as suite_markdown

    names = [m.name for m in SUITE] if args.suite == "all" else [n for n in args.suite.split(",") if n]
    res = run_suite(names, args.config, list(args.overrides), Path(args.suite_dir),
                    Path(args.videos) if args.videos else None, progress=not args.no_progress)
    res = {"machine": machine(), **res}
    return _write(Path(args.out or "benchmarks/suite.json"), res, suite_markdown(res))
