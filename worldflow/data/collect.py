"""Collect episodes from a gymnasium env into a dataset directory, and the ``worldflow collect`` command.

Episode ``k`` of a dataset (its index, counting episodes already there when appending) is reset with
seed ``seed + k``, so a fresh collection of N episodes uses seeds seed … seed+N−1 and appending more
episodes later continues the sequence instead of repeating episodes. The policy's RNG is seeded with
``seed + k`` too, so every episode is reproducible on its own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from worldflow.argtypes import nonneg_int, positive_int, probability
from worldflow.config import CollectConfig
from worldflow.data.episodes import DatasetWriter
from worldflow.data.spaces import space_to_dict
from worldflow.errors import InputError

POLICIES = ("random", "expert", "epsilon-expert")


def _make_env(env_id: str, size: int, action_repeat: int, **kwargs: Any):
    # Imported here, not at module level, so `worldflow --help` does not import every env family.
    from worldflow.envs.wrappers import make_env

    return make_env(env_id, size=size, action_repeat=action_repeat, **kwargs)


def _make_policy(kind: str, env, epsilon: float, seed: int):
    from worldflow.envs.policies import make_policy

    return make_policy(kind, env, epsilon=epsilon, seed=seed)


def _check_obs(obs: Any, size: int, env_id: str) -> np.ndarray:
    obs = np.asarray(obs)
    if obs.dtype != np.uint8 or obs.shape != (size, size, 3):
        raise InputError(
            f"env {env_id!r} returned observations {obs.dtype} {obs.shape}, expected uint8 "
            f"({size}, {size}, 3)"
        )
    return obs


def run_episode(
    env, policy, writer: DatasetWriter, seed: int, max_steps: int, env_id: str, size: int
) -> dict:
    """Play one episode (reset with ``seed``, at most ``max_steps`` steps) and store it; returns its entry.

    Hitting ``max_steps`` marks the last transition truncated (worldflow.envs.loop.play_episodes).
    """
    from worldflow.envs.loop import per_env, play_episodes

    played = play_episodes([env], per_env([policy]), [seed], max_steps, record=True,
                           check_obs=lambda o: _check_obs(o, size, env_id))
    return writer.add_record(played.records[0], seed=seed)


def collect(
    env_id: str,
    episodes: int,
    out: str | Path,
    policy: str = "random",
    size: int = 64,
    seed: int = 0,
    epsilon: float = 0.3,
    action_repeat: int = 1,
    max_steps: int = 1000,
    progress: bool = True,
    fps: int = 15,
    lossless: bool = True,
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect ``episodes`` episodes of ``env_id`` into dataset directory ``out``; returns the manifest.

    Appends when ``out`` already holds a dataset of the same env and action space. Each episode is on
    disk (video, sidecar, manifest entry) as soon as it ends, so an interrupted run keeps every finished
    episode. ``env_kwargs`` go to ``make_env`` (e.g. ``num_balls=1`` for Catch).
    """
    from tqdm.auto import tqdm

    if episodes < 1 or max_steps < 1:
        raise InputError(f"episodes and max_steps must be >= 1, got {episodes}, {max_steps}")
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    env = _make_env(env_id, size, action_repeat, **(env_kwargs or {}))
    meta = {
        "seed": seed,
        "policy": policy,
        "epsilon": epsilon,
        "action_repeat": action_repeat,
        "max_steps": max_steps,
        "frame_size": size,
        "env_kwargs": env_kwargs or {},
    }
    writer = DatasetWriter(
        out, env_id, space_to_dict(env.action_space), fps=fps, lossless=lossless, meta=meta
    )
    start = writer.num_episodes
    bar = tqdm(range(start, start + episodes), desc=f"collect {env_id}", unit="ep", disable=not progress)
    try:
        for k in bar:
            pol = _make_policy(policy, env, epsilon, seed + k)
            entry = run_episode(env, pol, writer, seed + k, max_steps, env_id, size)
            bar.set_postfix(len=entry["length"], ret=f"{entry['return']:.2f}")
    finally:
        bar.close()
        env.close()
    return writer.manifest


def collect_from_config(cfg: CollectConfig, out: str | Path, size: int = 64, progress: bool = True) -> dict:
    """:func:`collect` with the settings of a :class:`~worldflow.config.CollectConfig`."""
    return collect(
        cfg.env,
        cfg.episodes,
        out,
        policy=cfg.policy,
        size=size,
        seed=cfg.seed,
        epsilon=cfg.epsilon,
        action_repeat=cfg.action_repeat,
        max_steps=cfg.max_steps,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``worldflow collect`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "collect",
        help="collect episodes from an environment into a dataset directory",
        description="Roll out a policy in a gymnasium env and store episodes as lossless videos + "
        "action/reward sidecars (see docs/data.md). Appends to an existing dataset of the same env.",
    )
    p.add_argument("--env", required=True, help="gymnasium env id, e.g. worldflow/Catch-v0, CartPole-v1")
    p.add_argument("--episodes", type=positive_int, required=True, help="number of episodes to collect")
    p.add_argument("--out", required=True, help="dataset directory (created, or appended to)")
    p.add_argument("--policy", choices=POLICIES, default="random", help="behaviour policy (default random)")
    p.add_argument("--size", type=positive_int, default=64,
                   help="frame height = width in pixels (default 64)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="episode k is reset with seed + k (default 0)")
    p.add_argument("--epsilon", type=probability, default=0.3,
                   help="random-action rate of epsilon-expert (0.3)")
    p.add_argument("--action-repeat", type=positive_int, default=1,
                   help="repeat each action K times (default 1)")
    p.add_argument("--max-steps", type=positive_int, default=1000,
                   help="cap on steps per episode (default 1000)")
    p.add_argument("--fps", type=positive_int, default=15,
                   help="frame rate stored in the videos (default 15)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    manifest = collect(
        args.env,
        args.episodes,
        args.out,
        policy=args.policy,
        size=args.size,
        seed=args.seed,
        epsilon=args.epsilon,
        action_repeat=args.action_repeat,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        fps=args.fps,
    )
    eps = manifest["episodes"][-args.episodes :]
    returns = np.array([e["return"] for e in eps])
    steps = sum(e["length"] for e in eps)
    print(
        f"collected {len(eps)} episodes ({steps} steps) of {args.env} in {time.perf_counter() - t0:.1f}s: "
        f"return {returns.mean():.3f} ± {returns.std():.3f}; {args.out} now holds {len(manifest['episodes'])}"
        " episodes"
    )
    return 0
