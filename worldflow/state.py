"""Nested training state (optimizer, RNG states, caches) in one safetensors file: no pickle anywhere.

``save_state(path, tree)`` stores every tensor and numpy array of a nested structure of dicts, lists,
tuples, tensors, arrays, numbers, strings and None as safetensors, and the structure itself as JSON in
the file's metadata; ``load_state(path)`` rebuilds it. Loading parses JSON and raw tensor bytes only, so
a file a user was handed can hold data but never code (``torch.load`` of a pickle may run anything).
Dict keys keep their type (an optimizer's state is keyed by int), tuples stay tuples, floats round-trip
exactly (JSON writes the shortest repr, NaN and infinities included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from worldflow.errors import WorldflowError
from worldflow.io import atomic_path

__all__ = ["StateFileError", "save_state", "load_state"]

_KEY = "worldflow_state"  # metadata entry holding the JSON skeleton
# numpy dtypes safetensors cannot hold are stored widened and narrowed back on load
_WIDEN = {np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


class StateFileError(WorldflowError, ValueError):
    """A state file is missing, truncated, not a worldflow state file, or holds an unknown node."""


def _encode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(x, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(x.astype(_WIDEN.get(x.dtype, x.dtype))))
        return {"__ndarray__": key, "dtype": x.dtype.str}
    if isinstance(x, dict):
        return {"__dict__": [[k if isinstance(k, (str, int)) else _bad(k), _encode(v, tensors)]
                             for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return _bad(x)


def _bad(x: Any) -> Any:
    raise TypeError(f"cannot store a {type(x).__name__} in a state file (tensors, arrays, numbers, str, "
                    "None, and dicts/lists/tuples of them only)")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tensor__" in x:
        return tensors[x["__tensor__"]]
    if "__ndarray__" in x:
        return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
    if "__dict__" in x:
        return {k: _decode(v, tensors) for k, v in x["__dict__"]}
    if "__tuple__" in x:
        return tuple(_decode(v, tensors) for v in x["__tuple__"])
    raise StateFileError(f"unknown node {sorted(x)} in a state file")


def save_state(path: str | Path, tree: Any) -> None:
    """Write ``tree`` to ``path`` (a ``.safetensors`` file), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    with atomic_path(path, keep_suffix=True) as tmp:
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(skeleton)})


def load_state(path: str | Path) -> Any:
    """Read a tree written by :func:`save_state`; a broken or foreign file raises StateFileError."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"state file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        skeleton = json.loads(meta[_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise StateFileError(f"state file {path} is unreadable ({type(e).__name__}: {e})") from e
    return _decode(skeleton, tensors)
