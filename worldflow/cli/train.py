"""``worldflow train tokenizer|dynamics|agent``: the command line of the three training phases."""

from __future__ import annotations

import argparse

from worldflow.cli.app import add_train_args, resolve_config
from worldflow.train import agent as train_agent
from worldflow.train.dynamics import train as train_dynamics
from worldflow.train.tokenizer import train as train_tokenizer
from worldflow.train.trainer import status_note


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``worldflow train`` and its three phases."""
    tp = sub.add_parser("train", help="train the tokenizer, the dynamics model or the agent")
    tsub = tp.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_phase(tsub, "tokenizer")
    _add_phase(tsub, "dynamics")
    _add_agent(tsub)


def _tokenizer_line(cfg, s: dict) -> str:
    ev, nan = s["eval"], float("nan")
    return (f"tokenizer: step {s['step']}, held-out PSNR {ev.get('recon_psnr', nan):.2f} dB, "
            f"SSIM {ev.get('recon_ssim', nan):.4f}, {s['minutes']:.1f} min")


def _dynamics_line(cfg, s: dict) -> str:
    ev, nan = s["eval"], float("nan")
    return (f"dynamics: step {s['step']}, {s['minutes']:.1f} min, held-out PSNR (h=1..16, "
            f"K={cfg.dynamics.steps}) {ev.get('psnr', nan):.2f} dB vs copy-last "
            f"{ev.get('psnr_copy_last', nan):.2f} dB")


# name -> (train function, summary line, help, description, --run help)
_PHASES = {
    "tokenizer": (train_tokenizer, _tokenizer_line, "train the causal video tokenizer",
                  "Train the causal video tokenizer on a collected dataset.",
                  "run directory (created; resumed if it has checkpoints)"),
    "dynamics": (train_dynamics, _dynamics_line, "train the shortcut-forcing dynamics model",
                 "Train the dynamics model on latents of the run's trained tokenizer.",
                 "run directory holding a trained tokenizer"),
}


def _phase_main(args: argparse.Namespace) -> int:
    train, line = _PHASES[args.what][:2]
    cfg = resolve_config(args)
    s = train(cfg, args.data, args.run, resume=not args.no_resume, progress=not args.no_progress)
    print(line(cfg, s) + status_note(s))
    return 0


def _add_phase(sub: argparse._SubParsersAction, name: str) -> None:
    _, _, help_, description, run_help = _PHASES[name]
    p = sub.add_parser(name, help=help_, description=description)
    add_train_args(p, run_help)
    p.set_defaults(func=_phase_main)


def agent_main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.online:
        if not args.env:
            raise SystemExit("worldflow train agent --online needs --env ID")
        train_agent.online_loop(cfg, args.data, args.run, args.env, progress=not args.no_progress)
        return 0
    if args.phase in ("bc", "all"):
        s = train_agent.train_bc(cfg, args.data, args.run, not args.no_resume, not args.no_progress)
        print(f"agent_bc: step {s['step']}, {s['minutes']:.1f} min, loss {s['train'].get('loss', 0):.4f}"
              f"{status_note(s)}")
    if args.phase in ("imagine", "all"):
        s = train_agent.train_imagination(cfg, args.data, args.run, not args.no_resume, not args.no_progress)
        print(f"agent: step {s['step']}, {s['minutes']:.1f} min, imagined return "
              f"{s['train'].get('imagined_return', float('nan')):.3f}{status_note(s)}")
    return 0


def _add_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="train the agent: behaviour cloning, then RL in imagination",
                       description=train_agent.__doc__)
    add_train_args(p, "run directory with a trained tokenizer and dynamics model")
    p.add_argument("--phase", choices=("bc", "imagine", "all"), default="all",
                   help="bc: phase 2 only; imagine: phase 3 only (needs bc); all: both (default)")
    p.add_argument("--online", action="store_true", help="Dreamer-style loop with a real env (needs --env)")
    p.add_argument("--env", help="gymnasium env id for --online")
    p.set_defaults(func=agent_main)
