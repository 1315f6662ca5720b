"""``worldflow demo``: the whole pipeline on the built-in Catch game, end to end.

collect -> train tokenizer -> train dynamics -> evaluate rollouts (video, PSNR-vs-horizon plot, JSON)
-> agent (behaviour cloning, then RL in imagination) -> real-env returns, then a short summary.
Each stage resumes or is skipped when its output already exists, so an interrupted demo continues where
it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from worldflow.config import Config, save_config
from worldflow.io import atomic_write_text
from worldflow.precision import describe_cpu

EVAL_EPISODES = 50


def _collect(cfg: Config, data: Path, progress: bool) -> None:
    from worldflow.data.collect import collect

    if (data / "manifest.json").exists():
        return
    c = cfg.collect
    runs = [(c.policy, c.episodes), ("random", c.random_episodes)]
    for policy, n in runs:
        if n > 0:  # appending continues the episode seeds, so the two batches never repeat a seed
            collect(c.env, n, data, policy=policy, size=cfg.data.size, seed=c.seed, epsilon=c.epsilon,
                    action_repeat=c.action_repeat, max_steps=c.max_steps, progress=progress)


def run_demo(cfg: Config, run: Path, data: Path | None = None, progress: bool = True) -> dict:
    from worldflow.eval.rollouts import evaluate_agent_run, evaluate_dynamics
    from worldflow.train import agent as train_agent
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    t0 = time.time()
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.json")
    data = data or run / "data"
    timings = {}
    _collect(cfg, data, progress)
    timings["collect_min"] = (time.time() - t0) / 60
    tok = train_tokenizer.train(cfg, data, run, progress=progress)
    timings["tokenizer_min"] = tok["minutes"]
    dyn = train_dynamics.train(cfg, data, run, progress=progress)
    timings["dynamics_min"] = dyn["minutes"]
    horizons = [1, 2, 4, 8, 16]
    context = min(8, cfg.dynamics.context)
    ev = evaluate_dynamics(run, data, context, horizons, cfg.dynamics.steps, None, 32, run / "eval",
                           progress=progress)
    atomic_write_text(run / "eval" / "eval.json", json.dumps(ev, indent=2))
    t1 = time.time()
    agent_runs = train_agent.train_offline(cfg, data, run, progress=progress)
    timings["agent_min"] = (time.time() - t1) / 60
    phases = {"tokenizer": tok, "dynamics": dyn, "agent_bc": agent_runs["bc"], "agent": agent_runs["agent"]}
    # 50 episodes: the WM agent plays them in lockstep as one batch, so they cost little more than 20, and
    # the mean's standard error shrinks to about a third of a point on Catch
    agent = evaluate_agent_run(run, cfg.collect.env, episodes=EVAL_EPISODES, progress=progress)
    atomic_write_text(run / "eval" / "agent.json", json.dumps(agent, indent=2))
    summary = {"tokenizer_recon_psnr": tok["eval"].get("recon_psnr"),
               "tokenizer_recon_ssim": tok["eval"].get("recon_ssim"),
               **{f"tokenizer_{k}": v for k, v in tok["eval"].items() if k.endswith("_accuracy")},
               "rollout_psnr_mean_h1_16": _mean(ev["psnr"]),
               **{f"rollout_{k}_accuracy_h1_16": _mean(v) for k, v in ev.get("objects", {}).items()},
               "copy_last_psnr_mean_h1_16": _mean(ev["baseline_copy_last"]["psnr"]),
               "shuffled_actions_psnr_mean_h1_16": _mean(ev["shuffled_actions"]["psnr"]),
               "steps": ev["steps"],
               **{k: agent.get(k) for k in ("policy_return", "bc_return", "random_return", "expert_return",
                                            "policy_return_mode", "bc_return_mode")},
               "total_min": (time.time() - t0) / 60, **timings,
               "precision": {ph: r["precision"] for ph, r in phases.items()},
               "capped": capped_phases(phases), "cpu": describe_cpu()}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2))
    return summary


def capped_phases(phases: dict[str, dict]) -> list[dict]:
    """The phases a ``max_minutes`` safety cap stopped before their step budget: [{phase, step, steps}]."""
    return [{"phase": ph, "step": r["step"], "steps": r["planned_steps"]}
            for ph, r in phases.items() if r.get("capped")]


def _mean(m: dict) -> float:
    """Mean of a horizon -> value map over the horizons that have a value (null past the held-out truth)."""
    vals = [v for v in m.values() if v is not None]
    return sum(vals) / max(1, len(vals))


def _objects(s: dict, prefix: str, suffix: str) -> str:
    """', ball 97% paddle 100% right': the object accuracies among summary keys prefix<object>suffix."""
    found = {k[len(prefix):-len(suffix)]: v for k, v in s.items()
             if k.startswith(prefix) and k.endswith(suffix)}
    return (", " + " ".join(f"{k} {100 * v:.0f}%" for k, v in found.items()) + " right") if found else ""


def _print_summary(s: dict, run: Path) -> None:
    print("\n=== worldflow demo summary ===")
    print(f"tokenizer  held-out reconstruction PSNR {s['tokenizer_recon_psnr']:.2f} dB, "
          f"SSIM {s['tokenizer_recon_ssim']:.4f}" + _objects(s, "tokenizer_recon_", "_accuracy"))
    print(f"dynamics   rollout PSNR (mean h=1..16, K={s['steps']}) {s['rollout_psnr_mean_h1_16']:.2f} dB | "
          f"copy-last {s['copy_last_psnr_mean_h1_16']:.2f} dB | shuffled actions "
          f"{s['shuffled_actions_psnr_mean_h1_16']:.2f} dB" + _objects(s, "rollout_", "_accuracy_h1_16"))
    print(f"agent      real-env return (mean of {EVAL_EPISODES} episodes): imagination policy "
          f"{s['policy_return']:.2f} | "
          f"BC only {s['bc_return']:.2f} | random {s['random_return']:.2f} | expert {s['expert_return']:.2f}")
    prec = ", ".join(f"{ph} {p}" for ph, p in s["precision"].items())
    print(f"precision  {prec} (CPU: {s['cpu']})")
    print(f"time       {s['total_min']:.1f} min in all")
    for c in s["capped"]:
        print(f"CAPPED     {c['phase']} stopped by its max_minutes safety cap at step {c['step']} of "
              f"{c['steps']}: its schedule did not complete, so these results are not the preset's")
    print(f"look at    {run / 'eval' / 'rollout.gif'}  {run / 'eval' / 'psnr_vs_horizon.png'}")


def main(args: argparse.Namespace) -> int:
    from worldflow.cli.app import resolve_config

    cfg = resolve_config(args)
    run = Path(args.run)
    s = run_demo(cfg, run, Path(args.data) if args.data else None, progress=not args.no_progress)
    _print_summary(s, run)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worldflow.cli.app import add_config_args

    p = sub.add_parser("demo", help="run the whole pipeline on Catch (collect, train, evaluate)",
                       description=__doc__)
    p.add_argument("--run", default="runs/demo", help="run directory")
    p.add_argument("--data", default=None, help="dataset directory (default <run>/data)")
    p.add_argument("--no-progress", action="store_true")
    add_config_args(p)
    p.set_defaults(func=main)
