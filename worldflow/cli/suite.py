"""``worldflow bench --suite``: one preset on a suite of envs, collect -> tokenizer -> dynamics -> eval.

Everything measured on Catch alone fits the preset to Catch. The suite runs the same command on games of
other kinds (classic control rendered to pixels, Atari, a grid world, an open world) and on imported
real video, and writes one row per member: held-out PSNR (mean over h 1..16) of the model, copy-last and
shuffled actions, the tokenizer's ceiling (the true latents decoded), the Fréchet distance of the last
window with its real-vs-real floor, object accuracy where the sprites can be read, and the minutes each
stage took on this CPU. A member whose optional package is missing is skipped, its row naming the extra
to install (``pip install -e .[suite]``); nothing is downloaded.

The step budget is the preset's (``--config``, default ``small``); results are a property of the steps,
so they hold on any CPU kind, only the minutes differ.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldflow.config import Config, load_config
from worldflow.errors import InputError


@dataclass(frozen=True)
class Member:
    """One suite environment."""

    name: str  # row name and sub-directory
    env: str | None  # gymnasium id; None: an imported video folder (``--videos``)
    needs: str | None  # module that must import, else the row is skipped
    extra: str  # the pip extra that provides it
    policy: str  # behaviour policy of the collected episodes
    max_steps: int  # cap on an episode's steps (long games are cut: truncated)


SUITE = (
    Member("catch", "worldflow/Catch-v0", None, "", "epsilon-expert", 1000),
    Member("cartpole", "CartPole-v1", "pygame", "classic", "random", 200),
    Member("pong", "ALE/Pong-v5", "ale_py", "atari", "random", 300),
    Member("minigrid", "MiniGrid-Empty-8x8-v0", "minigrid", "minigrid", "random", 100),
    Member("crafter", "worldflow/Crafter-v0", "crafter", "crafter", "random", 300),
    Member("video", None, None, "", "", 0),
)
MEMBERS = {m.name: m for m in SUITE}
HORIZONS = list(range(1, 17))


def _mean(m: dict | None) -> float | None:
    vals = [v for v in (m or {}).values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def _minutes(t0: float) -> float:
    return round((time.time() - t0) / 60, 2)


def run_member(m: Member, cfg: Config, root: Path, videos: Path | None, progress: bool) -> dict[str, Any]:
    """collect (or import) -> train tokenizer -> train dynamics -> eval for one member; its row."""
    from worldflow.data.collect import collect
    from worldflow.data.importing import import_videos
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    row: dict[str, Any] = {"member": m.name, "env": m.env or (str(videos) if videos else None)}
    if m.needs and importlib.util.find_spec(m.needs) is None:
        return {**row, "skipped": f"needs {m.needs}: pip install -e .[{m.extra}]"}
    if m.env is None and videos is None:
        return {**row, "skipped": "needs --videos DIR (a folder of video files)"}
    data, run = root / m.name / "data", root / m.name / "run"
    t0 = time.time()
    if not (data / "manifest.json").exists():
        if m.env is None:
            import_videos([videos], data, size=cfg.data.size, episode_len=64, progress=progress)
        else:
            c = cfg.collect
            collect(m.env, c.episodes + c.random_episodes, data, policy=m.policy, size=cfg.data.size,
                    seed=c.seed, max_steps=m.max_steps, progress=progress)
    row["collect_min"] = _minutes(t0)
    t0 = time.time()
    tok = train_tokenizer.train(cfg, data, run, progress=progress)
    row["tokenizer_min"], row["tokenizer_recon_psnr"] = _minutes(t0), tok["eval"].get("recon_psnr")
    t0 = time.time()
    dyn = train_dynamics.train(cfg, data, run, progress=progress)
    row["dynamics_min"] = _minutes(t0)
    row["precision"] = {"tokenizer": tok["precision"], "dynamics": dyn["precision"]}
    t0 = time.time()
    row.update(eval_row(cfg, run, data, root / m.name, progress))
    row["eval_min"] = _minutes(t0)
    return row


def eval_row(cfg: Config, run: Path, data: Path, out: Path, progress: bool = False) -> dict[str, Any]:
    """``worldflow eval`` of a trained member (horizons 1..16 and 100), saved as ``out/eval.json``, and
    the suite's numbers from it."""
    from worldflow.eval.rollouts import evaluate_dynamics

    context = min(8, cfg.dynamics.context)  # the demo's context, or less for a model trained on less
    # no hallucination signals here: on 300-frame episodes they would add 4 rollouts of 100 frames each
    ev = evaluate_dynamics(run, data, context, HORIZONS + [100], cfg.dynamics.steps, None, 32,
                           out / "eval_media", progress=progress, uncertainty_samples=0)
    (out / "eval.json").write_text(json.dumps(ev, indent=2))
    psnr = {h: v for h, v in ev["psnr"].items() if h in HORIZONS}
    shuffled = (ev.get("shuffled_actions") or {}).get("psnr")
    return dict(
        model_psnr=_mean(psnr),
        copy_last_psnr=_mean({h: ev["baseline_copy_last"]["psnr"][h] for h in psnr}),
        shuffled_psnr=_mean({h: shuffled[h] for h in psnr}) if shuffled else None,
        ceiling_psnr=_mean({h: ev["tokenizer_ceiling"][h] for h in psnr}),
        model_psnr_h8=ev["psnr"].get(8), shuffled_psnr_h8=shuffled.get(8) if shuffled else None,
        ceiling_h1=ev["tokenizer_ceiling"].get(1), copy_last_h1=ev["baseline_copy_last"]["psnr"].get(1),
        # the same comparison as PSNR of the mean MSE, where exact repeats cannot dominate
        ceiling_pooled_h1=ev["tokenizer_ceiling_pooled"].get(1),
        copy_last_pooled_h1=ev["baseline_copy_last"]["psnr_pooled"].get(1),
        frechet_last=ev["frechet_matched"].get(100),
        frechet_floor_last=(ev.get("frechet_real_floor") or {}).get(100),
        objects={k: _mean({h: v[h] for h in psnr}) for k, v in ev.get("objects", {}).items()} or None,
        validity=_mean({h: v for h, v in (ev.get("validity") or {}).items() if h in psnr}),
        truth_horizon=ev["truth_horizon"])


def run_suite(names: list[str], preset: str, overrides: list[str], root: Path, videos: Path | None,
              progress: bool = True) -> dict[str, Any]:
    """Every named member in turn; a member that fails keeps its error in its row and the suite goes on.
    The caller adds ``machine`` (worldflow.cli.bench.machine) before :func:`markdown`."""
    unknown = [n for n in names if n not in MEMBERS]
    if unknown:
        raise InputError(f"unknown suite member(s) {unknown}: choose from {', '.join(MEMBERS)}")
    cfg = load_config(preset, overrides)
    rows = []
    for name in names:
        try:
            rows.append(run_member(MEMBERS[name], cfg, root, videos, progress))
        except Exception as e:  # one member's failure is a result to report, not the end of the suite
            rows.append({"member": name, "error": f"{type(e).__name__}: {e}"})
        print(markdown_row(rows[-1]), flush=True)
    return {"preset": preset, "overrides": overrides, "rows": rows}


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


HEADER = ("| member | model | copy-last | shuffled | ceiling | ceiling h1 / copy-last h1 | the same, pooled "
          "| Fréchet (16, 100] / floor | objects | minutes collect / tok / dyn / eval |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict[str, Any]) -> str:
    """One table row: PSNR means over h 1..16 (dB), then the ceiling at h 1, Fréchet, minutes."""
    if "skipped" in r or "error" in r:
        return f"| {r['member']} | {r.get('skipped') or r.get('error')} ||||||||| "
    objects = [f"{k} {v:.0%}" for k, v in (r.get("objects") or {}).items()]
    if r.get("validity") is not None:  # share of generated frames a real game can show
        objects.append(f"valid {r['validity']:.0%}")
    objects = ", ".join(objects) or "–"
    return (f"| {r['member']} | {_f(r['model_psnr'])} | {_f(r['copy_last_psnr'])} | {_f(r['shuffled_psnr'])} "
            f"| {_f(r['ceiling_psnr'])} | {_f(r['ceiling_h1'])} / {_f(r['copy_last_h1'])} "
            f"| {_f(r.get('ceiling_pooled_h1'))} / {_f(r.get('copy_last_pooled_h1'))} "
            f"| {_f(r['frechet_last'], '{:.3f}')} / {_f(r['frechet_floor_last'], '{:.3f}')} | {objects} "
            f"| {r['collect_min']} / {r['tokenizer_min']} / {r['dynamics_min']} / {r['eval_min']} |")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Suite, preset `{res['preset']}` {' '.join(res['overrides'])}, measured {m['date']} on "
             f"{m['processor']} ({m.get('cpu', '?')}; {m['threads']} threads), torch {m['torch']}. PSNR in "
             f"dB, means over held-out horizons 1..16 (shorter where the held-out episodes end).", "", HEADER]
    return "\n".join(lines + [markdown_row(r) for r in res["rows"]]) + "\n"
