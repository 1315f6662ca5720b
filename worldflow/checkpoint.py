"""Checkpoints: safetensors weights + JSON config + optimizer/RNG/sampler state, written atomically.

Layout of one phase inside a run directory::

    <run>/<phase>/checkpoints/step_00000500/model.safetensors   weights (strict load)
                                             state.safetensors   optimizer, step, RNG states, extra
                                             meta.json           format version, step, config
    <run>/<phase>/checkpoints/latest.json                        {"step": 500, "dir": "step_00000500"}

A checkpoint directory is built under a temporary name and renamed into place; ``latest.json`` is then
replaced atomically. A crash at any moment leaves the previous good checkpoint as ``latest``.

Nothing is unpickled: the training state is a safetensors file with its structure as JSON
(:mod:`worldflow.state`). Checkpoints written before that hold ``state.pt``, a pickle; it is read with
``torch.load(weights_only=True)`` and an allow-list of the numpy types an RNG state holds, so a crafted
one fails with a named error instead of running its code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldflow.errors import WorldflowError
from worldflow.io import atomic_write_text
from worldflow.state import StateFileError, load_state, save_state

FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a pickle, from before state.safetensors; read without running code


class CheckpointError(WorldflowError, RuntimeError):
    """A checkpoint is missing, unreadable (truncated, corrupt), or from another format version."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tensors do not fit the model (another config made it)."""


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    config: dict[str, Any], optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``step_<step>`` atomically under ``ckpt_root`` and point ``latest.json`` at it.

    ``model`` / ``optimizer`` may be given as their state dicts instead (the trainer gathers FSDP2 shards
    into full state dicts first, so every checkpoint has the single-process format). ``extra`` holds
    anything else needed to resume exactly (scheduler, sampler position, RNGs of generators). Older
    checkpoints beyond ``keep`` are removed after the new one is in place.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        state = {"step": step, "rng": rng_state(), "extra": extra or {}}
        if optimizer is not None:
            state["optimizer"] = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        save_state(tmp / STATE_FILE, state)
        meta = {"format_version": FORMAT_VERSION, "step": step, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": name}))
    _prune(root, keep, protect=name)
    return root / name


def _prune(root: Path, keep: int, protect: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_dirs(ckpt_root: str | Path) -> list[Path]:
    """Every complete-looking ``step_*`` checkpoint under ``ckpt_root``, newest first (the one
    ``latest.json`` names leads when it exists): the order resume tries them in."""
    root = Path(ckpt_root)
    dirs = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    try:
        named = _pointed_at(root)
    except (ValueError, KeyError, TypeError):  # an unreadable latest.json: the step order decides
        named = None
    if named in dirs:
        dirs.remove(named)
        dirs.insert(0, named)
    return dirs


def _pointed_at(root: Path) -> Path | None:
    """The checkpoint directory ``latest.json`` names, or None when there is no ``latest.json``."""
    ptr = root / "latest.json"
    return root / json.loads(ptr.read_text())["dir"] if ptr.exists() else None


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The directory ``latest.json`` points at, or None when there is no checkpoint yet."""
    root = Path(ckpt_root)
    d = _pointed_at(root)
    if d is None:
        return None
    if not (d / "model.safetensors").exists():
        raise CheckpointError(f"latest.json in {root} points at {d.name}, which is incomplete or missing")
    return d


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Strictly load safetensors weights; a mismatch names the offending tensors."""
    model.load_state_dict(read_weights(model, ckpt_dir), strict=True)


def read_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors after checking them strictly against ``model``'s state dict (names and
    shapes; a mismatch raises CheckpointError naming the offending tensors)."""
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"no weights at {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint weights {path} are unreadable ({' '.join(str(e).split())})") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong))
        raise CheckpointMismatchError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    return tensors


@dataclass
class Resumed:
    step: int
    extra: dict[str, Any]


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    load_weights_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None] | None = None,
                    load_optimizer_fn: Callable[[torch.optim.Optimizer, dict[str, Any]], None] | None = None
                    ) -> Resumed:
    """Load weights (strict), optimizer state and RNG states; return the step and ``extra``.

    ``load_weights_fn(model, tensors)`` / ``load_optimizer_fn(optimizer, state_dict)`` replace the plain
    ``load_state_dict`` calls (the trainer passes loaders that shard full state dicts for FSDP2); the
    tensors are checked against the model first either way.
    """
    d = Path(ckpt_dir)
    meta = read_meta(d)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d}: format version {meta.get('format_version')} != {FORMAT_VERSION}")
    tensors = read_weights(model, d)
    if load_weights_fn is None:
        model.load_state_dict(tensors, strict=True)
    else:
        load_weights_fn(model, tensors)
    state = read_state(d)
    if optimizer is not None and "optimizer" in state:
        if load_optimizer_fn is None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            load_optimizer_fn(optimizer, state["optimizer"])
    if restore_rng:
        set_rng_state(state["rng"])
    return Resumed(step=int(state["step"]), extra=state.get("extra", {}))


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (step, rng, extra, optimizer), never by unpickling code."""
    d = Path(ckpt_dir)
    if (d / STATE_FILE).exists():
        try:
            return load_state(d / STATE_FILE)
        except StateFileError as e:
            raise CheckpointError(f"checkpoint {d}: {e}") from e
    legacy = d / LEGACY_STATE_FILE
    if not legacy.exists():
        raise CheckpointError(f"checkpoint {d} has no {STATE_FILE}")
    try:
        with torch.serialization.safe_globals(_legacy_allowed()):
            return torch.load(legacy, weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything outside the allow-list
        raise CheckpointError(f"checkpoint state {legacy} is not a plain-data pickle, so it is not loaded "
                              f"(it could run code): {' '.join(str(e).split()[:24])}") from e


def _legacy_allowed() -> list[Any]:
    """What a pickled worldflow RNG state needs beyond tensors: numpy arrays, dtypes and scalars."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in ("uint32", "int64", "float64", "uint8", "bool")}]


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json (format version, step, config); unreadable raises CheckpointError."""
    path = Path(ckpt_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta {path} is unreadable ({type(e).__name__}: {e})") from e
