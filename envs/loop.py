"""The one episode loop: N environments stepped in lockstep by a batched policy.

Data collection (``worldflow collect``), real-env returns of a trained agent and the scripted baselines
all play episodes through :func:`play_episodes`, so they share one meaning of an episode: reset with a
given seed, step until ``terminated`` or ``truncated``, and a step cap that ends an episode marks its
last transition truncated (a time limit, not a terminal state: value targets bootstrap through it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from .wrappers import EpisodeRecord

__all__ = ["Played", "play_episodes", "per_env"]


@dataclass(frozen=True)
class Played:
    """Episodes played by :func:`play_episodes`, in env order."""

    returns: np.ndarray  # (N,) float64: sum of each episode's rewards
    lengths: np.ndarray  # (N,) int64: steps T of each episode
    records: list[EpisodeRecord] | None  # each episode's frames/actions/rewards (record=True), else None

    def summary(self) -> dict[str, Any]:
        """JSON-ready mean/std/returns/lengths."""
        return {"mean": float(self.returns.mean()), "std": float(self.returns.std()),
                "returns": self.returns.tolist(), "lengths": self.lengths.tolist()}


def play_episodes(envs: Sequence[gymnasium.Env], act: Callable[[np.ndarray], Any], seeds: Sequence[int],
                  max_steps: int, record: bool = False,
                  check_obs: Callable[[np.ndarray], np.ndarray] | None = None,
                  on_end: Callable[[int], None] | None = None) -> Played:
    """Reset ``envs[i]`` with ``seeds[i]``, then step all of them until each episode ends.

    ``act(obs)`` maps the stacked observations (N, *obs_shape) to N actions (indexable, row i for env i).
    It always sees all N rows, so a batched policy keeps its batch: an env whose episode has ended keeps
    its last observation there and its action is ignored. Episodes end on ``terminated`` or
    ``truncated``, or after ``max_steps`` steps, which marks the last transition truncated.
    ``check_obs`` validates (and may convert) every observation; ``on_end(i)`` runs when episode i ends.
    """
    if len(envs) != len(seeds) or not envs:
        raise ValueError(f"need one seed per env and at least one env: {len(envs)} envs, {len(seeds)} seeds")
    check = check_obs or np.asarray
    first = [check(env.reset(seed=int(s))[0]) for env, s in zip(envs, seeds, strict=True)]
    obs = np.stack(first)
    n = len(envs)
    done = np.zeros(n, bool)
    returns, lengths = np.zeros(n), np.zeros(n, np.int64)
    records = [EpisodeRecord(frames=[f.copy()]) for f in first] if record else None
    for t in range(max_steps):
        actions = act(obs)
        for i, env in enumerate(envs):
            if done[i]:
                continue
            a = actions[i]
            o, r, term, trunc, _ = env.step(a.item() if np.ndim(a) == 0 and hasattr(a, "item") else a)
            o = check(o)
            trunc = bool(trunc) or (t == max_steps - 1 and not term)
            returns[i] += float(r)
            lengths[i] += 1
            obs[i] = o
            if records is not None:
                rec = records[i]
                rec.frames.append(np.array(o, copy=True))
                rec.actions.append(np.asarray(a))
                rec.rewards.append(float(r))
                rec.terminated, rec.truncated = bool(term), trunc
            if term or trunc:
                done[i] = True
                if on_end is not None:
                    on_end(i)
        if done.all():
            break
    return Played(returns, lengths, records)


def per_env(policies: Sequence[Callable[[Any], Any]]) -> Callable[[np.ndarray], list[Any]]:
    """A batched ``act`` from one unbatched policy per env (scripted policies read their own env)."""
    return lambda obs: [p(o) for p, o in zip(policies, obs, strict=True)]
