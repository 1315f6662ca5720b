"""``worldflow play`` (worldflow.play): key maps, games and protocol in Python, then the page in a real
browser: ``worldflow play`` runs as a subprocess on a free port with the tiny trained run, and headless
Chromium (Debian's, found on PATH; never downloaded) plays it through playwright.

The browser tests skip, saying why, when chromium, playwright or aiohttp is missing.
``WORLDFLOW_SAVE_PLAY_PNG=1`` saves the page's screenshot as docs/play.png.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from worldflow.play.keys import keymap
from worldflow.play.protocol import ProtocolError, pack_frame, parse, unpack_frame

ROOT = Path(__file__).resolve().parents[1]
CATCH = "worldflow/Catch-v0"


# ---------------------------------------------------------------------------------------------------
# Key maps, protocol and games, without a browser


def test_keymaps_of_every_space_kind():
    catch = keymap(gym.spaces.Discrete(3), ["LEFT", "STAY", "RIGHT"])
    assert catch.action([]) == 1 and catch.action(["ArrowLeft"]) == 0 and catch.action(["KeyD"]) == 2
    assert catch.action(["ArrowLeft", "ArrowRight"]) == 2  # no chord: the last key pressed
    assert catch.legend()["none"] == "STAY (1)"
    ale = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
           "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
           "DOWNLEFTFIRE"]
    atari = keymap(gym.spaces.Discrete(18), ale)
    assert atari.action(["ArrowUp", "ArrowRight", "Space"]) == 14 and atari.action(["Digit5"]) == 5
    assert atari.action([]) == 0
    plain = keymap(gym.spaces.Discrete(4, start=1))
    assert plain.action([]) == 1 and plain.action(["Digit3"]) == 4 and plain.keys == {
        "Digit0", "Digit1", "Digit2", "Digit3"}
    bits = keymap(gym.spaces.MultiBinary(3))
    assert bits.action(["Digit1", "Digit3"]).tolist() == [1, 0, 1] and bits.action([]).tolist() == [0, 0, 0]
    md = keymap(gym.spaces.MultiDiscrete([3, 2]))
    assert md.action(["Digit2", "KeyQ"]).tolist() == [2, 1] and md.action([]).tolist() == [0, 0]
    box = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    bk = keymap(box)
    assert bk.action(["ArrowUp", "ArrowLeft"]).tolist() == [2.0, 0.0] and bk.action([]).tolist() == [0, 0]
    for km, space in ((catch, gym.spaces.Discrete(3)), (bits, gym.spaces.MultiBinary(3)), (bk, box),
                      (md, gym.spaces.MultiDiscrete([3, 2]))):
        assert space.contains(km.noop) and space.contains(km.action(sorted(km.keys)[:2]))
    with pytest.raises(ValueError, match="keyboard"):
        keymap(gym.spaces.MultiBinary(11))


def test_protocol_parses_and_refuses():
    assert parse('{"type": "steps", "k": 2}', [1, 2, 4])["k"] == 2
    for bad, why in (("nope", "not JSON"), ("[1]", "JSON object"), ('{"type": "fly"}', "unknown"),
                     ('{"type": "steps", "k": 3}', "one of"), ('{"type": "keydown"}', "code"),
                     ('{"type": "reset", "seed": -1}', "seed"), ('{"type": "pause"}', "paused"),
                     (b"\x00", "binary"), ("x" * 5000, "longest")):
        with pytest.raises(ProtocolError, match=why):
            parse(bad, [1, 2, 4])
    a, b = np.arange(48, dtype=np.uint8).reshape(4, 4, 3), np.zeros((2, 3, 3), np.uint8)
    head, images = unpack_frame(pack_frame({"t": 3, "reward": float("nan")}, [("dream", a), ("real", b)]))
    assert head["t"] == 3 and head["reward"] is None and head["type"] == "frame"
    assert np.array_equal(images["dream"], a) and images["real"].shape == (2, 3, 3)


@pytest.fixture(scope="module")
def world(tiny_run, tiny_data):
    from worldflow.play.game import World

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return World.load(tiny_run, tiny_data, env=CATCH, steps=2)


def test_game_replays_a_seed_and_stays_bounded(world):
    """Same seed and actions: the same frames; the real env stands on the clip's stored last frame; the
    caches do not grow over a long game."""
    from worldflow.data.episodes import load_episode
    from worldflow.play.game import Game

    g = Game(world, seed=0)
    first = g.reset(seed=5)
    ctx = first.context
    truth = load_episode(world.data, ctx["episode"]).frames[ctx["start"] + ctx["frames"] - 1]
    assert np.array_equal(first.real, truth) and "exact" in first.note
    run_a = [g.step(a, 2).dream for a in (0, 0, 2)]
    again = g.reset(seed=5)
    assert np.array_equal(again.dream, first.dream) and again.context == ctx
    assert all(np.array_equal(x, g.step(a, 2).dream) for x, a in zip(run_a, (0, 0, 2)))
    cache = g.dream.cache
    before = [(t.data_ptr(), tuple(t.shape)) for t in _tensors(cache)]
    for i in range(40):
        frame = g.step(i % 3, 1 + i % 2)
    assert frame.t == 43 and frame.dream.shape == (16, 16, 3)
    assert [(t.data_ptr(), tuple(t.shape)) for t in _tensors(g.dream.cache)] == before
    assert g.reset().context != ctx or len(world.source.bank.windows) == 1  # a new clip


def _tensors(cache):
    import torch

    found = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    for v in vars(cache).values():
        if isinstance(v, (list, tuple)):
            found += [x for x in v if isinstance(x, torch.Tensor)]
    assert found, "the KV cache holds no tensors to watch"
    return found


def test_without_aiohttp_the_command_names_the_fix(tmp_path, monkeypatch, capsys):
    from worldflow.cli.app import main

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp now raises ImportError
    assert main(["play", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aiohttp" in err and "pip install -e .[play]" in err, err


# ---------------------------------------------------------------------------------------------------
# In the browser


def _browser() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _missing() -> str | None:
    for module in ("aiohttp", "playwright"):
        if not _has(module):
            return f"{module} is not installed (pip install -e .[dev,play])"
    if _browser() is None:
        return "no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)"
    return None


browser_test = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _read_address(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The URL ``worldflow play`` prints once it listens."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if " at http://" in line:
                return line.split(" at ")[1].split()[0]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"worldflow play did not start: {proc.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def server(tiny_run, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldflow.cli", "play", "--run", str(tiny_run), "--data", str(tiny_data),
         "--env", CATCH, "--steps", "2", "--port", "0", "--max-games", "2", "--fps", "20",
         "--seed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        yield _read_address(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_browser(), headless=True)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 760})
            tab.goto(server)
            tab.wait_for_function("window.play.frames >= 3", timeout=20000)
            yield tab
        finally:
            browser.close()


def _canvas(page, name: str) -> np.ndarray:
    rgba = page.evaluate("(id) => { const c = document.getElementById(id); return Array.from("
                         "c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }", name)
    size = int(round((len(rgba) // 4) ** 0.5))
    return np.asarray(rgba, np.uint8).reshape(size, size, 4)[..., :3]


def _send(page, msg: dict) -> int:
    """Send a message on the page's socket; returns the frame count before it."""
    return page.evaluate("(m) => { const n = window.play.frames; window.play.send(m); return n; }", msg)


def _next_frame(page, after: int) -> dict:
    page.wait_for_function(f"window.play.frames > {after}", timeout=10000)
    return page.evaluate("window.play.last")


def _reset(page, msg: dict | None = None) -> dict:
    """Reset (by ``msg``, else the Reset button) -> the header of the new start's frame. Counted apart
    from other frames: one generated before a pause may still arrive after it."""
    n = page.evaluate("window.play.resets")
    if msg is None:
        page.click("#reset")
    else:
        _send(page, msg)
    page.wait_for_function(f"window.play.resets > {n}", timeout=10000)
    return page.evaluate("window.play.lastReset")


def _pause(page) -> None:
    _send(page, {"type": "pause", "paused": True})
    page.wait_for_function("window.play.paused === true", timeout=10000)


def _play(page, key: str | None, steps: int = 3) -> tuple[dict, list[np.ndarray]]:
    """Paused: reset to seed 11, then ``steps`` frames with ``key`` held -> (reset header, frames)."""
    _pause(page)
    reset = _reset(page, {"type": "reset", "seed": 11})
    frames = [np.concatenate([_canvas(page, "dream"), _canvas(page, "real")], axis=1)]
    if key:
        page.keyboard.down(key)
    for _ in range(steps):
        n = page.evaluate("window.play.frames")
        page.click("#step")
        _next_frame(page, n)
        frames.append(np.concatenate([_canvas(page, "dream"), _canvas(page, "real")], axis=1))
    if key:
        page.keyboard.up(key)
    return reset, frames


@browser_test
def test_frames_arrive_and_the_canvas_changes(page):
    hello = page.evaluate("window.play.hello")
    assert hello["real"] == CATCH and hello["k_choices"] == [1, 2, 4, 8] and not hello["action_free"]
    assert "LEFT (0)" in page.inner_text("#legend") and "STAY (1)" in page.inner_text("#legend")
    seen, ended = [], False
    for _ in range(6):
        seen.append((_canvas(page, "dream"), _canvas(page, "real")))
        ended |= _next_frame(page, page.evaluate("window.play.frames"))["real_done"]
    assert any(not np.array_equal(seen[0][0], d) for d, _ in seen[1:]), "the dream canvas never changed"
    real_moved = any(not np.array_equal(seen[0][1], r) for _, r in seen[1:])
    assert real_moved or ended, "the real canvas never changed"  # a real episode may end: it then stays
    assert seen[0][0].shape == (16, 16, 3)
    assert page.evaluate("getComputedStyle(document.getElementById('dream')).imageRendering") == "pixelated"
    fps = float(page.inner_text("#fps"))
    assert fps > 2, fps
    _send(page, {"type": "steps", "k": 4})
    page.wait_for_function("window.play.last.k === 4", timeout=10000)
    _pause(page)


@browser_test
def test_two_keys_lead_to_two_futures_from_one_start(page):
    reset_l, left = _play(page, "ArrowLeft")
    reset_r, right = _play(page, "ArrowRight")
    assert reset_l["context"] == reset_r["context"] and np.array_equal(left[0], right[0])  # one start
    assert not np.array_equal(left[-1][:, :16], right[-1][:, :16]), "the dream ignored the keys"
    assert not np.array_equal(left[-1][:, 16:], right[-1][:, 16:]), "the real env ignored the keys"
    _, again = _play(page, "ArrowLeft")
    assert all(np.array_equal(a, b) for a, b in zip(left, again))  # same seed, same keys: same game


@browser_test
def test_reset_returns_to_a_real_context_frame(page, tiny_data, tiny_cfg):
    from worldflow.data.dataset import select_episodes
    from worldflow.data.episodes import load_episode, load_manifest

    heldout = {e["index"] for e in select_episodes(load_manifest(tiny_data), "heldout",
                                                   tiny_cfg().data.holdout_fraction)}
    _pause(page)
    n = page.evaluate("window.play.frames")
    page.click("#step")
    _next_frame(page, n)  # somewhere after the start
    contexts = []
    for _ in range(2):  # the Reset button: a new held-out clip each time
        head = _reset(page)
        ctx = head["context"]
        assert head["reset"] and head["t"] == 0 and ctx["episode"] in heldout
        truth = load_episode(tiny_data, ctx["episode"]).frames[ctx["start"] + ctx["frames"] - 1]
        assert np.array_equal(_canvas(page, "real"), truth), "the real env is not on the clip's last frame"
        assert "exact same start" in page.inner_text("#realfig")
        assert str(ctx["start"]) in page.inner_text("#context")
        contexts.append(ctx)
    assert contexts[0] != contexts[1]
    if os.environ.get("WORLDFLOW_SAVE_PLAY_PNG") == "1":
        _send(page, {"type": "pause", "paused": False})
        time.sleep(1.5)
        page.screenshot(path=str(ROOT / "docs" / "play.png"))
        _pause(page)


@browser_test
def test_bad_messages_and_the_game_limit_keep_the_server_serving(page, server):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import aiohttp

    async def probe() -> dict:
        url = server + "ws"
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url) as ws:  # game 2 of 2
                assert (await ws.receive_json())["type"] == "hello"
                replies = []
                for bad in ("{not json", json.dumps({"type": "warp"}), json.dumps({"type": "steps", "k": 3})):
                    await ws.send_str(bad)
                    while (msg := await ws.receive()).type == aiohttp.WSMsgType.BINARY:
                        pass  # frames keep coming meanwhile
                    replies.append(json.loads(msg.data))
                await ws.send_bytes(b"\x01\x02")
                while (msg := await ws.receive()).type == aiohttp.WSMsgType.BINARY:
                    pass
                replies.append(json.loads(msg.data))
                frame = await ws.receive()  # and the game goes on
                async with s.ws_connect(url) as full:  # game 3 of 2
                    refused = await full.receive_json()
            for _ in range(50):  # the closed socket's game is freed
                async with s.get(server + "status") as r:
                    status = await r.json()
                if status["games"] == 1:
                    break
                await asyncio.sleep(0.1)
            async with s.ws_connect(url) as ws:
                welcome = await ws.receive_json()
        return {"replies": replies, "frame": frame.type, "refused": refused, "status": status,
                "welcome": welcome}

    with ThreadPoolExecutor(1) as pool:  # playwright's sync API holds this thread's event loop
        out = pool.submit(asyncio.run, probe()).result(timeout=60)
    assert [r["code"] for r in out["replies"]] == ["bad_message"] * 4
    assert "not JSON" in out["replies"][0]["message"] and "warp" in out["replies"][1]["message"]
    assert out["frame"] == aiohttp.WSMsgType.BINARY
    assert out["refused"]["code"] == "full" and "--max-games" in out["refused"]["message"]
    assert out["status"] == {"games": 1, "max_games": 2, "run": "tiny"} and out["welcome"]["type"] == "hello"
    _pause(page)
    n = _send(page, {"type": "step"})  # the browser's game was never disturbed
    assert _next_frame(page, n)["t"] >= 1


@pytest.mark.skipif(not _has("aiohttp"), reason="aiohttp is not installed (pip install -e .[play])")
def test_benchmark_script_runs_and_reports(tmp_path):
    """benchmarks/play_fps.py end to end on the tiny preset (it measures nothing here)."""
    out = tmp_path / "fps.md"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "play_fps.py"), "--preset", "tiny",
                        "--ks", "1", "--clients", "1", "--seconds", "0.2", "--warmup", "2",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["fps_per_client"] > 0 and rows[0]["decode_ms"] > 0
    assert "| 1 | 1 |" in out.read_text()
