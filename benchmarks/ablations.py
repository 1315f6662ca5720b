"""Dynamics ablations at small scale (Dreamer 4's comparisons): one trained tokenizer, one dynamics model per
variant and seed, the same data, step count and evaluation; writes a JSON file and a Markdown table.

    python -m benchmarks.ablations --run runs/demo --data runs/demo/data --steps 1000 --seeds 0,1
    python -m benchmarks.ablations --objectives --setting catch --seeds 0,1,2 --steps 1000 \
        --out benchmarks/objectives

``--objectives`` is the steps curve of Shortcut Models §3 / Dreamer 4 §3.2 (a shortcut model at few steps
against flow matching at many): shortcut x-prediction, plain flow x-prediction and flow v-prediction, each
trained per seed on one tokenizer, then scored at every K of ``--sweep`` with PSNR, the Fréchet distance
to held-out real frames and, where the env's frames can be checked, validity; the flow models also with
Heun's sampler at (about) the same network evaluations (K Heun steps cost 2K - 1). ``--setting`` names a
suite env (``catch``, ``pong``, ...): its data is collected and its tokenizer trained under the output
folder unless ``--run`` / ``--data`` are given. Results accumulate per setting in ``objectives.json``
(resumable); ``objectives.md`` holds the tables and ``quality_vs_steps.png`` the curves of every setting.

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
    # An EMA of the weights, for sampling and optionally for the bootstrap targets, as Shortcut Models use.
    # 0.99 averages about the last 100 of 1000 steps: the average starts at the initial weights, so 0.999
    # would still hold a third of them at step 1000.
    "shortcut, EMA 0.99": ["dynamics.ema=0.99"],
    "shortcut, EMA 0.99 targets": ["dynamics.ema=0.99", "dynamics.ema_targets=true"],
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


# ---------------------------------------------------------------------------------------------------
# The objectives' steps curve (--objectives)

OBJECTIVES = ["shortcut x-pred (default)", "flow matching x-pred", "flow matching v-pred"]
CURVE_SWEEP = [1, 2, 4, 8, 16, 32, 64]
HEUN_SWEEP = [1, 2, 4, 8, 16, 32]  # 1, 3, 7, 15, 31, 63 network evaluations
METRICS = ("calls", "psnr", "frechet", "validity", "ball")
TITLES = {"psnr": "PSNR (dB)", "frechet": "Fréchet (lower is better)", "validity": "valid frames"}
CLIPS = 32


def _prepared(setting: str, root: Path, config: str) -> tuple[Path, Path]:
    """The setting's dataset and a run with its trained tokenizer under ``root`` (made if missing):
    the suite member's env, behaviour policy and episode cap, the preset's episode count and tokenizer."""
    from worldflow.cli.suite import MEMBERS
    from worldflow.data.collect import collect
    from worldflow.train import tokenizer as train_tokenizer

    m = MEMBERS[setting]
    cfg = load_config(config)
    data, run = root / setting / "data", root / setting / "tokenizer_run"
    if not (data / "manifest.json").exists():
        c = cfg.collect
        collect(m.env, c.episodes + c.random_episodes, data, policy=m.policy, size=cfg.data.size,
                seed=c.seed, max_steps=m.max_steps, progress=False)
    if not (run / "tokenizer" / "latest.json").exists():
        train_tokenizer.train(cfg, data, run, progress=False)
    return data, run


def _curve(run: Path, data: Path, objective: str) -> dict[str, dict[str, dict[int, float | None]]]:
    """{sampler: {"calls" | "psnr" | "frechet" | "validity" | "ball": {K: value}}} on the held-out clips
    (means over HORIZONS); Heun only for the flow objectives (a shortcut model's steps are its own)."""
    import dataclasses

    from worldflow import flow
    from worldflow.eval.rollouts import _mean_over, heldout_rollouts

    model, ev = heldout_rollouts(run, data, CONTEXT, max(HORIZONS), CLIPS, progress=False,
                                 steps=CURVE_SWEEP, scored=HORIZONS)
    samplers = {"euler": CURVE_SWEEP}
    if objective != "shortcut":
        samplers["heun"] = HEUN_SWEEP
    out: dict = {"frechet_real_floor": None}
    for sampler, ks in samplers.items():
        model.cfg = dataclasses.replace(model.cfg, sampler=sampler)
        cur: dict[str, dict[str, float | None]] = {m: {} for m in METRICS}
        for k in ks:  # keys are strings, as they come back from the JSON file
            r = ev.score(model, k, HORIZONS, frechet=True, progress=False)
            fr = ev.frechet(r)
            cur["calls"][str(k)] = flow.network_evaluations(k, sampler)
            cur["psnr"][str(k)] = _mean_over(r.psnr, HORIZONS)
            cur["frechet"][str(k)] = _mean_over(fr.distance, HORIZONS)
            cur["validity"][str(k)] = None if r.validity is None else _mean_over(r.validity, HORIZONS)
            cur["ball"][str(k)] = None if not r.objects else _mean_over(r.objects.get("ball", {}), HORIZONS)
            if fr.floor is not None:
                out["frechet_real_floor"] = _mean_over(fr.floor, HORIZONS)
        out[sampler] = cur
    out["copy_last_psnr"] = _mean_over(ev.copy_last(HORIZONS).psnr, HORIZONS)
    return out


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _agg(vals: list[float | None]) -> tuple[float, float] | None:
    """(mean, half range) over seeds of the values that exist."""
    v = [x for x in vals if x is not None]
    return (statistics.mean(v), (max(v) - min(v)) / 2) if v else None


def _curve_rows(seeds: dict[str, dict]) -> list[tuple[str, str, dict[str, dict[int, tuple[float, float]]]]]:
    """(variant, sampler, {metric: {K: (mean, half range)}}) for one setting's results."""
    rows = []
    for name in [n for n in VARIANTS if n in seeds]:  # the objectives first, then any other scored
        per_seed = list(seeds[name].values())
        if not per_seed:
            continue
        for sampler in ("euler", "heun"):
            if sampler not in per_seed[0]:
                continue
            metrics = {}
            for metric, by_k in per_seed[0][sampler].items():
                metrics[metric] = {k: _agg([r[sampler][metric].get(k) for r in per_seed]) for k in by_k}
            rows.append((name, sampler, metrics))
    return rows


def _curve_table(setting: str, seeds: dict[str, dict]) -> str:
    """Markdown: one row per (variant, sampler, metric), one column per K; mean ± half range over seeds."""
    lines = []
    for name, sampler, metrics in _curve_rows(seeds):
        ks = list(metrics["psnr"])
        if not lines:
            lines = [f"**{setting}** (K: sampling steps; network evaluations in the `calls` row)", "",
                     "| variant | sampler | metric | " + " | ".join(f"K={k}" for k in CURVE_SWEEP) + " |",
                     "|---" * (len(CURVE_SWEEP) + 3) + "|"]
        for metric in METRICS:
            if all(metrics[metric][k] is None for k in ks):
                continue
            cells = []
            for k in CURVE_SWEEP:
                a = metrics[metric].get(str(k))
                if a is None:
                    cells.append("–")
                elif metric == "calls":
                    cells.append(f"{a[0]:.0f}")
                elif metric in ("validity", "ball"):
                    cells.append(f"{100 * a[0]:.1f} ± {100 * a[1]:.1f}%")
                elif metric == "frechet":
                    cells.append(f"{a[0]:.4f} ± {a[1]:.4f}")
                else:
                    cells.append(f"{a[0]:.2f} ± {a[1]:.2f}")
            lines.append(f"| {name} | {sampler} | {metric} | " + " | ".join(cells) + " |")
    floors = [r.get("frechet_real_floor") for v in seeds.values() for r in v.values()]
    copy = [r.get("copy_last_psnr") for v in seeds.values() for r in v.values()]
    if lines and _agg(floors):
        lines.append(f"\nReal-vs-real Fréchet floor {_agg(floors)[0]:.4f}; "
                     f"copy-last PSNR {_agg(copy)[0]:.2f} dB.")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, dict], path: Path) -> None:
    """quality_vs_steps.png: per setting a row of PSNR, Fréchet and validity against network evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    metrics = ("psnr", "frechet", "validity")
    fig, axes = plt.subplots(len(settings), 3, figsize=(13, 3.4 * len(settings)), squeeze=False)
    for i, setting in enumerate(settings):
        for name, sampler, m in _curve_rows(results[setting]):
            ks = list(m["calls"])
            x = [m["calls"][k][0] for k in ks]
            for j, metric in enumerate(metrics):
                pts = [(xx, m[metric][k]) for xx, k in zip(x, ks) if m[metric][k] is not None]
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1][0] for p in pts]
                lo, hi = [p[1][0] - p[1][1] for p in pts], [p[1][0] + p[1][1] for p in pts]
                line, = axes[i, j].plot(xs, ys, marker="o", ms=3, ls="-" if sampler == "euler" else "--",
                                        label=f"{name.replace(' (default)', '')}, {sampler}")
                axes[i, j].fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network evaluations per frame")
            ax.set_title(f"{setting}: {TITLES[metric]}")
            if metric == "frechet":
                ax.set_yscale("log")
        axes[i, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def objectives_main(args: argparse.Namespace) -> int:
    """--objectives: train the three objectives per seed on one setting, score their steps curves."""
    from worldflow.io import atomic_write_text
    from worldflow.train import dynamics as train_dynamics

    out = Path(args.out)
    if args.run and args.data:
        base, data = Path(args.run), Path(args.data)
    else:
        data, base = _prepared(args.setting, out, args.config)
    done = out / "objectives.json"
    results: dict = json.loads(done.read_text()) if done.exists() else {}
    seeds_done = results.setdefault(args.setting, {})
    names = args.only or OBJECTIVES
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            if str(seed) in seeds_done.get(name, {}):
                continue  # resumable: a finished (variant, seed) is not retrained
            run = _variant_run(base, out / args.setting, f"{name} s{seed}")
            cfg = load_config(args.config, [*VARIANTS[name], f"train_dynamics.steps={args.steps}",
                                            "train_dynamics.max_minutes=0", "train_dynamics.eval_every=0",
                                            f"train_dynamics.seed={seed}"])
            t0 = time.time()
            train_dynamics.train(cfg, data, run, progress=False)
            t1 = time.time()
            row = {**_curve(run, data, cfg.dynamics.objective), "train_minutes": (t1 - t0) / 60,
                   "eval_minutes": (time.time() - t1) / 60}
            seeds_done.setdefault(name, {})[str(seed)] = row
            atomic_write_text(done, json.dumps(results, indent=1))
            e = row["euler"]
            print(f"{args.setting} {name} s{seed}: PSNR K=1/4/64 "
                  + " / ".join(_num(e["psnr"].get(k), "{:.2f}") for k in ("1", "4", "64"))
                  + ", Fréchet " + " / ".join(_num(e["frechet"].get(k), "{:.4f}") for k in ("1", "4", "64"))
                  + f", {row['train_minutes']:.1f} + {row['eval_minutes']:.1f} min", flush=True)
    md = "\n".join(_curve_table(s, r) for s, r in results.items())
    atomic_write_text(out / "objectives.md", md)
    _plot(results, out / "quality_vs_steps.png")
    print(md)
    return 0


def main() -> int:
    from worldflow.io import atomic_write_text
    from worldflow.train import dynamics as train_dynamics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run with a trained tokenizer (required without --objectives)")
    p.add_argument("--data")
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=1000, help="dynamics training steps per variant and seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT",
                   help="a variant name, repeatable (names hold commas; default: all, with --objectives the "
                        "three objectives)")
    p.add_argument("--out", default="benchmarks/ablations")
    p.add_argument("--objectives", action="store_true",
                   help="the steps curve of shortcut / flow x / flow v (with Heun) on --setting")
    p.add_argument("--setting", default="catch", help="with --objectives: a suite env (catch, pong, ...)")
    args = p.parse_args()
    unknown = [n for n in args.only if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if args.objectives:
        return objectives_main(args)
    if not (args.run and args.data):
        p.error("--run and --data are required without --objectives")
    out = Path(args.out)
    names = [n for n in VARIANTS if not args.only or n in args.only]
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
