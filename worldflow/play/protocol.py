"""The WebSocket protocol of ``worldflow play`` (docs/play.md has it in full).

Client -> server: JSON text messages, one object each, told apart by ``type``:

======================================  ==================================================================
``{"type": "keydown", "code": C}``      key C (a ``KeyboardEvent.code``) went down; ``keyup`` likewise
``{"type": "release"}``                 every key up (the page lost focus)
``{"type": "reset"[, "seed": S]}``      start again from a new context clip (seed S: a fixed one)
``{"type": "pause", "paused": B}``      stop / go on generating
``{"type": "step"}``                    one frame while paused
``{"type": "steps", "k": K}``           sampling steps K per frame (one of the hello's ``k_choices``)
======================================  ==================================================================

Server -> client: JSON text for ``hello`` (the game's settings and key legend, first), ``error``
(``message``, and ``code``: ``"bad_message"``, ``"full"`` or ``"game_failed"``) and ``state`` (after
pause / K changes); frames are binary: a 4-byte big-endian header length n, n bytes of UTF-8 JSON header
(``{"type": "frame", "images": [{name, height, width}, ...], ...}`` with the frame's numbers), then each
image's raw RGB bytes (height × width × 3, row-major) in the header's order.

Raw RGB rather than PNG: at these frame sizes (16-64 pixels) a frame is 0.8-12 KiB and the loopback
socket carries it for free, while PNG would cost an encode on the server and a decode in the page for
each frame (measured in benchmarks/play_fps.py).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from worldflow.errors import InputError

__all__ = ["ProtocolError", "parse", "pack_frame", "unpack_frame", "MAX_MESSAGE"]

MAX_MESSAGE = 4096  # bytes: every client message is a few dozen
_TYPES = {"keydown", "keyup", "release", "reset", "pause", "step", "steps"}


class ProtocolError(InputError):
    """A client message the server does not understand; the reply names what was wrong."""


def parse(text: str | bytes, k_choices: list[int]) -> dict[str, Any]:
    """A client message -> its validated dict, or ProtocolError saying what is wrong with it."""
    if isinstance(text, bytes):
        raise ProtocolError("binary messages are not understood: send a JSON object as text")
    if len(text) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(text)} characters: the longest is {MAX_MESSAGE}")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"not JSON ({e.msg} at character {e.pos}): send one JSON object") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a JSON object with a 'type', got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in _TYPES:
        raise ProtocolError(f"unknown message type {kind!r}: expected one of {', '.join(sorted(_TYPES))}")
    if kind in ("keydown", "keyup"):
        code = msg.get("code")
        if not isinstance(code, str) or not 0 < len(code) <= 32:
            raise ProtocolError(f"{kind} needs 'code': a KeyboardEvent.code string such as 'ArrowLeft'")
    elif kind == "reset" and msg.get("seed") is not None:
        seed = msg["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ProtocolError(f"reset 'seed' must be an integer in [0, 2^32), got {seed!r}")
    elif kind == "pause" and not isinstance(msg.get("paused"), bool):
        raise ProtocolError("pause needs 'paused': true or false")
    elif kind == "steps" and msg.get("k") not in k_choices:
        raise ProtocolError(f"steps needs 'k': one of {k_choices}, got {msg.get('k')!r}")
    return msg


def _json_number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def pack_frame(header: dict[str, Any], images: list[tuple[str, np.ndarray]]) -> bytes:
    """A binary frame message: length-prefixed JSON header, then each (name, (H, W, 3) uint8) image."""
    head = dict(header, type="frame",
                images=[{"name": n, "height": int(a.shape[0]), "width": int(a.shape[1])} for n, a in images])
    for key in ("reward", "continue", "real_reward"):
        if key in head:
            head[key] = _json_number(head[key])
    blob = json.dumps(head, separators=(",", ":")).encode()
    return b"".join([struct.pack(">I", len(blob)), blob,
                     *(np.ascontiguousarray(a, dtype=np.uint8).tobytes() for _, a in images)])


def unpack_frame(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The inverse of :func:`pack_frame` (for clients written in Python: tests, benchmarks)."""
    (n,) = struct.unpack(">I", data[:4])
    head = json.loads(data[4 : 4 + n])
    images, at = {}, 4 + n
    for im in head["images"]:
        h, w = im["height"], im["width"]
        size = h * w * 3
        images[im["name"]] = np.frombuffer(data[at : at + size], np.uint8).reshape(h, w, 3)
        at += size
    return head, images
