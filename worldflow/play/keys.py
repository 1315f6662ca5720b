"""The keyboard as an action space: which held keys make which action, and the legend the page shows.

Keys are ``KeyboardEvent.code`` values (``"ArrowLeft"``, ``"KeyA"``, ``"Digit1"``, ``"Space"``): the
physical key, whatever the keyboard layout. The page reports presses and releases; the game asks its
:class:`KeyMap` for the action of the keys held (plus those tapped since the last frame, so a short tap
between two frames still counts). No key held is the env's no-op.

- **Discrete(n)**: digit keys 0-9 pick actions ``start`` .. ``start + 9`` directly. Where the env names
  its actions (``env.unwrapped.get_action_meanings()``, as the Arcade Learning Environment does, or the
  meanings below for Catch), arrows / WASD / Space press the named directions and FIRE, and keys held
  together make the combined action (Up + Right + Space is ``UPRIGHTFIRE``). The no-op is the action
  named NOOP (Catch: STAY = 1); without meanings, action ``start``.
- **MultiBinary(n)** (n <= 10): keys 1, 2, ..., 9, 0 set bits 0 .. 9; several at once; no key = zeros.
- **MultiDiscrete(nvec)** (<= 4 dimensions): dimension d has its own row of keys (1-9, Q-O, A-L, Z-M);
  the j-th key of the row sets value ``start + j + 1``; no key in a row = ``start`` (the no-op).
- **Box** (<= 6 numbers): each number has a pair of keys pushing it to its upper / lower bound (±1 where
  unbounded); no key (or both) rests at 0 clipped into the bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from worldflow.errors import InputError

__all__ = ["KeyMap", "keymap", "action_meanings", "key_label"]

# Catch (worldflow.envs.catch) has no get_action_meanings(); its LEFT, STAY, RIGHT = 0, 1, 2.
_KNOWN_MEANINGS = {"worldflow/Catch-v0": ["LEFT", "STAY", "RIGHT"]}

# direction / fire keys for named Discrete actions (arrows and WASD both)
_TOKEN_KEYS = {
    "UP": ("ArrowUp", "KeyW"),
    "DOWN": ("ArrowDown", "KeyS"),
    "LEFT": ("ArrowLeft", "KeyA"),
    "RIGHT": ("ArrowRight", "KeyD"),
    "FIRE": ("Space",),
}
_NOOP_WORDS = ("NOOP", "NONE", "STAY", "IDLE", "NOTHING")
_DIGITS = [f"Digit{i}" for i in range(10)]
_ROWS = ["123456789", "QWERTYUIO", "ASDFGHJKL", "ZXCVBNM"]  # MultiDiscrete: one row per dimension
_BOX_PAIRS = [("ArrowUp", "ArrowDown"), ("ArrowRight", "ArrowLeft"), ("KeyW", "KeyS"), ("KeyD", "KeyA"),
              ("KeyI", "KeyK"), ("KeyL", "KeyJ")]
_ARROWS = {"ArrowUp": "↑", "ArrowDown": "↓", "ArrowLeft": "←", "ArrowRight": "→", "Space": "Space"}


def key_label(code: str) -> str:
    """What a key is called on the page: ``"KeyA"`` -> ``"A"``, ``"Digit1"`` -> ``"1"``, arrows as ←."""
    if code in _ARROWS:
        return _ARROWS[code]
    for prefix in ("Key", "Digit"):
        if code.startswith(prefix):
            return code[len(prefix):]
    return code


def _row_code(ch: str) -> str:
    return f"Digit{ch}" if ch.isdigit() else f"Key{ch}"


def action_meanings(env: gym.Env | None, env_id: str | None) -> list[str] | None:
    """The names of a Discrete env's actions: the env's own ``get_action_meanings()`` where it has one,
    the table above for worldflow's Catch, else None."""
    inner = getattr(env, "unwrapped", env)
    fn = getattr(inner, "get_action_meanings", None)
    if callable(fn):
        return [str(m) for m in fn()]
    return list(_KNOWN_MEANINGS[env_id]) if env_id in _KNOWN_MEANINGS else None


def _tokens(meaning: str) -> frozenset[str]:
    """Direction / FIRE words inside an action name (``"UPRIGHTFIRE"`` -> {UP, RIGHT, FIRE})."""
    name = meaning.upper().replace("FORWARD", "UP")
    return frozenset(t for t in _TOKEN_KEYS if t in name)


class KeyMap:
    """Held keys -> an action of ``space`` (see the module docstring); ``legend`` for the page.

    ``action(held)`` takes the keys in the order they were pressed (the last one wins a conflict) and
    returns an env value (an int for Discrete, a numpy array otherwise) that ``space`` contains.
    ``rows`` are the legend: (key labels, what they do); ``keys`` every code the map reads.
    """

    def __init__(self, space: gym.Space, rows: list[tuple[list[str], str]], keys: set[str], noop: Any,
                 noop_text: str):
        self.space, self.rows, self.keys = space, rows, frozenset(keys)
        self.noop, self.noop_text = noop, noop_text

    def action(self, held: Sequence[str]) -> Any:
        raise NotImplementedError

    def legend(self) -> dict[str, Any]:
        """JSON for the page: rows of {keys: [labels], does: text}, the no-key action and every code."""
        return {"rows": [{"keys": labels, "does": does} for labels, does in self.rows],
                "none": self.noop_text, "codes": sorted(self.keys)}


def _labels(codes: Sequence[str]) -> list[str]:
    return [key_label(c) for c in codes]


class DiscreteKeys(KeyMap):
    def __init__(self, space: gym.spaces.Discrete, meanings: list[str] | None):
        n, self.start = int(space.n), int(space.start)
        names = meanings if meanings is not None and len(meanings) == n else None
        start = self.start

        def name(i: int) -> str:
            return f"{names[i]} ({start + i})" if names else f"action {start + i}"

        noop = next((i for i, m in enumerate(names or []) if m.upper() in _NOOP_WORDS), 0)
        # each set of direction / FIRE words -> the first action named by it (ALE lists each once)
        self.by_tokens: dict[frozenset[str], int] = {}
        for i, m in enumerate(names or []):
            if _tokens(m):
                self.by_tokens.setdefault(_tokens(m), i)
        tokens_of = {i: t for t, i in self.by_tokens.items()}
        used = set().union(*self.by_tokens) if self.by_tokens else set()
        self.token_of = {k: t for t in used for k in _TOKEN_KEYS[t]}
        self.digit_of = {_DIGITS[i]: i for i in range(min(n, 10))}
        rows = []
        for i in range(n):
            labels = _labels([_DIGITS[i]]) if i < 10 else []
            toks = tokens_of.get(i)
            if toks is not None and len(toks) == 1:
                labels = _labels(_TOKEN_KEYS[next(iter(toks))]) + labels
            elif toks is not None:  # a chord: the arrow of each word held together
                labels = [" + ".join(key_label(_TOKEN_KEYS[t][0]) for t in _TOKEN_KEYS if t in toks)] + labels
            if labels:
                rows.append((labels, name(i)))
        super().__init__(space, rows, set(self.digit_of) | set(self.token_of), start + noop, name(noop))

    def action(self, held: Sequence[str]) -> int:
        digits = [self.digit_of[k] for k in held if k in self.digit_of]
        if digits:
            return self.start + digits[-1]
        order = [self.token_of[k] for k in held if k in self.token_of]
        if frozenset(order) in self.by_tokens:
            return self.start + self.by_tokens[frozenset(order)]
        if order and frozenset(order[-1:]) in self.by_tokens:  # no action for this chord: the last key alone
            return self.start + self.by_tokens[frozenset(order[-1:])]
        return int(self.noop)


class MultiBinaryKeys(KeyMap):
    def __init__(self, space: gym.spaces.MultiBinary):
        self.shape = tuple(np.atleast_1d(space.n))
        n = int(np.prod(self.shape))
        if n > 10:
            raise InputError(f"MultiBinary action space of {n} bits: the keyboard map has keys for 10; "
                             "play a run whose actions have at most 10 bits")
        codes = [_DIGITS[(i + 1) % 10] for i in range(n)]
        self.bit_of = {c: i for i, c in enumerate(codes)}
        super().__init__(space, [(_labels([c]), f"bit {i} on") for i, c in enumerate(codes)], set(codes),
                         np.zeros(self.shape, np.int8), "all bits 0")

    def action(self, held: Sequence[str]) -> np.ndarray:
        bits = np.zeros(int(np.prod(self.shape)), np.int8)
        for k in held:
            if k in self.bit_of:
                bits[self.bit_of[k]] = 1
        return bits.reshape(self.shape)


class MultiDiscreteKeys(KeyMap):
    def __init__(self, space: gym.spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec).reshape(-1)
        self.start = np.broadcast_to(np.asarray(space.start), np.shape(space.nvec)).reshape(-1)
        self.shape, self.dtype = tuple(np.shape(space.nvec)), space.dtype
        if len(nvec) > len(_ROWS) or any(n - 1 > len(_ROWS[d]) for d, n in enumerate(nvec)):
            raise InputError(f"MultiDiscrete{list(nvec)}: the keyboard map has {len(_ROWS)} rows of keys "
                             f"(at most {[len(r) + 1 for r in _ROWS]} values); play a smaller action space")
        self.value_of: dict[str, tuple[int, int]] = {}
        rows = []
        for d, n in enumerate(nvec):
            for j in range(int(n) - 1):
                code = _row_code(_ROWS[d][j])
                self.value_of[code] = (d, int(self.start[d]) + j + 1)
                rows.append((_labels([code]), f"dimension {d} = {int(self.start[d]) + j + 1}"))
        noop = self.start.astype(self.dtype).reshape(self.shape)
        super().__init__(space, rows, set(self.value_of), noop,
                         f"every dimension at its first value {noop.tolist()}")

    def action(self, held: Sequence[str]) -> np.ndarray:
        out = self.start.copy()
        for k in held:  # later presses win within a row
            if k in self.value_of:
                d, v = self.value_of[k]
                out[d] = v
        return out.astype(self.dtype).reshape(self.shape)


class BoxKeys(KeyMap):
    def __init__(self, space: gym.spaces.Box):
        self.shape, self.dtype = space.shape, space.dtype
        lo, hi = space.low.reshape(-1).astype(np.float64), space.high.reshape(-1).astype(np.float64)
        n = lo.size
        if n > len(_BOX_PAIRS):
            raise InputError(f"Box action space of {n} numbers: the keyboard map has {len(_BOX_PAIRS)} key "
                             "pairs; play a run whose actions have at most 6 numbers")
        self.up = np.where(np.isfinite(hi), hi, 1.0)
        self.down = np.where(np.isfinite(lo), lo, -1.0)
        self.rest = np.clip(0.0, lo, hi)
        self.pair_of = {}
        rows = []
        for d, (up, down) in enumerate(_BOX_PAIRS[:n]):
            self.pair_of[up], self.pair_of[down] = (d, +1), (d, -1)
            rows.append((_labels([up]), f"number {d} up to {self.up[d]:g}"))
            rows.append((_labels([down]), f"number {d} down to {self.down[d]:g}"))
        super().__init__(space, rows, set(self.pair_of), self.rest.astype(self.dtype).reshape(self.shape),
                         f"rest at {np.round(self.rest, 3).tolist()}")

    def action(self, held: Sequence[str]) -> np.ndarray:
        push = np.zeros(self.rest.size)
        for k in held:
            if k in self.pair_of:
                d, s = self.pair_of[k]
                push[d] += s
        out = np.where(push > 0, self.up, np.where(push < 0, self.down, self.rest))
        return out.astype(self.dtype).reshape(self.shape)


def keymap(space: gym.Space, meanings: list[str] | None = None) -> KeyMap:
    """The key map of an action space; ``meanings`` name a Discrete space's actions (see above)."""
    if isinstance(space, gym.spaces.Discrete):
        return DiscreteKeys(space, meanings)
    if isinstance(space, gym.spaces.MultiBinary):
        return MultiBinaryKeys(space)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return MultiDiscreteKeys(space)
    if isinstance(space, gym.spaces.Box):
        return BoxKeys(space)
    raise InputError(f"action space {space} has no keyboard map: worldflow play knows Discrete, "
                     "MultiBinary, MultiDiscrete and Box")
