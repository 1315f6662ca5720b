"""Checks of a dataset against the config a phase is about to train with, before any work is done.

Each mismatch is a :class:`~worldflow.errors.DataMismatchError` that gives both values, the config key
and the fix, instead of a shape error deep inside a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worldflow.config import Config
from worldflow.data.dataset import select_episodes
from worldflow.data.episodes import load_manifest
from worldflow.errors import DataMismatchError, InputError

__all__ = ["check_datasets", "check_dataset", "check_action_space"]


def check_datasets(data, cfg: Config, clips: dict[str, int], run: str | Path | None = None,
                   need_actions: bool = False) -> list[Path]:
    """:func:`check_dataset` for every ``--data`` directory, then what they must share
    (:func:`worldflow.data.mixture.mixture_space`) and, when given a ``run``, the action space it was
    trained on. ``need_actions`` (the agent phases): every dataset must have actions. Returns the
    dataset directories."""
    from worldflow.data.mixture import as_roots, mixture_space

    if cfg.dynamics.num_tasks > 1:
        # the task embeddings exist (DynamicsModel, AgentHeads take ``task``), but no dataset records a task
        raise InputError(f"dynamics.num_tasks is {cfg.dynamics.num_tasks}, but worldflow datasets carry no "
                         f"task ids, so every episode would train as task 0: use dynamics.num_tasks=1 (or "
                         f"call the models with task= from your own training loop)")
    roots = as_roots(data)
    for root in roots:
        check_dataset(root, cfg, clips)
        if need_actions and load_manifest(root)["action_space"] is None:
            raise DataMismatchError(
                f"{root} is action-free (imported video): the agent learns from actions and rewards, so "
                f"pass only action-labelled --data (collected with `worldflow collect`)")
    space = mixture_space(roots, cfg)
    if run is not None and (Path(run) / "dataset.json").exists():
        recorded = json.loads((Path(run) / "dataset.json").read_text()).get("action_space")
        if _actions_bound(run):
            check_action_space(", ".join(map(str, roots)), space, recorded, run)
    return roots


def _actions_bound(run: str | Path) -> bool:
    """Whether ``run`` has a trained dynamics (or agent) model: its action space is then fixed. Before
    that only the tokenizer may exist, which never sees actions, so any data may follow."""
    from worldflow.checkpoint import latest_checkpoint

    return latest_checkpoint(Path(run) / "dynamics" / "checkpoints") is not None  # worldflow.run's layout


def check_dataset(root: str | Path, cfg: Config, clips: dict[str, int]) -> None:
    """Frame size against ``data.size`` and each ``clips`` entry (config key -> frames per clip) against
    the longest training episode of one dataset. Phases call :func:`check_datasets` before they write
    anything."""
    manifest = load_manifest(root)
    h, w = manifest["frame_shape"][:2]
    if (h, w) != (cfg.data.size, cfg.data.size):
        raise DataMismatchError(
            f"dataset {root} has {h}x{w} frames but data.size is {cfg.data.size}: pass data.size={h} (or a "
            f"preset made for {h}-pixel frames), or collect the data again with --size {cfg.data.size}")
    train = select_episodes(manifest, "train", cfg.data.holdout_fraction)
    longest = max((int(e["num_frames"]) for e in train), default=0)
    for key, frames in clips.items():
        if frames > longest:
            raise DataMismatchError(
                f"{key}={frames} asks for {frames}-frame clips but the longest training episode of {root} "
                f"has {longest} frames: lower it ({key}={longest} or less) or collect longer episodes")


def check_action_space(root: str | Path, new: dict[str, Any] | None, recorded: dict[str, Any] | None,
                       run: str | Path) -> None:
    """A run keeps the action space of the data its dynamics model was trained on: ``new`` (dataset
    ``root``'s; None: action-free) must be the ``recorded`` one."""
    if recorded != new:
        name = lambda s: "no actions (action-free video)" if s is None else s
        raise DataMismatchError(
            f"dataset {root} has action space {name(new)} but run {run} was trained on {name(recorded)}: "
            f"train this dataset in a new --run, or pass the dataset the run was trained on")
