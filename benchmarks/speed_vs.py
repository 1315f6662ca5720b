"""Speed of this checkout against an earlier revision, measured in one run on the same machine.

    python benchmarks/speed_vs.py --against 9f6f830 [--rounds 5] [--batches 1 8 32] [--envs 64]

REV is checked out into a temporary git worktree. Each round runs one fresh worker process per tree
(REV, then this checkout, alternating which goes first), and every worker times the same shapes: a
cached rollout of 1 context + ``--frames`` frames at each batch size (K = 4), one AdamW training step of
the tokenizer and of the dynamics model, ``WorldModelVectorEnv`` steps at ``--envs`` sub-envs, and the
fp32 matmul peak. The report gives the median of the rounds per tree and the ratio (this checkout / REV;
above 1 is faster), as JSON and Markdown (``--out``, default ``benchmarks/speed_vs``).

The shapes are fixed here, not read from a preset, so that both trees build the same model: the
dynamics model is the size the 2026-12-01 comparison with the PyPI ``dreamer4`` package used (64×64,
patch 8, 16 latents × 16, width 128, depth 2 with one temporal layer, 8 registers, 27 tokens per
frame, K_max 64), the tokenizer the small preset's (width 64, depth 2, 2-frame clips). A worker checks
that its model has the parameter count and tokens per frame of the others and the report refuses a
comparison where they differ. The vector env needs a run, so each tree first trains its own (a few
random-play Catch episodes, 2 tokenizer and 2 dynamics steps: random weights cost what trained ones do).

Only the interfaces both trees have are used (``worldflow.config.load_config``, ``build_dynamics``,
``dynamics_loss``, ``rollout``, ``TokenizerTraining``, ``WorldModelVectorEnv`` and the CLI's
``collect`` / ``train``), looked up where each tree keeps them. Nothing is imported from the installed
package: each worker runs with PYTHONPATH set to its tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The compared shapes, as a preset both trees accept (only keys both Configs know; fp32 everywhere).
CONFIG_YAML = """\
preset: speed-vs
device: cpu
data: {size: 64, clip_len: 8}
tokenizer:
  transformer: {width: 64, depth: 2, heads: 2, kv_heads: 2, temporal_every: 1}
  patch: 8
  latent_tokens: 16
  latent_dim: 16
  clip_len: 2
  context: 2
  mask_max: 0.0
dynamics:
  transformer: {width: 128, depth: 2, heads: 4, kv_heads: 4, temporal_every: 2}
  registers: 8
  agent_tokens: 1
  k_max: 64
  context: 16
  steps: 4
  single_frame_fraction: 0.0
train_tokenizer: {steps: 2, batch: 4, bf16: false, log_every: 1, eval_every: 0, ckpt_every: 2}
train_dynamics: {steps: 2, batch: 2, bf16: false, log_every: 1, eval_every: 0, ckpt_every: 2}
train_bc: {bf16: false}
train_agent: {bf16: false}
"""

TOKENIZER_BATCH = (16, 2)  # the small preset's tokenizer batch: 16 clips x 2 frames
DYNAMICS_BATCH = (16, 8)  # the small preset's dynamics batch: 16 clips x 8 frames

# ---------------------------------------------------------------------------------------------------
# Worker: runs inside one tree (PYTHONPATH = that tree), prints one JSON line


def _first(*paths: str):
    """The first importable ``module:attr`` of ``paths`` (the trees keep things in different modules)."""
    import importlib

    for p in paths:
        mod, attr = p.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {paths} exists in this tree")


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measures(args: argparse.Namespace) -> tuple[dict, dict]:
    """Build this tree's models once; returns (facts about them, name -> fn() giving one measurement).

    Rates (``*_per_s``) and times (``*_step_s``) are medians over ``args.repeats`` back-to-back calls.
    """
    import gymnasium as gym
    import torch

    import worldflow

    tree = Path(args.tree).resolve()
    if not Path(worldflow.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"worker imported worldflow from {worldflow.__file__}, not from {tree}")
    load_config = _first("worldflow.config:load_config")
    build_dynamics = _first(
        "worldflow.dynamics.model:build_dynamics", "worldflow.train_dynamics:build_dynamics"
    )
    rollout = _first("worldflow.dynamics:rollout")
    dynamics_loss = _first("worldflow.dynamics:dynamics_loss")
    tokenizer_training = _first(
        "worldflow.tokenizer.model:TokenizerTraining", "worldflow.train_tokenizer:TokenizerTraining"
    )
    cfg = load_config(args.config)
    torch.manual_seed(0)
    r = args.repeats
    fns: dict = {}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    fns["matmul_gflops"] = lambda: 2 * 1024**3 / _median_time(lambda: a @ b, 10 * r, warmup=2) / 1e9

    model = build_dynamics(cfg, gym.spaces.Discrete(3)).eval()
    facts = {
        "torch_threads": torch.get_num_threads(),
        "tokens_per_frame": model.tokens_per_frame,
        "dynamics_params": sum(p.numel() for p in model.parameters()),
    }
    n, dim = cfg.tokenizer.latent_tokens, cfg.tokenizer.latent_dim

    def rollout_rate(bsz: int):
        ctx = torch.zeros(bsz, 1, n, dim)
        acts = torch.zeros(bsz, 1 + args.frames, dtype=torch.long)
        gen = torch.Generator().manual_seed(0)
        return lambda: (
            bsz
            * args.frames
            / _median_time(lambda: rollout(model, ctx, acts, args.frames, 4, generator=gen), r)
        )

    for bsz in args.batches:
        fns[f"rollout_b{bsz}_frames_per_s"] = rollout_rate(bsz)

    # training steps (fp32, no autocast) at the small preset's batches, on their own copies of the models.
    # Written out here, not taken from worldflow.cli.bench (adamw_step, random_clip): this code runs
    # inside the compared revision too, which may predate those helpers.
    dyn = build_dynamics(cfg, gym.spaces.Discrete(3)).train()
    opt = torch.optim.AdamW(dyn.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    bt, ft = DYNAMICS_BATCH
    z = torch.rand(bt, ft, n, dim) * 2 - 1
    acts = torch.randint(0, 3, (bt, ft))
    mask = torch.ones(bt, ft, dtype=torch.bool)

    def dyn_step():
        loss, _ = dynamics_loss(dyn, z, acts, mask, cfg.dynamics, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    fns["dynamics_step_s"] = lambda: _median_time(dyn_step, r)
    tok = tokenizer_training(cfg)
    facts["tokenizer_params"] = sum(p.numel() for p in tok.parameters())
    topt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    bt, ft = TOKENIZER_BATCH
    x = torch.randint(0, 256, (bt, ft, cfg.data.size, cfg.data.size, 3), dtype=torch.uint8)

    def tok_step():
        loss, _ = tok(x)
        topt.zero_grad()
        loss.backward()
        topt.step()

    fns["tokenizer_step_s"] = lambda: _median_time(tok_step, r)

    if args.run:
        vec = _first("worldflow.gym_env.env:WorldModelVectorEnv", "worldflow.wm_env:WorldModelVectorEnv")
        env = vec(args.run, num_envs=args.envs, steps=4)
        env.reset(seed=0)
        act = env.action_space.sample()
        fns[f"vector_env_{args.envs}_steps_per_s"] = lambda: (
            args.envs / _median_time(lambda: env.step(act), 3 * r, warmup=0)
        )
    for fn in fns.values():  # warm-up: allocator, memos
        fn()
    return facts, fns


def serve(args: argparse.Namespace) -> None:
    """Worker loop: print this tree's facts and measure names, then answer one measure name per stdin line
    with one JSON line (its value)."""
    facts, fns = measures(args)
    print(json.dumps({"facts": facts, "measures": list(fns)}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        print(json.dumps({name: fns[name]()}), flush=True)


# ---------------------------------------------------------------------------------------------------
# Driver


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def _cli(tree: Path, *argv: str) -> None:
    """Run ``worldflow`` of ``tree`` (``python -m worldflow.cli``); raise with its tail on failure."""
    p = subprocess.run(
        [sys.executable, "-m", "worldflow.cli", *argv],
        cwd=tree,
        env=_env(tree),
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise SystemExit(f"worldflow {' '.join(argv)} failed in {tree}:\n{p.stderr[-2000:]}")


def make_run(tree: Path, config: Path, where: Path) -> Path:
    """A run of ``tree``'s own code at the compared shapes (random play, 2 steps per phase)."""
    data, run = where / "data", where / "run"
    _cli(
        tree,
        "collect",
        "--env",
        "worldflow/Catch-v0",
        "--episodes",
        "6",
        "--max-steps",
        "40",
        "--out",
        str(data),
    )
    for phase in ("tokenizer", "dynamics"):
        _cli(
            tree,
            "train",
            phase,
            "--data",
            str(data),
            "--run",
            str(run),
            "--config",
            str(config),
            "--no-progress",
        )
    return run


class Worker:
    """A ``serve`` process of one tree: asked for one measure at a time, so the trees alternate every
    few seconds and a machine whose speed drifts (other tenants, clocks) slows both alike."""

    def __init__(self, tree: Path, config: Path, run: Path | None, a: argparse.Namespace):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--tree",
            str(tree),
            "--config",
            str(config),
            "--frames",
            str(a.frames),
            "--repeats",
            str(a.repeats),
            "--envs",
            str(a.envs),
            "--batches",
            *map(str, a.batches),
        ]
        if run is not None:
            cmd += ["--run", str(run)]
        self.tree = tree
        self.p = subprocess.Popen(
            cmd,
            cwd=tree,
            env=_env(tree),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        hello = self._read()
        self.facts, self.names = hello["facts"], hello["measures"]

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"worker failed in {self.tree}:\n{self.p.stderr.read()[-3000:]}")
        return json.loads(line)

    def measure(self, name: str) -> float:
        self.p.stdin.write(name + "\n")
        self.p.stdin.flush()
        return self._read()[name]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def _git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def report(rev: str, rev_sha: str, head: str, facts: dict[str, dict], rounds: list[dict[str, dict]]) -> dict:
    """Medians per tree, and the speed-up: the median over rounds of each round's paired ratio (this
    checkout against REV, measured seconds apart), which cancels drift of the machine's speed."""
    for k in ("dynamics_params", "tokens_per_frame", "tokenizer_params"):
        if facts["rev"][k] != facts["head"][k]:
            raise SystemExit(
                f"the trees built different models ({k}: {facts['rev'][k]} vs {facts['head'][k]}); "
                "no comparison"
            )
    names = list(rounds[0]["head"])
    med = {
        side: {k: statistics.median(r[side][k] for r in rounds) for k in names} for side in ("rev", "head")
    }

    def ratio(
        r: dict, k: str
    ) -> float:  # above 1 = this checkout faster (times: REV / this; rates: this / REV)
        return r["rev"][k] / r["head"][k] if k.endswith("_step_s") else r["head"][k] / r["rev"][k]

    per_round = {k: [ratio(r, k) for r in rounds] for k in names if k != "matmul_gflops"}
    import torch

    return {
        "against": rev,
        "against_sha": rev_sha,
        "head": head,
        "rounds": len(rounds),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": facts["head"]["torch_threads"],
        "facts": facts["head"],
        "median": med,
        "speedup": {k: statistics.median(v) for k, v in per_round.items()},
        "speedup_range": {k: [min(v), max(v)] for k, v in per_round.items()},
        "raw": rounds,
    }


def markdown(res: dict) -> str:
    med, sp, rg = res["median"], res["speedup"], res["speedup_range"]
    mm = med["head"]["matmul_gflops"], med["rev"]["matmul_gflops"]
    lines = [
        f"Measured {res['date']}, CPU capability {res['cpu']}, {res['threads']} threads, "
        f"{res['rounds']} rounds, the two trees alternating measure by measure; this checkout "
        f"{res['head']} against {res['against']} ({res['against_sha'][:7]}). Values are medians over "
        "the rounds; the speed-up is the median of the rounds' paired ratios (above 1: this checkout "
        f"is faster), with their range. fp32 matmul peak (1024²) in the same processes: "
        f"{mm[0]:.0f} / {mm[1]:.0f} GFLOP/s.",
        "",
        f"| measure | {res['against_sha'][:7]} | {res['head']} | speed-up | range |",
        "|---|---|---|---|---|",
    ]
    for k in sp:
        lines.append(
            f"| {k} | {med['rev'][k]:.4g} | {med['head'][k]:.4g} | {sp[k]:.2f}× "
            f"| {rg[k][0]:.2f}–{rg[k][1]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="git revision to compare with (a commit, tag or branch)")
    p.add_argument(
        "--rounds", type=int, default=15, help="rounds; each measures everything once per tree (15)"
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="rollout batch sizes (1 8 32)")
    p.add_argument("--frames", type=int, default=32, help="generated frames per rollout (32)")
    p.add_argument("--repeats", type=int, default=3, help="back-to-back calls per measurement, median (3)")
    p.add_argument("--envs", type=int, default=64, help="sub-envs of the vector env measure (64)")
    p.add_argument("--no-env", action="store_true", help="skip the vector env (no runs are trained)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "speed_vs"), help="output path without suffix")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        serve(a)
        return 0
    if not a.against:
        p.error("--against REV is required")
    sha = _git("rev-parse", "--verify", f"{a.against}^{{commit}}")
    dirty = " (uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    head = _git("rev-parse", "--short", "HEAD") + dirty
    with tempfile.TemporaryDirectory(prefix="speed_vs_") as tmp:
        tmp_p = Path(tmp)
        wt = tmp_p / "rev"
        _git("worktree", "add", "--detach", str(wt), sha)
        workers: dict[str, Worker] = {}
        try:
            config = tmp_p / "speed_vs.yaml"
            config.write_text(CONFIG_YAML)
            trees = {"rev": wt, "head": ROOT}
            for side, tree in trees.items():
                run = None if a.no_env else make_run(tree, config, tmp_p / side)
                workers[side] = Worker(tree, config, run, a)
            names = workers["head"].names
            rounds = []
            for r in range(a.rounds):
                res: dict[str, dict] = {"rev": {}, "head": {}}
                for i, name in enumerate(names):
                    order = ("rev", "head") if (r + i) % 2 == 0 else ("head", "rev")
                    for side in order:
                        res[side][name] = workers[side].measure(name)
                rounds.append(res)
                print(
                    f"round {r + 1}/{a.rounds}: "
                    + ", ".join(
                        f"{k} {res['rev'][k]:.3g} -> {res['head'][k]:.3g}" for k in names if "rollout" in k
                    ),
                    flush=True,
                )
            facts = {side: w.facts for side, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
            _git("worktree", "remove", "--force", str(wt))
    res = report(a.against, sha, head, facts, rounds)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
