"""The ``worldflow play`` web server: the page, and one game per WebSocket (aiohttp, an optional extra).

Routes: ``/`` the page (worldflow/play/index.html), ``/ws`` a game, ``/status`` JSON (games in play,
the limit). Each WebSocket gets its own :class:`~worldflow.play.game.Game` until ``max_games`` are in
play; a further tab gets an ``error`` message with code ``full`` and is closed. A closed tab ends its game
and frees its place. A message the server cannot parse gets an ``error`` reply on that socket, and the
game goes on (worldflow.play.protocol).

Generation runs off the event loop, on a pool of worker threads (one call per game at a time): torch
releases the GIL inside its kernels, so two games can use two cores while the loop keeps serving
sockets. Each game's loop generates a frame, sends it, and waits out the rest of its frame interval
(``fps``; 0 = as fast as the model goes), so keys pressed during a frame steer the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from worldflow.play.game import Frame, Game, World
from worldflow.play.protocol import MAX_MESSAGE, ProtocolError, pack_frame, parse

__all__ = ["PlayServer"]


def page() -> str:
    """The single-file page (HTML, CSS and JavaScript)."""
    return resources.files("worldflow.play").joinpath("index.html").read_text(encoding="utf-8")


class Session:
    """One tab: its game, the keys its page holds, pause / step / reset requests and K."""

    def __init__(self, server: PlayServer, ws: web.WebSocketResponse, number: int):
        self.server, self.ws, self.number = server, ws, number
        self.world = server.world
        self.game: Game | None = None
        self.held: list[str] = []  # in press order: the last key pressed wins a conflict
        self.tapped: list[str] = []  # pressed since the last frame (a tap between two frames still counts)
        self.paused, self.steps_wanted = False, 0
        self.reset_wanted: tuple[bool, int | None] = (True, server.seed_of(number))
        self.k = self.world.steps
        self.wake = asyncio.Event()
        self.inflight: Future | None = None  # the generation call running on a worker thread

    def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Apply a parsed client message; returns a state message to send back, or None."""
        kind, keys = msg["type"], self.world.keys
        if kind == "keydown" and keys is not None and msg["code"] in keys.keys:
            if msg["code"] not in self.held:
                self.held.append(msg["code"])
            self.tapped.append(msg["code"])
        elif kind == "keyup" and msg["code"] in self.held:
            self.held.remove(msg["code"])
        elif kind == "release":
            self.held.clear()
        elif kind == "reset":
            self.reset_wanted = (True, msg.get("seed"))
        elif kind == "pause":
            self.paused = msg["paused"]
        elif kind == "step" and self.paused:  # while playing, every frame is a step already
            self.steps_wanted += 1
        elif kind == "steps":
            self.k = msg["k"]
        self.wake.set()
        return {"type": "state", "paused": self.paused, "k": self.k} if kind in ("pause", "steps") else None

    def action(self) -> Any:
        """The action of the keys held and tapped since the last frame (None: an action-free run)."""
        if self.world.keys is None:
            return None
        keys = self.held + [k for k in self.tapped if k not in self.held]
        self.tapped.clear()
        return self.world.keys.action(keys)

    async def _call(self, fn, *args) -> Any:
        self.inflight = self.server.pool.submit(fn, *args)
        return await asyncio.wrap_future(self.inflight)

    async def _next_frame(self) -> Frame | None:
        """Reset, step or wait (paused), as asked; None when there is nothing to send yet."""
        want_reset, seed = self.reset_wanted
        if want_reset:
            self.reset_wanted = (False, None)
            return await self._call(self.game.reset, seed, self.k)
        if self.paused and not self.steps_wanted:
            self.wake.clear()
            await self.wake.wait()
            return None
        if self.paused:
            self.steps_wanted -= 1
        return await self._call(self.game.step, self.action(), self.k)

    async def run(self) -> None:
        """The game's loop: generate, send, pace; ends when the socket closes."""
        self.game = await self._call(Game, self.world, self.server.seed_of(self.number))
        interval = 1.0 / self.server.fps if self.server.fps > 0 else 0.0
        due = time.perf_counter()
        while not self.ws.closed:
            t0 = time.perf_counter()
            frame = await self._next_frame()
            if frame is None:
                due = time.perf_counter()
                continue
            await self.ws.send_bytes(self._pack(frame, time.perf_counter() - t0))
            due = max(due + interval, time.perf_counter() - interval)  # no burst after a slow frame
            delay = due - time.perf_counter()
            if delay > 0 and not frame.reset:
                await asyncio.sleep(delay)

    def _pack(self, f: Frame, seconds: float) -> bytes:
        header = {"t": f.t, "k": f.k, "reset": f.reset, "paused": self.paused, "reward": f.reward,
                  "continue": f.cont, "real_reward": f.real_reward, "real_done": f.real_done,
                  "ms": {**f.ms, "frame": round(seconds * 1000.0, 2)}}
        if f.reset:
            header.update(context=f.context, note=f.note)
        images = [("dream", f.dream)] + ([("real", f.real)] if f.real is not None else [])
        return pack_frame(header, images)

    def close(self) -> None:
        """Free the game once its last generation call (which a closed tab cannot cancel) has returned."""
        def free(_: Any = None) -> None:
            if self.game is not None:
                self.game.close()
                self.game = None

        if self.inflight is not None and not self.inflight.done():
            self.inflight.add_done_callback(free)
        else:
            free()


class PlayServer:
    """The page and its games for one :class:`World` (see the module docstring).

    ``seed``: game n (counting from 0) is seeded ``seed + n``; None: every game nondeterministic until a
    page sends ``reset`` with a seed. ``workers``: generation threads (default: one per game). ``log``:
    a line on stderr as each game starts and ends.
    """

    def __init__(self, world: World, max_games: int = 4, fps: float = 15.0, seed: int | None = None,
                 workers: int | None = None, log: bool = True):
        self.world, self.max_games, self.fps, self.seed, self.log = world, max_games, fps, seed, log
        self.pool = ThreadPoolExecutor(max_workers=workers or max_games, thread_name_prefix="play-game")
        self.sessions: set[Session] = set()
        self._numbers = itertools.count()

    def _log(self, text: str) -> None:
        if self.log:
            print(f"worldflow play: {text}", file=sys.stderr, flush=True)

    def seed_of(self, number: int) -> int | None:
        return None if self.seed is None else self.seed + number

    def hello(self, number: int) -> dict[str, Any]:
        w = self.world
        return {"type": "hello", "game": number, "run": w.name, "size": w.wm.size, "k": w.steps,
                "k_choices": w.k_choices, "keys": None if w.keys is None else w.keys.legend(),
                "action_free": w.action_free, "real": w.real_env, "context": w.context, "fps_cap": self.fps,
                "games": len(self.sessions), "max_games": self.max_games, "notes": w.notes}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/ws", self._socket)
        app.router.add_get("/status", self._status)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"games": len(self.sessions), "max_games": self.max_games,
                                  "run": self.world.name})

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        # frames past aiohttp's own limit would close the socket; up to it, the protocol's reply says why
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_MESSAGE * 256)
        await ws.prepare(request)
        if len(self.sessions) >= self.max_games:
            await ws.send_json({"type": "error", "code": "full", "message": (
                f"all {self.max_games} games are in play: close another tab, or restart worldflow play "
                f"with a larger --max-games")})
            await ws.close()
            return ws
        session = Session(self, ws, next(self._numbers))
        self.sessions.add(session)
        self._log(f"game {session.number} started ({len(self.sessions)}/{self.max_games} in play)")
        runner = asyncio.create_task(self._run(session))
        try:
            await ws.send_json(self.hello(session.number))
            await self._read(session)
        finally:
            runner.cancel()
            self.sessions.discard(session)
            await ws.close()
            await asyncio.gather(runner, return_exceptions=True)
            session.close()
            self._log(f"game {session.number} closed ({len(self.sessions)}/{self.max_games} in play)")
        return ws

    async def _read(self, session: Session) -> None:
        """Every client message of one socket: applied, or answered with an error."""
        async for msg in session.ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            try:
                reply = session.handle(parse(msg.data, self.world.k_choices))
            except ProtocolError as e:
                reply = {"type": "error", "code": "bad_message", "message": str(e)}
            if reply is not None:
                await session.ws.send_json(reply)

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the tab went away
        except Exception as e:  # a failed generation ends this game, never the server
            traceback.print_exc()
            if not session.ws.closed:
                await session.ws.send_json({"type": "error", "code": "game_failed",
                                            "message": f"this game stopped: {type(e).__name__}: {e}"})

    async def _shutdown(self, app: web.Application) -> None:
        for s in list(self.sessions):
            await s.ws.close()

    async def serve(self, host: str, port: int, ready=None) -> None:
        """Serve until cancelled; ``ready(url)`` is called once the socket listens."""
        runner = web.AppRunner(self.app())
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if port == 0 else port
        shown = f"[{host}]" if ":" in host else host
        if ready is not None:
            ready(f"http://{shown}:{bound}/")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            self.pool.shutdown(wait=False, cancel_futures=True)
