"""``worldflow play``: play a run's world model in the browser (docs/play.md).

Starts a local web server (aiohttp, the optional extra ``play``) and prints its address; each browser tab
gets its own game, up to ``--max-games``. The page shows the imagined frames as they are generated and
maps the keyboard to the run's action space; ``--env`` adds the real environment beside the dream, driven
by the same keys from the same start state.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from worldflow.argtypes import float_in, int_in, nonneg_int, positive_int, power_of_two

FIX = "pip install -e .[play]"


_fps = float_in(0, 1000, " (0: as fast as the model goes)")
_games = int_in(1, 64)
_port = int_in(0, 65535, " (0: any free one)")


def _require_aiohttp() -> None:
    from worldflow.envs.wrappers import MissingExtraError

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"worldflow play needs the optional package aiohttp, which is not "
                                f"installed: {FIX}") from None


def main(args: argparse.Namespace) -> int:
    from worldflow.errors import InputError

    _require_aiohttp()
    if args.data is not None and args.video is not None:
        raise InputError("worldflow play takes at most one of --data DIR (held-out clips) and --video FILE")
    from worldflow.play.game import World
    from worldflow.play.server import PlayServer

    world = World.load(args.run, args.data, args.video, args.env, args.steps, args.context, args.device)
    server = PlayServer(world, max_games=args.max_games, fps=args.fps, seed=args.seed)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"worldflow play: listening on {args.host}: anyone who can reach it can play (no login)",
              file=sys.stderr)

    def ready(url: str) -> None:
        print(f"worldflow play: {args.run} at {url} (Ctrl-C stops)", flush=True)

    try:
        asyncio.run(server.serve(args.host, args.port, ready))
    except KeyboardInterrupt:
        print("worldflow play: stopped", file=sys.stderr)
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}: pick another "
                         f"--port (0: any free one)") from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("play", help="play the world model in the browser (needs the play extra)",
                       description=__doc__.split("\n\n")[0] + f" Needs aiohttp: {FIX}.")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--data", help="dataset whose held-out clips start the games (default: the run's own)")
    p.add_argument("--video", help="video file whose clips start the games instead (no actions)")
    p.add_argument("--env", help="gymnasium id of the real env to show beside the dream, e.g. "
                                 "worldflow/Catch-v0")
    p.add_argument("--steps", type=power_of_two, default=4, help="sampling steps K per frame at start")
    p.add_argument("--context", type=positive_int, default=None,
                   help="context frames C of a game's start (default: model context - 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (0: any free one; the address is printed)")
    p.add_argument("--max-games", type=_games, default=4, help="games (browser tabs) in play at once")
    p.add_argument("--fps", type=_fps, default=15.0, help="frame rate cap (0: as fast as the model goes)")
    p.add_argument("--seed", type=nonneg_int, default=None,
                   help="seed game n with SEED + n (default: a different game each time)")
    p.add_argument("--device", default="cpu", help="torch device of the models")
    p.set_defaults(func=main)
