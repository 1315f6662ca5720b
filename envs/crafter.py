"""Crafter (Hafner 2021) as a gymnasium env: ``worldflow/Crafter-v0``, needs the ``crafter`` extra.

Crafter speaks the old gym API (``reset() -> obs``, ``step -> (obs, reward, done, info)``) and is seeded
at construction; this adapter gives it gymnasium's: ``reset(seed=...)`` reseeds the world generator, and
``done`` splits into ``terminated`` (the player died: Crafter's ``info["discount"]`` is 0) and
``truncated`` (the episode hit its length). Observations are Crafter's own uint8 (size, size, 3) frames.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces


class CrafterEnv(gymnasium.Env):
    """Crafter's 64×64 open world, 17 discrete actions, reward for achievements and health changes."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, size: int = 64, length: int = 10000, render_mode: str | None = "rgb_array"):
        import crafter  # the optional extra: imported only when the env is built

        self._env = crafter.Env(size=(size, size), length=length, seed=0)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = spaces.Discrete(int(self._env.action_space.n))
        self._last: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:  # Crafter derives each episode's world from (seed, episode counter)
            self._env._seed, self._env._episode = int(seed), 0
        self._last = np.asarray(self._env.reset(), dtype=np.uint8)
        return self._last, {}

    def step(self, action):
        obs, reward, done, info = self._env.step(int(action))
        self._last = np.asarray(obs, dtype=np.uint8)
        terminated = bool(done and info.get("discount", 1.0) == 0)
        return self._last, float(reward), terminated, bool(done and not terminated), {
            "achievements": dict(info.get("achievements", {}))}

    def render(self):
        return self._last
