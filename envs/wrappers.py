"""Wrappers that turn any gymnasium env into a pixel env for world-model training, plus ``make_env``.

* :class:`PixelObservation` — observations become ``uint8 (size, size, 3)`` frames.
* :class:`ActionRepeat` — repeat each action ``k`` times, summing rewards.
* :class:`RecordEpisode` — keep the current and the last finished episode in memory.
* :func:`make_env` — build Catch, classic-control, ALE or MiniGrid ids with those wrappers applied.

Every wrapper records its constructor arguments (``RecordConstructorArgs``) so ``env.spec`` describes
the full stack and ``env.spec.make()`` rebuilds it, which ``gymnasium``'s env checker relies on.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import RecordConstructorArgs
from PIL import Image  # a dependency of matplotlib, which worldflow already requires

from worldflow.errors import InputError, WorldflowError

from . import CATCH_ID

# ---------------------------------------------------------------------------------------------- frames


def _is_image_space(space: gymnasium.Space) -> bool:
    """A uint8 Box shaped (H, W) or (H, W, C) with C in {1, 3, 4} is a picture we can use directly."""
    if not isinstance(space, spaces.Box) or space.dtype != np.uint8:
        return False
    shape = space.shape
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image → ``uint8 (H, W, 3)``.

    Grey is replicated to three channels; alpha is dropped; float frames are taken to be in [0, 255]
    unless their maximum is ≤ 1, then in [0, 1].
    """
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected an image (H, W[, 1|3|4]), got shape {frame.shape}")
    frame = frame[..., :3] if frame.shape[-1] != 1 else np.repeat(frame, 3, axis=-1)
    if frame.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(frame.dtype, np.floating) and frame.max(initial=0) <= 1.0 else 1.0
        frame = np.clip(np.rint(frame.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return frame


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """``uint8 (H, W, 3)`` → new ``uint8 (size, size, 3)`` array (aspect ratio is not preserved).

    Shrinking uses area averaging (PIL BOX) so thin objects such as a Pong ball fade rather than vanish
    between frames; enlarging uses bilinear interpolation.
    """
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame.copy()  # a fresh array either way: callers may store frames across steps
    resample = Image.Resampling.BOX if h >= size and w >= size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(frame).resize((size, size), resample=resample), dtype=np.uint8)


def _env_name(env: gymnasium.Env) -> str:
    return repr(env.spec.id) if env.spec is not None else type(env.unwrapped).__name__


# -------------------------------------------------------------------------------------------- wrappers


class PixelObservation(gymnasium.ObservationWrapper, RecordConstructorArgs):
    """Replace observations with ``uint8 (size, size, 3)`` frames.

    The frame comes from the observation itself when it is already an image (a uint8 Box of shape
    (H, W) or (H, W, C)); otherwise from ``env.render()``, which then needs ``render_mode="rgb_array"``.
    MiniGrid's dict observation has an ``'image'`` key, but that is a symbolic 7×7 grid of object ids,
    not a picture, so such envs are rendered too.
    """

    def __init__(self, env: gymnasium.Env, size: int = 64) -> None:
        RecordConstructorArgs.__init__(self, size=size)
        gymnasium.ObservationWrapper.__init__(self, env)
        if size < 1:
            raise InputError(f"PixelObservation: size must be >= 1, got {size}")
        self.size = size
        self.from_render = not _is_image_space(env.observation_space)
        if self.from_render and env.render_mode != "rgb_array":
            raise InputError(
                f"PixelObservation: environment {_env_name(env)} has non-image observations "
                f"({env.observation_space}) and render_mode={env.render_mode!r}; create it with "
                f"render_mode='rgb_array' so frames can be rendered"
            )
        self.observation_space = spaces.Box(0, 255, shape=(size, size, 3), dtype=np.uint8)

    def observation(self, observation: Any) -> np.ndarray:
        frame = self.env.render() if self.from_render else observation
        if frame is None:
            raise RuntimeError(f"PixelObservation: {_env_name(self.env)} render() returned None")
        return resize_frame(to_rgb(frame), self.size)


class ActionRepeat(gymnasium.Wrapper, RecordConstructorArgs):
    """Apply each action ``k`` times; return the last observation and the summed reward.

    Repetition stops early at termination or truncation, so an episode never runs past its end.
    ``info`` is the last inner step's, with ``info["repeats"]`` the number of inner steps taken.
    """

    def __init__(self, env: gymnasium.Env, k: int) -> None:
        RecordConstructorArgs.__init__(self, k=k)
        gymnasium.Wrapper.__init__(self, env)
        if k < 1:
            raise InputError(f"ActionRepeat: k must be >= 1, got {k}")
        self.k = k

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        total, repeats = 0.0, 0
        while repeats < self.k:
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            repeats += 1
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "repeats": repeats}


@dataclass
class EpisodeRecord:
    """One episode as :class:`RecordEpisode` records it, growing step by step (lists, not arrays; a
    dataset's loaded episode is :class:`worldflow.data.episodes.Episode`).

    ``frames`` holds T + 1 observations (the reset observation, then one per step; for pixel envs each is
    ``uint8 (H, W, 3)``); ``actions`` and ``rewards`` hold T entries. ``frames[t + 1]`` is the result
    of ``actions[t]``, which earned ``rewards[t]``.
    """

    frames: list[np.ndarray] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False

    def __len__(self) -> int:
        """Number of steps T."""
        return len(self.actions)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Stacked arrays: frames ``(T+1, ...)`` in their own dtype, actions ``(T, ...)``, rewards ``(T,)``
        float32, terminated / truncated as 0-d bool arrays."""
        return {
            "frames": np.stack(self.frames),
            "actions": np.asarray(self.actions),
            "rewards": np.asarray(self.rewards, dtype=np.float32),
            "terminated": np.asarray(self.terminated),
            "truncated": np.asarray(self.truncated),
        }


class RecordEpisode(gymnasium.Wrapper, RecordConstructorArgs):
    """Keep the current episode (``current_episode``) and the last finished one (``last_episode``).

    An episode is finished when a step returns ``terminated`` or ``truncated``. ``reset()`` starts a new
    current episode; an unfinished one is dropped then, so a collector that stops early (its own step cap)
    should read ``current_episode`` before resetting. Observations are copied, so later mutation by the
    caller cannot change the record.
    """

    def __init__(self, env: gymnasium.Env) -> None:
        RecordConstructorArgs.__init__(self)
        gymnasium.Wrapper.__init__(self, env)
        self.current_episode = EpisodeRecord()
        self.last_episode: EpisodeRecord | None = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self.current_episode = EpisodeRecord(frames=[np.array(obs, copy=True)])
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        ep = self.current_episode
        ep.frames.append(np.array(obs, copy=True))
        ep.actions.append(np.array(action, copy=True) if isinstance(action, np.ndarray) else action)
        ep.rewards.append(float(reward))
        ep.terminated, ep.truncated = bool(terminated), bool(truncated)
        if ep.done:
            self.last_episode = ep
        return obs, reward, terminated, truncated, info


# -------------------------------------------------------------------------------------------- make_env


class MissingExtraError(WorldflowError, ImportError):
    """An environment family needs an optional dependency that is not installed."""


# id prefix → (module that registers / runs the family, pip extra that installs it)
_FAMILIES = {
    "ALE/": ("ale_py", "atari"),
    "MiniGrid-": ("minigrid", "minigrid"),
    "BabyAI-": ("minigrid", "minigrid"),
    "worldflow/Crafter": ("crafter", "crafter"),
}
_CLASSIC_ENTRY = "gymnasium.envs.classic_control"


def _missing_extra(env_id: str, module: str, extra: str) -> MissingExtraError:
    return MissingExtraError(
        f"environment {env_id!r} needs the optional package {module!r}, which is not installed; "
        f'install it with: pip install "worldflow[{extra}]"'
    )


def _register_family(env_id: str) -> None:
    """Import (and so register) the optional family an id belongs to, only when it is asked for."""
    for prefix, (module, extra) in _FAMILIES.items():
        if not env_id.startswith(prefix):
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise _missing_extra(env_id, module, extra) from e
        if module == "ale_py":
            gymnasium.register_envs(mod)  # ale_py >= 0.9 no longer registers ALE/ ids on import


def _check_known(env_id: str) -> gymnasium.envs.registration.EnvSpec:
    if ":" in env_id:  # "my_pkg.envs:MyEnv-v0": import the module that registers it, as gymnasium.make does
        module = env_id.split(":", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise InputError(f"environment id {env_id!r}: cannot import its module {module!r} ({e}); is it "
                             f"installed, or on PYTHONPATH?") from None
        env_id = env_id.split(":", 1)[1]
    try:
        spec = gymnasium.spec(env_id)
    except gymnasium.error.Error as e:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InputError(f"unknown environment id {env_id!r} ({e}){hint}") from None
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    # Classic-control envs construct without pygame and only fail at the first render(); fail now instead.
    if entry.startswith(_CLASSIC_ENTRY) and importlib.util.find_spec("pygame") is None:
        raise _missing_extra(env_id, "pygame", "classic")
    return spec


def make_env(
    env_id: str, size: int = 64, action_repeat: int = 1, record: bool = False, **kwargs: Any
) -> gymnasium.Env:
    """Build ``env_id`` with ``uint8 (size, size, 3)`` pixel observations.

    Args:
        env_id: any registered gymnasium id: ``"worldflow/Catch-v0"`` (rendered natively at ``size``),
            classic control (``"CartPole-v1"``, rendered), ALE (``"ALE/Pong-v5"``, frames resized) or
            MiniGrid (``"MiniGrid-Empty-5x5-v0"``, rendered). ALE and MiniGrid are imported on demand.
        size: frame height = width in pixels.
        action_repeat: repeat each action this many times (:class:`ActionRepeat`) when > 1.
        record: wrap in :class:`RecordEpisode` (outermost, so it sees agent-level steps).
        kwargs: passed to ``gymnasium.make`` (``render_mode`` defaults to ``"rgb_array"``).

    Returns:
        an env whose ``observation_space`` is ``Box(0, 255, (size, size, 3), uint8)``.

    Raises:
        ValueError: unknown id (with close matches), or bad ``size`` / ``action_repeat``.
        MissingExtraError: (an ImportError) the id's optional extra is not installed; names the extra.
    """
    if size < 1 or action_repeat < 1:
        raise InputError(f"make_env({env_id!r}): size, action_repeat must be >= 1: {size}, {action_repeat}")
    _register_family(env_id)
    _check_known(env_id)
    kwargs.setdefault("render_mode", "rgb_array")
    if env_id == CATCH_ID:
        env = gymnasium.make(env_id, size=size, **kwargs)
    else:
        try:
            env = PixelObservation(gymnasium.make(env_id, **kwargs), size=size)
        except gymnasium.error.DependencyNotInstalled as e:
            raise MissingExtraError(f"environment {env_id!r} cannot be created: {e}") from e
    if action_repeat > 1:
        env = ActionRepeat(env, action_repeat)
    if record:
        env = RecordEpisode(env)
    return env
