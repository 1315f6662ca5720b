"""The agent stage over seeds: is the imagination-trained policy better than behaviour cloning, and by how
much, on one world model? (Issue 21's protocol.)

    python -m benchmarks.agent_seeds --run RUN --data DATA --env worldflow/Catch-v0 --seeds 6 --out DIR

RUN holds a trained tokenizer and dynamics model (``make demo``'s run, or `worldflow train tokenizer` and
`worldflow train dynamics`). For every seed s = 0 .. seeds − 1, a fresh run directory under DIR shares
RUN's world model (copied) and trains phase 2 (behaviour cloning, ``train_bc.seed = s``) and phase 3 (RL
in imagination, ``train_agent.seed = s``). Both policies act, sampling, in the real env on the *same* env
seeds (``--episodes``, from ``--env-seed``), so each seed gives a paired difference.

Written to DIR/agent_seeds.json and .md:

- per seed: BC's and the policy's mean real return, their difference;
- the mean difference with a 95% confidence interval over seeds (Student t, paired by seed), the number
  of seeds that improved, and the policy's mean over BC's;
- per seed and phase-3 checkpoint: the real return of that checkpoint (``--curve-episodes``) beside the
  imagined return the phase logged at that step (``imagined_return`` of metrics.jsonl, the λ-return of the
  first imagined state), so a policy that exploits its model — imagined return up, real return down —
  shows as two curves that part, not as a guess.

Budgets are the preset's steps (``--config``, default small), so results hold on any CPU kind.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond 30 the normal's 1.96 is close
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]


def paired_summary(bc: list[float], policy: list[float]) -> dict[str, Any]:
    """Mean of policy − BC over seeds with a two-sided 95% t interval (paired by seed), seeds improved,
    and the ratio of the means."""
    diffs = [p - b for b, p in zip(bc, policy)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = T95[min(n - 1, 30) - 1] * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    mean_bc = statistics.fmean(bc)
    return {"seeds": n, "mean_difference": mean, "ci95": [mean - half, mean + half],
            "improved": sum(d > 0 for d in diffs), "mean_bc": mean_bc,
            "mean_policy": statistics.fmean(policy),
            "ratio": statistics.fmean(policy) / mean_bc if mean_bc else None}


def _seed_run(base: Path, out: Path, seed: int) -> Path:
    """A run directory with the base run's world model (tokenizer, dynamics and its latent caches)."""
    run = out / f"seed_{seed}"
    for part in ("tokenizer", "dynamics"):
        if not (run / part).exists():
            shutil.copytree(base / part, run / part)
    for name in ("config.json", "dataset.json"):
        shutil.copy2(base / name, run / name)
    return run


def _imagined_at(run: Path, step: int) -> float | None:
    """The imagined return phase 3 logged nearest to ``step`` (metrics.jsonl), or None."""
    best = None
    path = run / "agent" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if "imagined_return" in rec and (best is None or abs(rec["step"] - step) < abs(best[0] - step)):
            best = (rec["step"], rec["imagined_return"])
    return None if best is None else best[1]


def _curve(run: Path, env_id: str, episodes: int, env_seed: int) -> list[dict[str, Any]]:
    """Real return of every phase-3 checkpoint beside the imagined return logged at its step."""
    from worldflow.checkpoint import checkpoint_dirs
    from worldflow.eval.returns import policy_returns
    from worldflow.run import checkpoints_dir

    points = []
    root = checkpoints_dir(run, "agent")
    for d in sorted(checkpoint_dirs(root), key=lambda p: p.name):
        step = int(d.name.split("_")[-1])
        real = policy_returns(run, env_id, episodes, "agent", True, env_seed, progress=False,
                              checkpoint=d)["mean"]
        points.append({"step": step, "real_return": real, "imagined_return": _imagined_at(run, step)})
    return points


def run_seed(cfg, base: Path, data: str, env_id: str, out: Path, seed: int, episodes: int, env_seed: int,
             curve_episodes: int) -> dict[str, Any]:
    from worldflow.config import derive
    from worldflow.eval.returns import policy_returns
    from worldflow.train.agent import train_bc, train_imagination

    run = _seed_run(base, out, seed)
    # every phase-3 checkpoint is kept: each is a point of the imagined-vs-real curve
    scfg = derive(cfg, **{"train_bc.seed": seed, "train_agent.seed": seed, "train_agent.keep_checkpoints": 0})
    t0 = time.time()
    train_bc(scfg, data, run, progress=False)
    bc = policy_returns(run, env_id, episodes, "agent_bc", True, env_seed, progress=False)["mean"]
    train_imagination(scfg, data, run, progress=False)
    policy = policy_returns(run, env_id, episodes, "agent", True, env_seed, progress=False)["mean"]
    minutes = (time.time() - t0) / 60
    curve = _curve(run, env_id, curve_episodes, env_seed) if curve_episodes else []
    return {"seed": seed, "bc_return": bc, "policy_return": policy, "difference": policy - bc,
            "phases_2_3_minutes": round(minutes, 2), "curve": curve}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"Agent seeds on `{res['env']}`, preset `{res['config']}`, world model `{res['run']}`, "
             f"{res['episodes']} real episodes per policy (env seeds {res['env_seed']}...), "
             f"{res['machine']}.",
             "", "| seed | BC | imagination policy | difference | phases 2+3 (min) |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {r['bc_return']:.2f} | {r['policy_return']:.2f} | "
                     f"{r['difference']:+.2f} | {r['phases_2_3_minutes']} |")
    lo, hi = s["ci95"]
    ratio = "–" if s["ratio"] is None else f"{s['ratio']:.2f}x"
    lines += ["", f"Mean difference {s['mean_difference']:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}, paired by "
              f"seed); {s['improved']} of {s['seeds']} seeds improved; policy mean {s['mean_policy']:.2f} "
              f"against BC {s['mean_bc']:.2f} ({ratio})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from worldflow.cli.bench import machine
    from worldflow.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run with a trained tokenizer and dynamics model")
    p.add_argument("--data", required=True, help="the action-labelled dataset it was trained on")
    p.add_argument("--env", required=True, help="the real env to evaluate in, e.g. worldflow/Catch-v0")
    p.add_argument("--seeds", type=int, default=6, help="phase-2/3 seeds 0 .. seeds-1")
    p.add_argument("--episodes", type=int, default=50, help="real episodes per policy and seed")
    p.add_argument("--curve-episodes", type=int, default=20,
                   help="real episodes per phase-3 checkpoint for the imagined-vs-real curve (0: none)")
    p.add_argument("--env-seed", type=int, default=12345, help="first real-env seed (the same for all)")
    p.add_argument("--config", default="small", help="preset of phases 2 and 3")
    p.add_argument("--out", required=True, help="directory for the seed runs and the results")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(a.seeds):
        rows.append(run_seed(cfg, Path(a.run), a.data, a.env, out, s, a.episodes, a.env_seed,
                             a.curve_episodes))
        r = rows[-1]
        print(f"seed {s}: BC {r['bc_return']:.2f}, policy {r['policy_return']:.2f} "
              f"({r['difference']:+.2f}), {r['phases_2_3_minutes']} min", flush=True)
    m = machine()
    res = {"env": a.env, "run": a.run, "config": a.config, "overrides": a.overrides, "episodes": a.episodes,
           "env_seed": a.env_seed, "rows": rows,
           "summary": paired_summary([r["bc_return"] for r in rows], [r["policy_return"] for r in rows]),
           "machine": f"{m['date']}, {m['processor']} ({m.get('cpu', '?')})"}
    (out / "agent_seeds.json").write_text(json.dumps(res, indent=2))
    (out / "agent_seeds.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
