"""Episodes on disk: one lossless video + one ``.npz`` sidecar per episode, and a ``manifest.json``.

Layout of a dataset directory (see docs/data.md)::

    manifest.json
    episodes/ep_000000.mp4   frames[0..T]: T+1 observations, uint8 RGB, lossless H.264
    episodes/ep_000000.npz   actions (T, ...), rewards float32 (T,), terminated/truncated bool (T,),
                             num_frames int64 () = T+1

Alignment: ``actions[t]`` is taken at ``frames[t]`` and leads to ``frames[t+1]``, with reward
``rewards[t]`` and flags ``terminated[t]`` / ``truncated[t]`` of that transition. The last frame
(``frames[T]``) is the final observation and has no action.

Action-free datasets (videos imported with ``worldflow import``) have ``"action_space": null`` in the
manifest and sidecars without ``actions`` and ``rewards``; their :class:`Episode` has ``actions`` and
``rewards`` None, and every clip read from them has ``action_mask`` False throughout.

Crash safety: every file is written to a temporary name and renamed into place, video and sidecar
first, the manifest last. An interrupted writer leaves at most orphan episode files that the manifest
does not list (they are ignored, and overwritten by the next append), never a listed episode whose
files are missing or half written.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worldflow.data.spaces import action_dtype, action_shape, space_to_dict
from worldflow.errors import InputError, WorldflowError
from worldflow.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from worldflow.envs.wrappers import EpisodeRecord

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EPISODE_DIR = "episodes"
SIDECAR_KEYS = ("actions", "rewards", "terminated", "truncated", "num_frames")
LABEL_KEYS = ("actions", "rewards")  # absent together from the sidecars of an action-free dataset


class DatasetNotFoundError(WorldflowError, FileNotFoundError):
    """A directory has no ``manifest.json`` (it is not a worldflow dataset, or nothing was collected)."""


class EmptyDatasetError(WorldflowError, ValueError):
    """A dataset's manifest lists no (usable) episodes."""


class CorruptEpisodeError(WorldflowError, RuntimeError):
    """An episode's video or sidecar is unreadable, truncated or inconsistent; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# Reading


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_NAME


def load_manifest(root: str | Path, allow_empty: bool = False) -> dict[str, Any]:
    """Read ``<root>/manifest.json``.

    Raises :class:`DatasetNotFoundError` if there is none and :class:`EmptyDatasetError` if it lists no
    episodes (unless ``allow_empty``); both messages name the directory.
    """
    root = Path(root)
    path = manifest_path(root)
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise DatasetNotFoundError(
            f"dataset directory {str(root)!r} {what}; create one with `worldflow collect --out {root} ...`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptEpisodeError(f"manifest {path} is not valid JSON: {e}") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if not manifest.get("episodes") and not allow_empty:
        raise EmptyDatasetError(f"dataset directory {str(root)!r} has no episodes (manifest lists none)")
    return manifest


def episode_files(root: str | Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """(video path, sidecar path) of a manifest episode entry."""
    root = Path(root)
    return root / entry["video"], root / entry["sidecar"]


def read_sidecar(path: str | Path) -> dict[str, np.ndarray]:
    """Load a sidecar ``.npz``: actions, rewards (T,) float32, terminated/truncated (T,) bool, num_frames.

    An action-free sidecar has neither actions nor rewards (both or neither). Raises
    :class:`CorruptEpisodeError` naming the file when it is unreadable or inconsistent.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise CorruptEpisodeError(f"cannot read episode sidecar {path}: {e}") from e
    labelled = not all(k not in data for k in LABEL_KEYS)  # an action-free sidecar has neither
    missing = [k for k in SIDECAR_KEYS if k not in data and (labelled or k not in LABEL_KEYS)]
    if missing:
        raise CorruptEpisodeError(f"episode sidecar {path} lacks keys {missing}")
    t = len(data["terminated"])
    per_step = [k for k in SIDECAR_KEYS[:4] if k in data]
    if any(len(data[k]) != t for k in per_step) or int(data["num_frames"]) != t + 1:
        lengths = ", ".join(f"{k} {len(data[k])}" for k in per_step)
        raise CorruptEpisodeError(
            f"episode sidecar {path}: inconsistent lengths ({lengths}, num_frames {int(data['num_frames'])}; "
            f"expected num_frames = T + 1)"
        )
    return data


@dataclass
class Episode:
    """One whole episode in memory.

    frames: uint8 (T+1, H, W, 3); actions: (T, ...) as recorded; rewards: float32 (T,);
    terminated, truncated: bool (T,). ``actions[t]`` at ``frames[t]`` leads to ``frames[t+1]``.
    ``actions`` and ``rewards`` are None in an action-free episode (an imported video).
    """

    frames: np.ndarray
    actions: np.ndarray | None
    rewards: np.ndarray | None
    terminated: np.ndarray
    truncated: np.ndarray
    index: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of transitions T (there are T+1 frames)."""
        return len(self.terminated)


def load_episode(
    root: str | Path, index: int, backend: str = "auto", manifest: dict | None = None
) -> Episode:
    """Load the episode whose manifest ``index`` is ``index`` fully (frames + sidecar), checked.

    Raises :class:`CorruptEpisodeError` naming the file when the video is unreadable or its frame count
    differs from the sidecar's, and ``KeyError`` when no episode has that index.
    """
    from worldflow.data.video import VideoDecodeError, VideoReader

    manifest = manifest or load_manifest(root)
    entry = next((e for e in manifest["episodes"] if e["index"] == index), None)
    if entry is None:
        raise KeyError(f"dataset {str(root)!r} has no episode with index {index}")
    video, sidecar = episode_files(root, entry)
    side = read_sidecar(sidecar)
    try:
        with VideoReader(video, backend=backend) as r:
            n = len(r)
            if n != int(side["num_frames"]):
                raise CorruptEpisodeError(
                    f"episode video {video} has {n} frames, its sidecar says {int(side['num_frames'])}"
                )
            frames = r.read_all()
    except VideoDecodeError as e:
        raise CorruptEpisodeError(f"episode video {video} is unreadable: {e}") from e
    return Episode(
        frames=frames,
        actions=side.get("actions"),
        rewards=side["rewards"].astype(np.float32) if "rewards" in side else None,
        terminated=side["terminated"].astype(bool),
        truncated=side["truncated"].astype(bool),
        index=index,
        info=dict(entry),
    )


# ---------------------------------------------------------------------------------------------------
# Writing


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class DatasetWriter:
    """Append episodes to a dataset directory (creating it, or continuing an existing one).

    Args:
        root: dataset directory.
        env_id: environment id recorded in the manifest (must match when appending); None for videos.
        action_space: gymnasium space or its :func:`space_to_dict` form (must match when appending); None
            for an action-free dataset (imported videos: episodes without actions or rewards).
        fps: playback rate stored in the videos and the manifest.
        lossless: lossless videos (default; see worldflow.data.video for why).
        meta: extra JSON-serialisable manifest keys (seed, policy, ...); existing ones are kept.

    One writer per directory at a time. Each :meth:`add_episode` writes video, sidecar, then the
    manifest, each atomically.
    """

    def __init__(
        self,
        root: str | Path,
        env_id: str | None,
        action_space,
        fps: int = 15,
        lossless: bool = True,
        meta: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        space = action_space if action_space is None or isinstance(action_space, dict) \
            else space_to_dict(action_space)
        self.lossless = lossless
        if manifest_path(self.root).is_file():
            self.manifest = load_manifest(self.root, allow_empty=True)
            self._check_compatible(env_id, space, fps)
            self.manifest.update({k: v for k, v in (meta or {}).items() if k not in self.manifest})
        else:
            self.manifest = {
                "format_version": FORMAT_VERSION,
                "env_id": env_id,
                "action_space": space,
                "frame_shape": None,  # (H, W, 3), set by the first episode
                "fps": fps,
                "lossless": lossless,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **(meta or {}),
                "episodes": [],
            }

    def _check_compatible(self, env_id: str, space: dict, fps: int) -> None:
        m = self.manifest
        for key, new in (("env_id", env_id), ("action_space", space), ("fps", fps)):
            if m.get(key) != new:
                raise InputError(
                    f"cannot append to {self.root}: its {key} is {m.get(key)!r}, new episodes have {new!r}"
                )

    @property
    def num_episodes(self) -> int:
        return len(self.manifest["episodes"])

    @property
    def action_free(self) -> bool:
        """Whether the dataset has no actions and rewards (``action_space`` null: imported videos)."""
        return self.manifest["action_space"] is None

    def add_episode(
        self,
        frames: np.ndarray,
        actions: np.ndarray | None,
        rewards: np.ndarray | None,
        terminated: np.ndarray,
        truncated: np.ndarray,
        **info: Any,
    ) -> dict[str, Any]:
        """Store one episode: frames uint8 (T+1, H, W, 3), actions (T, ...), rewards (T,), flags (T,).

        An action-free dataset takes ``actions`` and ``rewards`` None. ``info`` (JSON-serialisable, e.g.
        ``seed=3``) is stored in the episode's manifest entry. Returns that entry.
        """
        from worldflow.data.video import write_video

        frames = np.asarray(frames)
        sp = self.manifest["action_space"]
        if (actions is None or rewards is None) != (sp is None):
            raise InputError("an action-free dataset (action_space null) stores episodes without actions "
                             "and rewards; any other needs both" if sp is None else
                             f"dataset {self.root} has action space {sp}: its episodes need actions and "
                             f"rewards")
        t = len(terminated)
        arrays = {
            "terminated": np.asarray(terminated, dtype=bool),
            "truncated": np.asarray(truncated, dtype=bool),
            "num_frames": np.asarray(t + 1, dtype=np.int64),
        }
        if sp is not None:
            arrays["actions"] = np.asarray(actions, dtype=action_dtype(sp))
            arrays["rewards"] = np.asarray(rewards, dtype=np.float32)
            if arrays["actions"].shape[1:] != action_shape(sp):
                raise InputError(f"actions have shape {arrays['actions'].shape}, expected "
                                 f"(T, *{action_shape(sp)})")
        steps = {k: v for k, v in arrays.items() if k != "num_frames"}
        if frames.shape[0] != t + 1 or any(v.shape[: v.ndim if k != "actions" else 1] != (t,)
                                           for k, v in steps.items()):
            raise InputError(
                f"an episode of T transitions needs T+1 frames and T actions/rewards/flags; got frames "
                f"{frames.shape[0]}, " + ", ".join(f"{k} {v.shape}" for k, v in steps.items()))
        shape = list(frames.shape[1:])
        if self.manifest["frame_shape"] is None:
            self.manifest["frame_shape"] = shape
        elif self.manifest["frame_shape"] != shape:
            raise InputError(f"frames are {shape}, the dataset's are {self.manifest['frame_shape']}")

        index = 1 + max((e["index"] for e in self.manifest["episodes"]), default=-1)
        name = f"{EPISODE_DIR}/ep_{index:06d}"
        entry = {
            "index": index,
            "video": f"{name}.mp4",
            "sidecar": f"{name}.npz",
            "length": t,
            "num_frames": t + 1,
            "return": float(arrays["rewards"].astype(np.float64).sum()) if sp is not None else None,
            "terminated": bool(arrays["terminated"][-1]) if t else False,
            "truncated": bool(arrays["truncated"][-1]) if t else False,
            **info,
        }
        write_video(self.root / entry["video"], frames, fps=self.manifest["fps"], lossless=self.lossless)
        atomic_write_bytes(self.root / entry["sidecar"], _npz_bytes(arrays))
        self.manifest["episodes"].append(entry)
        self._write_manifest()
        return entry

    def update_meta(self, **keys: Any) -> None:
        """Set top-level manifest keys (JSON-serialisable; not ``episodes``) and write the manifest now,
        atomically. For facts learnt after the last episode (``worldflow import``'s skipped files)."""
        if "episodes" in keys:
            raise ValueError("update_meta sets dataset-level keys; add episodes with add_episode")
        self.manifest.update(keys)
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(manifest_path(self.root), json.dumps(self.manifest, indent=1, allow_nan=False))

    def add_record(self, record: EpisodeRecord, **info: Any) -> dict[str, Any]:
        """Store an :class:`~worldflow.envs.EpisodeRecord` (the episode loop's and RecordEpisode's record):
        its final flags become the per-step ones of the last transition. Returns the manifest entry."""
        sp = self.manifest["action_space"]
        t = len(record)
        actions = np.stack(record.actions) if t else np.zeros((0, *action_shape(sp)), action_dtype(sp))
        last = np.arange(t) == t - 1
        return self.add_episode(np.stack(record.frames), actions, np.asarray(record.rewards, np.float32),
                                last & record.terminated, last & record.truncated, **info)

    def episode(self, first_obs: np.ndarray, **info: Any) -> EpisodeWriter:
        """Start recording an episode step by step from its first observation (see EpisodeWriter)."""
        return EpisodeWriter(self, first_obs, **info)


class EpisodeWriter:
    """Records one episode step by step, then stores it in a :class:`DatasetWriter`.

    ``w = writer.episode(obs0)``; after each env step ``w.step(action, obs, reward, terminated,
    truncated)``; finally ``w.commit()`` (stores it, returns the manifest entry). Nothing touches the
    disk before ``commit``, so an abandoned episode leaves no trace. The episode grows as an
    :class:`~worldflow.envs.EpisodeRecord` (``w.record``).
    """

    def __init__(self, dataset: DatasetWriter, first_obs: np.ndarray, **info: Any):
        from worldflow.envs.wrappers import EpisodeRecord

        self.dataset, self.info = dataset, info
        self.record = EpisodeRecord(frames=[np.asarray(first_obs)])

    def __len__(self) -> int:
        return len(self.record)

    def step(
        self, action: Any, next_obs: np.ndarray, reward: float, terminated: bool, truncated: bool
    ) -> None:
        """Record ``action`` taken at the latest observation, and what it led to."""
        rec = self.record
        if rec.done:
            raise ValueError("this episode already ended (terminated or truncated); commit it and start "
                             "another")
        rec.actions.append(np.asarray(action))
        rec.frames.append(np.asarray(next_obs))
        rec.rewards.append(float(reward))
        rec.terminated, rec.truncated = bool(terminated), bool(truncated)

    def commit(self) -> dict[str, Any]:
        return self.dataset.add_record(self.record, **self.info)


def holdout_episodes(entries: list[dict[str, Any]], fraction: float, seed: int = 0) -> set[int]:
    """Indices (manifest ``index`` field) of held-out episodes: a deterministic split by episode.

    Each episode is held out iff a hash of (seed, its video file name) falls below ``fraction``, so the
    split of an episode never changes when more episodes are appended. When that picks none and there
    are ≥ 2 episodes, the episode with the smallest hash is held out; when it picks all, the one with the
    largest stays in training. ``fraction`` 0 holds out nothing.
    """
    import hashlib

    if not entries or fraction <= 0:
        return set()

    def u(e: dict[str, Any]) -> float:
        h = hashlib.sha256(f"{seed}:{e['video']}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    scored = sorted((u(e), e["index"]) for e in entries)
    held = {i for s, i in scored if s < fraction}
    if not held and len(scored) >= 2:
        held = {scored[0][1]}
    if len(held) == len(scored) and len(scored) >= 2:
        held.discard(scored[-1][1])
    return held
