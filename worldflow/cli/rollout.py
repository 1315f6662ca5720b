"""``worldflow rollout``: open-loop rollouts of held-out clips as a video (truth | prediction | diff)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worldflow.argtypes import nonneg_int, positive_int, power_of_two


def main(args: argparse.Namespace) -> int:
    from worldflow.eval.rollouts import heldout_rollouts

    model, ev = heldout_rollouts(args.run, args.data, args.context, args.horizon, args.clips, args.seed,
                                 steps=[args.steps])
    pred = ev.predict(model, args.steps)
    out = Path(args.out)
    ev.write_video(pred, out.with_suffix(""), n=args.clips)
    print(f"wrote {out.with_suffix('.mp4')} and {out.with_suffix('.gif')}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="write a rollout video of held-out clips",
                       description="Roll the world model out from held-out contexts with the true actions "
                                   "and write ground truth | prediction | difference (mp4 and GIF).")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--context", type=positive_int, default=8, help="context frames C")
    p.add_argument("--horizon", type=positive_int, default=16, help="frames to generate H")
    p.add_argument("--steps", type=power_of_two, default=4, help="sampling steps K per frame")
    p.add_argument("--clips", type=positive_int, default=4, help="clips in the video")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="rollout.mp4", help="output path (.mp4; a .gif is written beside it)")
    p.set_defaults(func=main)
