"""Dynamics ablations at small scale (Dreamer 4's comparisons): one trained tokenizer, one dynamics model per
variant, the same data, steps and evaluation; writes a JSON file and a Markdown table.

    python -m benchmarks.ablations --run runs/demo --data runs/demo/data --minutes 5

Variants (config switches): x- vs v-prediction, shortcut vs plain flow matching, ramp weight on/off,
context noise on/off. Each is scored with K = 4 and K = 64 on held-out clips (mean PSNR over horizons).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from worldflow.config import load_config

VARIANTS = {
    "shortcut x-pred (default)": [],
    "flow matching x-pred": ["dynamics.objective=flow_x"],
    "flow matching v-pred": ["dynamics.objective=flow_v"],
    "shortcut, no ramp weight": ["dynamics.ramp_weight=false"],
    "shortcut, clean context": ["dynamics.context_noise=false"],
}


def _variant_run(base_run: Path, out: Path, name: str) -> Path:
    """A fresh run directory sharing the base run's trained tokenizer (copied, not retrained)."""
    run = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    if not (run / "tokenizer").exists():
        shutil.copytree(base_run / "tokenizer", run / "tokenizer")
    return run


def main() -> int:
    from worldflow import train_dynamics
    from worldflow.evaluate import evaluate_dynamics
    from worldflow.io import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True, help="a run with a trained tokenizer")
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="small")
    p.add_argument("--minutes", type=float, default=5.0, help="dynamics training budget per variant")
    p.add_argument("--out", default="benchmarks/ablations")
    args = p.parse_args()
    out = Path(args.out)
    rows = {}
    for name, overrides in VARIANTS.items():
        run = _variant_run(Path(args.run), out, name)
        cfg = load_config(args.config, [*overrides, f"train_dynamics.max_minutes={args.minutes}"])
        train_dynamics.train(cfg, args.data, run)
        horizons = [1, 2, 4, 8, 16]
        res = evaluate_dynamics(run, args.data, 8, horizons, 4, [4, 64], 32, run / "eval")
        rows[name] = {"psnr_k4": res["steps_sweep"][4], "psnr_k64": res["steps_sweep"][64],
                      "copy_last": sum(res["baseline_copy_last"]["psnr"].values()) / len(horizons)}
    atomic_write_text(out / "ablations.json", json.dumps(rows, indent=2))
    lines = ["| variant | PSNR K=4 | PSNR K=64 | copy-last |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['psnr_k4']:.2f} | {v['psnr_k64']:.2f} | {v['copy_last']:.2f} |"
              for k, v in rows.items()]
    atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
