"""The real environment beside the dream, started where the dream starts (``worldflow play --env``).

A dataset episode written by ``worldflow collect`` records the seed its env was reset with and every
action taken. For a context clip of episode e, frames s .. s+C−1, the real env is reset with e's seed and
fed e's actions 0 .. s+C−2, so it stands on the clip's last frame, the frame the dream starts from; from
then on both take the same keys. Envs whose transitions are a function of seed and actions (Catch, the
Arcade Learning Environment with sticky actions off, MiniGrid, classic control) end up exactly there:
the replayed observation is checked against the dataset's stored frame where the dataset is at hand,
and the page says whether the start is *exact*.

Where that alignment is not available (a clip from a video file, an episode without a recorded seed,
another env than the dataset's, a replay that ends elsewhere), the real env is reset from the episode's
seed (else the game's seed) and the page says that its start differs from the dream's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from worldflow.errors import InputError
from worldflow.play.sources import Context

__all__ = ["RealTwin"]

_EXACT_TOLERANCE = 2.0  # mean |diff| in uint8 levels: a lossy (mp4) dataset stores frames within this


class RealTwin:
    """A real env, driven by the game's actions, aligned to each context clip (see the module docstring).

    ``start(ctx, seed, actions)`` -> (frame (H, W, 3) uint8, note); ``step(action)`` -> (frame, reward,
    done). After the real episode ends its last frame stays until the next start.
    """

    def __init__(self, env_id: str, size: int, space: gym.Space, data: str | Path | None,
                 dataset_env: str | None):
        from worldflow.data.episodes import load_manifest
        from worldflow.envs import make_env

        self.data = Path(data) if data is not None else None
        self.manifest = load_manifest(self.data) if self.data is not None else None
        if self.manifest is not None:  # the env the context episodes were recorded in
            dataset_env = self.manifest.get("env_id", dataset_env)
        same = dataset_env == env_id and self.manifest is not None
        kwargs = dict(self.manifest.get("env_kwargs") or {}) if same else {}
        repeat = int(self.manifest.get("action_repeat", 1)) if same else 1
        self.env = make_env(env_id, size=size, action_repeat=repeat, **kwargs)
        if self.env.action_space != space:
            raise InputError(f"--env {env_id} has action space {self.env.action_space}, the run was trained "
                             f"on {space}: pass the env the run's dataset came from ({dataset_env})")
        self.env_id, self.same_env, self.dataset_env = env_id, same, dataset_env
        self.done, self.frame = False, None

    def start(self, ctx: Context, seed: int, actions: Any | None) -> tuple[np.ndarray, str]:
        """Reset aligned to ``ctx``; ``actions``: the dataset actions leading to its last frame (or None)."""
        entry = self._entry(ctx.episode)
        ep_seed = entry.get("seed") if entry else None
        self.done = False
        if ep_seed is None or not self.same_env or actions is None:
            return self._seeded(int(ep_seed) if ep_seed is not None else seed, ctx)
        obs, _ = self.env.reset(seed=int(ep_seed))
        for a in np.asarray(actions):
            obs, _, terminated, truncated, _ = self.env.step(a.item() if a.ndim == 0 else a)
            if terminated or truncated:
                return self._seeded(int(ep_seed), ctx, "its replay ended early")
        self.frame = np.asarray(obs)
        truth = self._stored_frame(ctx)
        if truth is None:
            return self.frame, (f"real env: seed {ep_seed} and the episode's actions replayed to the "
                                "context's last frame (the dataset is not at hand to confirm it)")
        if np.abs(self.frame.astype(np.float32) - truth).mean() > _EXACT_TOLERANCE:
            return self.frame, (f"real env: seed {ep_seed} and the episode's actions replayed, but it "
                                "differs from the stored frame: this env is not a function of seed and "
                                "actions")
        return self.frame, "real env: exact same start (seed and actions replayed, checked against the data)"

    def _seeded(self, seed: int, ctx: Context, why: str = "") -> tuple[np.ndarray, str]:
        obs, _ = self.env.reset(seed=seed)
        self.frame = np.asarray(obs)
        reason = why or ("the clip comes from a video file" if ctx.episode < 0 else
                         f"--env is not the dataset's env ({self.dataset_env})" if not self.same_env else
                         "the episode has no recorded seed")
        return self.frame, f"real env: started from seed {seed} only ({reason}), so its start differs"

    def step(self, action: Any) -> tuple[np.ndarray, float, bool]:
        if self.done:
            return self.frame, 0.0, True
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.frame, self.done = np.asarray(obs), bool(terminated or truncated)
        return self.frame, float(reward), self.done

    def _entry(self, episode: int) -> dict[str, Any] | None:
        if self.manifest is None or episode < 0:
            return None
        return next((e for e in self.manifest["episodes"] if e["index"] == episode), None)

    def _stored_frame(self, ctx: Context) -> np.ndarray | None:
        from worldflow.data.episodes import load_episode

        if self.data is None or not self.data.exists():
            return None
        frames = load_episode(self.data, ctx.episode, manifest=self.manifest).frames
        return frames[ctx.start + len(ctx.clip) - 1].astype(np.float32)

    def close(self) -> None:
        self.env.close()
