"""Frames per second of ``worldflow play``, end to end over its WebSocket, and where a frame's time goes.

    python benchmarks/play_fps.py [--preset small] [--ks 1 2 4] [--clients 1 2] [--seconds 4] [--out FILE]

The server is the real one (:class:`worldflow.play.server.PlayServer` on a loopback port, no frame-rate
cap) with a world built in memory from the preset: an untrained tokenizer, dynamics model and agent
heads (speed depends on the shapes, not the weights) and random context latents (C = model context − 1)
with Catch's Discrete(3) key map. For each client count and K, that many aiohttp WebSocket clients play
at once (each holding no key: the no-op) and count the frames they receive over ``--seconds``, after a
warm-up. The clients run in the server's own process and event loop; their share of the work (reading a
frame) is small and counted in "socket + loop".

Where a frame's time goes, per client, in ms (one client's numbers are the clean split):

- **dynamics + heads**: the K denoising passes and the commit pass of the world-model env's
  ImaginedBatch (its reward / continue heads included): the frame's ``ms.dream`` minus the decode;
- **decode**: the tokenizer's streaming decode of the frame (timed around ``decode_uint8``);
- **pack**: building the binary message (JSON header + raw RGB); **PNG** is what encoding the frame as
  PNG would cost instead (Pillow, default settings; not used by the server, shown for the choice);
- **socket + loop**: the rest of the interval between two frames (1000 / frames/s minus the generation
  the server timed): the thread hand-off, the event loop, the WebSocket write and the client's read.

Prints a Markdown table (and the machine: CPU kind, torch threads, date, commit); ``--out`` also writes
it with the JSON rows.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_world(preset: str, steps: int):
    """A play World of untrained ``preset`` models and random context latents (see the module docstring)."""
    from worldflow.agent.model import AgentModel
    from worldflow.config import load_config
    from worldflow.play.game import World
    from worldflow.play.keys import keymap
    from worldflow.run import AGENT, WorldModel
    from worldflow.tokenizer.model import TokenizerTraining

    cfg = load_config(preset, ["device=cpu"])
    space = gym.spaces.Discrete(3)
    tok = TokenizerTraining(cfg).tokenizer.eval().requires_grad_(False)
    agent = AgentModel(cfg, space).eval().requires_grad_(False)
    wm = WorldModel(tok, agent.dynamics, agent.heads, cfg, AGENT, space)
    c = max(1, cfg.dynamics.context - 1)
    source = RandomClips(cfg, space, c)
    return World(wm, source, keymap(space, ["LEFT", "STAY", "RIGHT"]), c, min(tok.cfg.context, c + 1), steps,
                 name=f"untrained {preset}")


class RandomClips:
    """Context clips of random latents in (-1, 1) and random actions: the shapes a real clip has."""

    def __init__(self, cfg, space: gym.Space, context: int):
        self.cfg, self.space, self.context = cfg, space, context
        self.note = ""

    def draw(self, rng: np.random.Generator, previous=None):
        from worldflow.gym_env.context import Clip
        from worldflow.play.sources import Context

        n, d = self.cfg.tokenizer.latent_tokens, self.cfg.tokenizer.latent_dim
        lat = rng.uniform(-1.0, 1.0, (self.context, n, d)).astype(np.float32)
        acts = rng.integers(0, int(self.space.n), self.context)
        return Context(Clip.given(self.space, lat, acts), "random latents")


class DecodeClock:
    """Mean seconds of the tokenizer's one-frame ``decode_uint8`` calls (a game's per-frame decode; the
    context decode of a reset is left out), over every thread since the last ``start``."""

    def __init__(self, tok):
        self.lock = threading.Lock()
        self.start()
        inner = tok.decode_uint8

        def timed(latents, *a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(latents, *a, **kw)
            finally:
                if latents.shape[1] == 1:
                    with self.lock:
                        self.spent += time.perf_counter() - t0
                        self.calls += 1

        tok.decode_uint8 = timed

    def start(self) -> None:
        self.spent, self.calls = 0.0, 0

    def mean_ms(self) -> float:
        return 1000.0 * self.spent / max(1, self.calls)


async def _client(url: str, k: int, warmup: int, seconds: float) -> dict[str, float]:
    import aiohttp

    from worldflow.play.protocol import unpack_frame

    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:
        await ws.receive_json()  # hello
        await ws.send_json({"type": "steps", "k": k})
        seen, dream_ms, frame_ms, t0 = 0, 0.0, 0.0, None
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise RuntimeError("the server closed the socket")
                continue
            head, _ = unpack_frame(msg.data)
            if head["k"] != k or head["reset"]:
                continue
            seen += 1
            if seen == warmup:
                t0, n, dream_ms, frame_ms = time.perf_counter(), 0, 0.0, 0.0
            elif t0 is not None:
                n += 1
                dream_ms += head["ms"]["dream"]
                frame_ms += head["ms"]["frame"]
                if time.perf_counter() - t0 >= seconds:
                    wall = time.perf_counter() - t0
                    return {"frames": n, "fps": n / wall, "dream_ms": dream_ms / n, "frame_ms": frame_ms / n}


async def measure(world, clients: int, k: int, seconds: float, warmup: int, clock: DecodeClock
                  ) -> dict[str, float]:
    """``clients`` games at K = k on one server -> frames/s per client and the time split."""
    from worldflow.play.server import PlayServer

    server = PlayServer(world, max_games=clients, fps=0.0, seed=0, log=False)
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve("127.0.0.1", 0, started.set_result))
    url = (await started) + "ws"
    try:
        clock.start()
        rows = await asyncio.gather(*(_client(url, k, warmup, seconds) for _ in range(clients)))
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    decode_ms = clock.mean_ms()
    fps = sum(r["fps"] for r in rows) / clients
    dream = sum(r["dream_ms"] for r in rows) / clients
    gen = sum(r["frame_ms"] for r in rows) / clients
    return {"clients": clients, "k": k, "fps_per_client": fps, "fps_total": fps * clients,
            "dynamics_ms": dream - decode_ms, "decode_ms": decode_ms, "generation_ms": gen,
            "socket_loop_ms": 1000.0 / fps - gen}


def pack_costs(size: int, repeats: int = 200) -> dict[str, float]:
    """ms to pack one raw-RGB frame message, and to PNG-encode the same frame (Pillow)."""
    from worldflow.play.protocol import pack_frame

    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    header = {"t": 1, "k": 4, "reset": False, "paused": False, "reward": 0.0, "continue": 1.0,
              "ms": {"dream": 1.0, "frame": 1.0}}
    t0 = time.perf_counter()
    for _ in range(repeats):
        pack_frame(header, [("dream", frame)])
    pack = (time.perf_counter() - t0) * 1000.0 / repeats
    try:
        from PIL import Image
    except ImportError:
        return {"pack_ms": pack, "png_ms": float("nan")}
    t0 = time.perf_counter()
    for _ in range(repeats):
        Image.fromarray(frame).save(io.BytesIO(), format="PNG")
    return {"pack_ms": pack, "png_ms": (time.perf_counter() - t0) * 1000.0 / repeats}


def machine() -> dict[str, str]:
    from worldflow.precision import describe_cpu

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        head, dirty = "unknown", ""
    return {"cpu": describe_cpu(), "threads": str(torch.get_num_threads()),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": head + (" + working-tree changes" if dirty else "")}


def markdown(rows: list[dict[str, float]], costs: dict[str, float], facts: dict[str, str]) -> str:
    lines = [f"`benchmarks/play_fps.py --preset {facts['preset']}`: {facts['cpu']}, {facts['threads']} torch "
             f"thread(s), {facts['date']}, commit {facts['commit']}; frame {facts['size']}×{facts['size']}, "
             f"{facts['context']} context frames", "",
             "| clients | K | frames/s per client | frames/s total | dynamics + heads ms | decode ms "
             "| socket + loop ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['k']} | {r['fps_per_client']:.1f} | {r['fps_total']:.1f} "
                     f"| {r['dynamics_ms']:.1f} | {r['decode_ms']:.1f} | {r['socket_loop_ms']:.1f} |")
    lines += ["", f"Packing a frame message (raw RGB): {costs['pack_ms']:.3f} ms; PNG-encoding the same "
              f"frame instead: {costs['png_ms']:.3f} ms (not used)."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    p.add_argument("--warmup", type=int, default=5, help="frames each client skips first")
    p.add_argument("--out", help="also write Markdown here and JSON beside it (.json)")
    a = p.parse_args()
    world = build_world(a.preset, a.ks[0])
    clock = DecodeClock(world.wm.tokenizer)
    rows = [asyncio.run(measure(world, n, k, a.seconds, a.warmup, clock)) for n in a.clients for k in a.ks]
    facts = {**machine(), "preset": a.preset, "size": str(world.wm.size), "context": str(world.context)}
    costs = pack_costs(world.wm.size)
    md = markdown(rows, costs, facts)
    print(md)
    if a.out:
        out = Path(a.out)
        out.write_text(md + "\n")
        out.with_suffix(".json").write_text(json.dumps({"facts": facts, "rows": rows, "costs": costs},
                                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
