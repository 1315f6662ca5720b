"""``worldflow rollout``: open-loop rollouts of held-out clips as a video (truth | prediction | diff)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    from worldflow.distributed import device_of
    from worldflow.eval.rollouts import RolloutEvaluator, with_frames
    from worldflow.run import action_space_of, latent_bank, load_dynamics, load_tokenizer, phase_config

    cfg = phase_config(args.run, "dynamics")
    device = device_of(cfg)
    tok, _ = load_tokenizer(args.run, device)
    model, _ = load_dynamics(args.run, action_space_of(args.data), device)
    if args.context > model.cfg.context:
        raise SystemExit(f"worldflow rollout: --context {args.context} exceeds the context the model was "
                         f"trained for ({model.cfg.context} frames)")
    bank = with_frames(latent_bank(args.run, args.data, cfg, "heldout", tok, True), args.data, cfg, True)
    ev = RolloutEvaluator(tok, bank, cfg, device, context=args.context, horizon=args.horizon,
                          clips=args.clips, seed=args.seed)
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
    p.add_argument("--context", type=int, default=8, help="context frames C")
    p.add_argument("--horizon", type=int, default=16, help="frames to generate H")
    p.add_argument("--steps", type=int, default=4, help="sampling steps K per frame")
    p.add_argument("--clips", type=int, default=4, help="clips in the video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="rollout.mp4", help="output path (.mp4; a .gif is written beside it)")
    p.set_defaults(func=main)
