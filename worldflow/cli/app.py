"""The ``worldflow`` command: collect, train tokenizer|dynamics|agent, eval, rollout, demo, bench, play.

Each subcommand lives in the module of its concept; this file only builds the argument parser and
dispatches, importing heavy modules lazily so ``worldflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from worldflow.config import Config, load_config
from worldflow.errors import WorldflowError, one_line

# subcommand -> module exposing add_parser(subparsers) (which sets func=...)
_COMMANDS = {
    "collect": "worldflow.data.collect",
    "import": "worldflow.data.importing",
    "train": "worldflow.cli.train",
    "eval": "worldflow.eval.rollouts",
    "rollout": "worldflow.cli.rollout",
    "demo": "worldflow.cli.demo",
    "bench": "worldflow.cli.bench",
    "config": "worldflow.cli.config",
    "play": "worldflow.cli.play",
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The config flags every training/eval command shares."""
    p.add_argument("--config", default="small", help="preset name (tiny|small|base) or a YAML file")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="dotted config overrides, e.g. train_tokenizer.steps=100")


def add_train_args(p: argparse.ArgumentParser, run_help: str) -> None:
    """The flags every ``worldflow train ...`` command shares (a public contract: keep the names)."""
    p.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="dataset directory written by `worldflow collect` or `worldflow import`; give it "
                        "more than once to train on several together (their mix: data.mix)")
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)


def _add_module(sub: argparse._SubParsersAction, name: str, module: str) -> None:
    try:
        importlib.import_module(module).add_parser(sub)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        p = sub.add_parser(name, help="(not available in this build)")
        p.set_defaults(func=lambda a, n=name: sys.exit(f"worldflow {n}: not available in this build"))


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``worldflow: error: <command>: <message>`` and exit 2.

    Sub-command parsers are made with the class of their parent, so every command gets it."""

    def error(self, message: str):
        self.exit(2, f"worldflow: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="worldflow", description=__doc__.split("\n")[0],
        epilog="--debug (anywhere) or WORLDFLOW_DEBUG=1: show the traceback of an error in the input")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _COMMANDS.items():
        _add_module(sub, name, module)
    return parser


USER_ERRORS = (WorldflowError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
BUG = ("worldflow: this is a bug in worldflow, not in your input: please report it with the command you ran "
       "and the traceback above")


def main(argv: list[str] | None = None) -> int:
    """Run the ``worldflow`` command; returns its exit code (2: an error in the input, 1: a bug).

    An error that is the user's to fix (:class:`~worldflow.errors.WorldflowError`, a missing file) prints
    as one line, ``worldflow: error: <message>``; ``--debug`` anywhere on the command line, or
    ``WORLDFLOW_DEBUG=1``, shows its traceback instead. Any other exception keeps its traceback and says
    it is a bug.
    """
    from worldflow.distributed import quiet_unless_main, shutdown

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("WORLDFLOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    quiet_unless_main()  # under torchrun, only rank 0 prints
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"worldflow: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("worldflow: interrupted (checkpoints already written are kept; run again to resume)",
              file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(BUG, file=sys.stderr)
        return 1
    shutdown(int(rc or 0))  # torchrun: every rank leaves together and exits here (no-op otherwise)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())


def resolve_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, list(args.overrides))
