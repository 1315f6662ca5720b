"""Dynamics ablations at small scale (Dreamer 4's comparisons): one trained tokenizer, one dynamics model per
variant and seed, the same data, step count and evaluation; writes a JSON file and a Markdown table.

    python -m benchmarks.ablations --run runs/demo --data runs/demo/data --steps 1000 --seeds 0,1

Variants (config switches): x- vs v-prediction, shortcut vs plain flow matching, ramp weight on/off,
context noise on/off. Every variant trains a fixed number of steps, so each finishes its learning-rate
schedule (a wall-time cut would stop some variants mid-schedule and compare unannealed models). Each is
scored on the same held-out clips with K = 1, 4 and 64 sampling steps: mean PSNR over horizons 1-16 and,
on Catch, ball accuracy (the fraction of predicted frames with the ball in exactly the right cell), the
measure that tells whether a model tracks the one object that matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from worldflow.config import load_config

VARIANTS = {
    "shortcut x-pred (default)": [],
    "flow matching x-pred": ["dynamics.objective=flow_x"],
    "flow matching v-pred": ["dynamics.objective=flow_v"],
    "shortcut, no ramp weight": ["dynamics.ramp_weight=false"],
    "shortcut, clean context": ["dynamics.context_noise=false"],
}
SWEEP = [1, 4, 64]
HORIZONS = [1, 2, 4, 8, 16]
CONTEXT = 8


def _variant_run(base_run: Path, out: Path, name: str) -> Path:
    """A fresh run directory sharing the base run's trained tokenizer (copied, not retrained)."""
    run = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    if not (run / "tokenizer").exists():
        shutil.copytree(base_run / "tokenizer", run / "tokenizer")
    return run


def _score(run: Path, data: str) -> dict[str, float]:
    from worldflow.eval.rollouts import evaluate_dynamics

    res = evaluate_dynamics(run, data, CONTEXT, HORIZONS, 4, SWEEP, 32, run / "eval", progress=False)
    row = {f"psnr_k{k}": res["steps_sweep"][k] for k in SWEEP}
    row["copy_last"] = sum(res["baseline_copy_last"]["psnr"].values()) / len(HORIZONS)
    for k, objs in res.get("steps_sweep_objects", {}).items():
        row[f"ball_k{k}"] = objs["ball"]
    if "objects" in res:
        row["ball_copy_last"] = sum(res["baseline_copy_last"]["objects"]["ball"].values()) / len(HORIZONS)
    return row


LABELS = {"copy_last": "PSNR copy-last", "ball_copy_last": "ball % copy-last"}


def _label(key: str) -> str:
    return LABELS.get(key) or key.replace("psnr_k", "PSNR K=").replace("ball_k", "ball % K=")


def _cell(vals: list[float], pct: bool) -> str:
    """Mean over seeds, ± half the range when there are several seeds."""
    scale, fmt = (100.0, "{:.1f}") if pct else (1.0, "{:.2f}")
    text = fmt.format(statistics.mean(vals) * scale)
    if len(vals) > 1:
        text += " ± " + fmt.format((max(vals) - min(vals)) / 2 * scale)
    return text


def _table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per variant, one column per measure; rows[variant][seed][measure]."""
    keys = [k for k in next(iter(next(iter(rows.values())).values())) if k != "train_minutes"]
    lines = ["| variant | seeds | " + " | ".join(_label(k) for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for name, seeds in rows.items():
        cells = [_cell([r[k] for r in seeds.values()], k.startswith("ball")) for k in keys]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from worldflow.io import atomic_write_text
    from worldflow.train import dynamics as train_dynamics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run with a trained tokenizer")
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=1000, help="dynamics training steps per variant and seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--out", default="benchmarks/ablations")
    args = p.parse_args()
    out = Path(args.out)
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    done = out / "ablations.json"
    rows: dict = json.loads(done.read_text()) if done.exists() else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            if str(seed) in rows.get(name, {}):
                continue  # resumable: a finished (variant, seed) is not retrained
            run = _variant_run(Path(args.run), out, f"{name} s{seed}")
            cfg = load_config(args.config, [*VARIANTS[name], f"train_dynamics.steps={args.steps}",
                                            "train_dynamics.max_minutes=0", "train_dynamics.eval_every=0",
                                            f"train_dynamics.seed={seed}"])
            t0 = time.time()
            train_dynamics.train(cfg, args.data, run, progress=False)
            row = {**_score(run, args.data), "train_minutes": (time.time() - t0) / 60}
            rows.setdefault(name, {})[str(seed)] = row
            atomic_write_text(done, json.dumps(rows, indent=2))
            print(name, seed, {k: round(v, 3) for k, v in row.items()}, flush=True)
    table = _table(rows)
    atomic_write_text(out / "ablations.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
