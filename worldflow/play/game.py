"""A game: one player's dream (and real env), started from a real context clip, stepped frame by frame.

:class:`World` is what every game of a server shares, loaded once: the run's frozen world model, the
context source, the key map and how to build the real env. :class:`Game` is one player's: its own
generators (context choice and diffusion noise), its dream's caches and its real env. ``reset`` and
``step`` are plain blocking calls; the server runs them on worker threads, one call per game at a time.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding

from worldflow import flow
from worldflow.errors import InputError
from worldflow.play.dream import ActedDream, FreeDream
from worldflow.play.keys import KeyMap, action_meanings, keymap
from worldflow.play.real import RealTwin
from worldflow.play.sources import Context, HeldoutClips, VideoClips
from worldflow.run import DYNAMICS, Run, WorldModel

__all__ = ["Frame", "Game", "World", "K_CHOICES"]

K_CHOICES = (1, 2, 4, 8)  # the page's sampling-step control (those <= the model's K_max)


@dataclass
class Frame:
    """One frame for the page: the dream's (H, W, 3) uint8 and, with a real env, the real one.

    ``reset``: the first frame of a context (its ``context`` says which clip); ``ms``: milliseconds spent
    on the dream and the real env for this frame.
    """

    dream: np.ndarray
    t: int
    k: int
    real: np.ndarray | None = None
    reward: float | None = None
    cont: float | None = None
    real_reward: float | None = None
    real_done: bool = False
    reset: bool = False
    context: dict[str, Any] | None = None
    note: str = ""
    ms: dict[str, float] = field(default_factory=dict)


@dataclass
class World:
    """What the games of one server share (see the module docstring).

    ``source`` draws context clips (:mod:`worldflow.play.sources`); ``keys`` is None for an action-free
    run; ``real_env`` (an env id) adds the real env beside the dream; ``context`` is C and
    ``decoder_window`` the decode cache's window (as the world-model env sets them).
    """

    wm: WorldModel
    source: Any
    keys: KeyMap | None
    context: int
    decoder_window: int
    steps: int = 4
    real_env: str | None = None
    data: Path | None = None
    dataset_env: str | None = None
    name: str = "run"
    notes: list[str] = field(default_factory=list)

    @property
    def action_free(self) -> bool:
        return self.wm.action_space is None

    @property
    def k_choices(self) -> list[int]:
        return sorted({k for k in K_CHOICES if k <= self.wm.dynamics.cfg.k_max} | {self.steps})

    @property
    def device(self) -> torch.device:
        return self.wm.dynamics.head.weight.device

    @classmethod
    def load(cls, run: str | Path, data: str | Path | None = None, video: str | Path | None = None,
             env: str | None = None, steps: int = 4, context: int | None = None, device: str = "cpu"
             ) -> World:
        """Everything a server needs from a run: models, context source, key map (see the CLI flags)."""
        r = Run(run)
        wm = _world_model(r, device)
        dyn = wm.dynamics.cfg
        flow.check_steps(steps, dyn.k_max, flag="--steps")
        c = max(1, dyn.context - 1) if context is None else context
        if not 1 <= c <= dyn.context:
            raise InputError(f"--context {c}: between 1 and the {dyn.context} frames the model was trained "
                             f"to attend to")
        ds = r.dataset()
        if wm.action_space is None and env is not None:
            raise InputError(f"run {run} is action-free (trained on video): there are no actions to drive "
                             "--env with; drop --env")
        if data is not None and wm.action_space is not None:
            _check_space(data, wm.action_space)
        if video is not None:
            source: Any = VideoClips(video, c, wm.tokenizer, wm.action_space, _dataset_fps(ds))
        else:
            source = HeldoutClips(run, data, c, wm.tokenizer, wm.cfg)
        data_dir = getattr(source, "data", None)
        meanings = None
        if wm.action_space is not None:
            meanings = action_meanings(_probe_env(env or ds.get("env_id"), wm.size), env or ds.get("env_id"))
        keys = None if wm.action_space is None else keymap(wm.action_space, meanings)
        notes = [n for n in (getattr(source, "note", ""),) if n]
        return cls(wm, source, keys, c, min(wm.tokenizer.cfg.context, c + 1), steps, env, data_dir,
                   ds.get("env_id"), Path(run).name, notes)


class Game:
    """One player's game in a :class:`World`: ``reset`` from a new context clip, ``step`` one frame.

    ``seed`` seeds the context choice and every diffusion draw; ``reset(seed=s)`` re-seeds both, so the
    same seed and keys replay the same game.
    """

    def __init__(self, world: World, seed: int | None = None):
        self.world = world
        self.gen = torch.Generator(device=world.device)
        self.rng = seeding.np_random(seed)[0]
        if seed is not None:
            self.gen.manual_seed(seed)
        else:
            self.gen.seed()  # nondeterministic, as the world-model env until reset(seed=...)
        wm = world.wm
        self.dream = FreeDream(wm, self.gen) if world.action_free else \
            ActedDream(wm, world.decoder_window, self.gen)
        self.real = None
        if world.real_env is not None:
            self.real = RealTwin(world.real_env, wm.size, wm.action_space, world.data, world.dataset_env)
        self.ctx: Context | None = None
        self.t = 0

    def reset(self, seed: int | None = None, steps: int | None = None) -> Frame:
        """Start again from a new held-out context clip (seeded: a fixed one) -> its last frame."""
        if seed is not None:
            self.rng = seeding.np_random(seed)[0]
            self.gen.manual_seed(seed)
        t0 = time.perf_counter()
        # unseeded: never the clip just played; seeded: the seed's clip, whatever came before
        self.ctx = self.world.source.draw(self.rng, self.ctx if seed is None else None)
        frame = self.dream.start(self.ctx.clip)
        ms = {"dream": _ms(t0)}
        real, note = None, ""
        if self.real is not None:
            t1 = time.perf_counter()
            actions = self.world.source.episode_actions(self.ctx) if self.ctx.episode >= 0 else None
            real, note = self.real.start(self.ctx, int(self.rng.integers(2**31)), actions)
            ms["real"] = _ms(t1)
        self.t = 0
        k = self.world.steps if steps is None else steps
        return Frame(frame, 0, k, real, reset=True, context=self.ctx.info(), note=note, ms=ms)

    def step(self, action: Any, steps: int) -> Frame:
        """Generate the next frame under ``action`` (None: the no-op) with K = ``steps``."""
        if self.ctx is None:
            raise RuntimeError("Game.step before reset")
        keys = self.world.keys
        if action is None and keys is not None:
            action = keys.noop
        t0 = time.perf_counter()
        frame, reward, cont = self.dream.step(action, steps)
        ms = {"dream": _ms(t0)}
        out = Frame(frame, self.t + 1, steps, reward=reward, cont=cont, ms=ms)
        if self.real is not None:
            t1 = time.perf_counter()
            out.real, out.real_reward, out.real_done = self.real.step(action)
            ms["real"] = _ms(t1)
        self.t += 1
        return out

    def close(self) -> None:
        if self.real is not None:
            self.real.close()


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)


def _world_model(r: Run, device: str) -> WorldModel:
    """The run's world model; an action-free run's dynamics model alone (no actions, no heads)."""
    if r.action_space() is not None:
        with warnings.catch_warnings():  # a run without an agent phase: the page shows no reward
            warnings.simplefilter("ignore")
            return r.world_model(None, device)
    tok, _ = r.tokenizer(device)
    dyn, cfg = r.dynamics(device)
    return WorldModel(tok, dyn.requires_grad_(False), None, cfg, DYNAMICS, None)


def _check_space(data: str | Path, space: Any) -> None:
    """A --data dataset with actions must have the run's action space (its clips carry those actions)."""
    from worldflow.errors import DataMismatchError
    from worldflow.run import action_space_of

    theirs = action_space_of(data)
    if theirs is not None and theirs != space:
        raise DataMismatchError(f"--data {data} has action space {theirs}, the run was trained on {space}: "
                                "pass a dataset of the run's env")


def _dataset_fps(ds: dict[str, Any]) -> float | None:
    from worldflow.data.episodes import load_manifest
    from worldflow.errors import WorldflowError

    try:
        return load_manifest(ds["data"]).get("fps")
    except (OSError, WorldflowError, KeyError, TypeError):
        return None  # the training data is not at hand: keep the file's own rate


def _probe_env(env_id: str | None, size: int) -> Any:
    """The env, built once to read its action meanings; None where it cannot be built here."""
    from worldflow.envs import make_env

    if env_id is None:
        return None
    try:
        env = make_env(env_id, size=size)
    except Exception:  # an optional extra missing, or an id this machine does not know: digits only
        return None
    env.close()
    return env
