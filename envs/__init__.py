"""Environments for worldflow: the Catch game, pixel wrappers, ``make_env`` and data-collection policies.

Importing this package registers ``worldflow/Catch-v0`` with gymnasium (once, even on re-import), so
``gymnasium.make("worldflow/Catch-v0", size=32)`` works anywhere after ``import worldflow.envs``.
"""

from __future__ import annotations

import gymnasium

CATCH_ID = "worldflow/Catch-v0"

# Re-importing (reloads, several test modules) must not re-register: gymnasium warns on overrides.
if CATCH_ID not in gymnasium.registry:
    gymnasium.register(id=CATCH_ID, entry_point="worldflow.envs.catch:CatchEnv", max_episode_steps=1000)
# Crafter needs its extra; the entry point is a string, so nothing is imported until the env is built.
if "worldflow/Crafter-v0" not in gymnasium.registry:
    gymnasium.register(id="worldflow/Crafter-v0", entry_point="worldflow.envs.crafter:CrafterEnv")
# The trained world model as an env (worldflow.gym_env.env registers the same spec); strings keep torch
# unimported.
if "worldflow/WorldModel-v0" not in gymnasium.registry:
    gymnasium.register(id="worldflow/WorldModel-v0", entry_point="worldflow.gym_env.env:WorldModelEnv",
                       vector_entry_point="worldflow.gym_env.env:WorldModelVectorEnv")

from .catch import CatchEnv  # noqa: E402  (registration first: the modules below may call make)
from .policies import POLICY_KINDS, make_policy  # noqa: E402
from .wrappers import ActionRepeat, EpisodeRecord, PixelObservation, RecordEpisode, make_env  # noqa: E402


def object_reader(env_id: str | None):
    """A function frames (..., S, S, 3) -> {object name: bool cell grid} for envs whose sprites can be
    read off the pixels (Catch), else None. Evaluation uses it to score object positions per horizon."""
    if env_id == CATCH_ID:
        from .catch import read_objects

        return read_objects
    return None


def frame_checker(env_id: str | None):
    """A function frames (..., S, S, 3) -> bool (...) saying whether each frame is one the env can show
    (crisp sprites, the right number of each, in legal places), for envs whose sprites can be read
    (Catch), else None. Evaluation reports the share of valid generated frames (``validity``)."""
    if env_id == CATCH_ID:
        from .catch import frame_validity

        return frame_validity
    return None


__all__ = [
    "CATCH_ID",
    "frame_checker",
    "object_reader",
    "POLICY_KINDS",
    "ActionRepeat",
    "CatchEnv",
    "EpisodeRecord",
    "PixelObservation",
    "RecordEpisode",
    "make_env",
    "make_policy",
]
