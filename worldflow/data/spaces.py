"""Action spaces: the one module that knows how gymnasium action spaces are described, checked and converted.

An action has two tensor forms, and every converter names which it takes and gives:

- **env values** — what the env takes and the dataset stores (``actions[t]`` in an episode sidecar), and
  what the dynamics model embeds: the env's own integers for Discrete / MultiDiscrete (``start``
  included), {0, 1} for MultiBinary, floats for Box. As tensors: long for integer spaces, float32 for Box.
- **policy indices** — what a policy distribution samples and scores (:mod:`worldflow.agent.distributions`):
  the same with ``start`` removed, so an integer action is an index into ``n`` classes.

Supported spaces: Discrete, MultiDiscrete, MultiBinary and Box (finite bounds for policies); any other
space raises ValueError naming the space. Every env action a user passes in goes through
:func:`check_action`, whose ValueError names the space, the problem (type, shape, range) and the action.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from worldflow.errors import InputError

__all__ = [
    "space_to_dict",
    "space_from_dict",
    "action_dtype",
    "action_shape",
    "event_shape",
    "check_space",
    "check_action",
    "env_values",
    "null_values",
    "action_to_tensor",
    "tensor_to_action",
    "values_to_indices",
    "indices_to_values",
]


# ---------------------------------------------------------------------------------------------------
# Descriptions ⇄ JSON (the dataset manifest's ``action_space``)


def _float_list(a: np.ndarray) -> Any:
    """Array → nested lists, with ±inf / nan as strings (strict JSON has no non-finite numbers)."""
    return [_float_list(x) for x in a] if a.ndim else (str(float(a)) if not np.isfinite(a) else a.item())


def _float_array(v: Any, dtype: str) -> np.ndarray:
    def conv(x: Any) -> Any:
        return [conv(y) for y in x] if isinstance(x, list) else float(x)

    return np.asarray(conv(v), dtype=dtype)


def space_to_dict(space) -> dict[str, Any]:
    """A JSON-serialisable description of a Discrete, Box, MultiDiscrete or MultiBinary space."""
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": np.dtype(space.dtype).name,
            "low": _float_list(np.asarray(space.low, dtype=np.float64)),
            "high": _float_list(np.asarray(space.high, dtype=np.float64)),
        }
    if isinstance(space, spaces.MultiDiscrete):
        return {
            "type": "MultiDiscrete",
            "nvec": np.asarray(space.nvec).tolist(),
            "start": np.asarray(space.start).tolist(),
            "dtype": np.dtype(space.dtype).name,
        }
    if isinstance(space, spaces.MultiBinary):
        n = space.n
        return {"type": "MultiBinary", "n": int(n) if np.isscalar(n) else list(n)}
    raise TypeError(
        f"cannot serialise action space {space!r}: supported are Discrete, Box, MultiDiscrete, MultiBinary"
    )


def space_from_dict(d: dict[str, Any] | None):
    """Rebuild the gymnasium space described by :func:`space_to_dict`; None (an action-free dataset's
    ``action_space``) gives None."""
    if d is None:
        return None
    kind = d.get("type")
    if kind == "Discrete":
        return spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
    if kind == "Box":
        dtype = d.get("dtype", "float32")
        return spaces.Box(
            low=_float_array(d["low"], dtype),
            high=_float_array(d["high"], dtype),
            shape=tuple(d["shape"]),
            dtype=dtype,
        )
    if kind == "MultiDiscrete":
        dtype = d.get("dtype", "int64")
        return spaces.MultiDiscrete(np.asarray(d["nvec"]), dtype=dtype, start=np.asarray(d.get("start", 0)))
    if kind == "MultiBinary":
        return spaces.MultiBinary(d["n"])
    raise InputError(f"unknown action space description {d!r}")


def action_dtype(space_dict: dict[str, Any]) -> np.dtype:
    """On-disk dtype of actions: int64 for discrete kinds, the Box dtype for Box."""
    if space_dict["type"] == "Box":
        return np.dtype(space_dict.get("dtype", "float32"))
    if space_dict["type"] == "MultiBinary":
        return np.dtype(np.int8)
    return np.dtype(np.int64)


def action_shape(space_dict: dict[str, Any]) -> tuple[int, ...]:
    """Shape of one action (``()`` for Discrete)."""
    kind = space_dict["type"]
    if kind == "Discrete":
        return ()
    if kind == "Box":
        return tuple(space_dict["shape"])
    if kind == "MultiDiscrete":
        return tuple(np.shape(space_dict["nvec"]))
    n = space_dict["n"]
    return (n,) if isinstance(n, int) else tuple(n)


# ---------------------------------------------------------------------------------------------------
# Checking and converting env actions


def _bad(space: gym.Space, action: Any, reason: str) -> InputError:
    return InputError(f"bad action for action space {space}: {reason}; got {action!r}")


def event_shape(space: gym.Space) -> tuple[int, ...]:
    """Shape of one action of ``space`` (``()`` for Discrete)."""
    return () if isinstance(space, gym.spaces.Discrete) else tuple(space.shape)


_KINDS = {  # numpy dtype kinds an action may have: i signed, u unsigned, b bool, f float
    gym.spaces.Discrete: ("iu", "an integer"),
    gym.spaces.MultiDiscrete: ("iu", "integers"),
    gym.spaces.MultiBinary: ("iub", "integers or bools in {0, 1}"),
    gym.spaces.Box: ("iuf", "real numbers"),
}


def _kinds(space: gym.Space) -> tuple[str, str]:
    """(allowed dtype kinds, description) for a supported space; ValueError for any other space."""
    for cls, kinds in _KINDS.items():
        if isinstance(space, cls):
            return kinds
    raise InputError(f"unsupported action space {space}: expected Discrete, MultiDiscrete, MultiBinary, Box")


def check_space(space: gym.Space) -> gym.Space:
    """``space`` itself if it is a supported kind; ValueError naming it otherwise."""
    _kinds(space)
    return space


def _fmt_shape(dims: tuple) -> str:
    return "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


def check_action(space: gym.Space, action: Any, batched: bool = False) -> np.ndarray:
    """Validate an env action against ``space``; return it as a numpy array (shape ``(*B?, *space.shape)``).

    ``batched=True`` allows exactly one leading batch dim. Raises ValueError naming the space, the
    problem (type, shape, range) and the action. Accepts Python scalars/lists, numpy arrays and tensors.
    """
    kinds, what = _kinds(space)
    raw = action.detach().cpu().numpy() if isinstance(action, Tensor) else action
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError) as e:  # ragged lists
        raise _bad(space, action, f"not convertible to an array ({e})") from None
    if arr.dtype.kind not in kinds:
        raise _bad(space, action, f"wrong type: expected {what}, got dtype {arr.dtype}")
    want = event_shape(space)
    shape = arr.shape[1:] if batched else arr.shape
    if shape != want or (batched and arr.ndim == 0):
        exp = _fmt_shape(("B", *want) if batched else want)
        raise _bad(space, action, f"wrong shape: expected {exp}, got {_fmt_shape(arr.shape)}")
    _check_range(space, arr, action)
    return arr


def _check_range(space: gym.Space, arr: np.ndarray, action: Any) -> None:
    if isinstance(space, gym.spaces.Discrete):
        lo, hi = int(space.start), int(space.start + space.n)
        if np.any(arr < lo) or np.any(arr >= hi):
            raise _bad(space, action, f"out of range: expected an integer in [{lo}, {hi - 1}]")
    elif isinstance(space, gym.spaces.MultiDiscrete):
        if np.any(arr < space.start) or np.any(arr >= space.start + space.nvec):
            raise _bad(space, action, f"out of range: expected start <= a < start + nvec, nvec={space.nvec}")
    elif isinstance(space, gym.spaces.MultiBinary):
        if np.any((arr != 0) & (arr != 1)):
            raise _bad(space, action, "out of range: expected values in {0, 1}")
    else:
        if not np.all(np.isfinite(arr)):
            raise _bad(space, action, "not finite (NaN or inf)")
        if np.any(arr < space.low) or np.any(arr > space.high):
            raise _bad(
                space, action, f"out of bounds: expected low <= a <= high, low={space.low}, high={space.high}"
            )


def action_to_tensor(
    space: gym.Space, action: Any, batched: bool = False, device: torch.device | str | None = None
) -> Tensor:
    """Env action -> policy-index tensor (long for integer spaces, float32 for Box); validated first."""
    return values_to_indices(space, env_values(space, action, batched)).to(device)


def tensor_to_action(space: gym.Space, action: Tensor) -> Any:
    """Policy-index tensor (*B, *E) -> env action in ``space`` (int for an unbatched Discrete, else a numpy
    array of the space's dtype with the batch dims in front). Box actions are clipped to the bounds so float
    rounding in the squashing can never leave the space."""
    _kinds(space)
    arr = action.detach().cpu().numpy()
    if isinstance(space, gym.spaces.Box):
        return np.clip(arr, space.low, space.high).astype(space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        out = arr.astype(np.int64) + int(space.start)
        return int(out) if out.ndim == 0 else out
    if isinstance(space, gym.spaces.MultiDiscrete):
        return (arr.astype(np.int64) + space.start).astype(space.dtype)
    return arr.astype(space.dtype)


# ---------------------------------------------------------------------------------------------------
# Env values <-> policy indices (tensors)


def _value_dtype(space: gym.Space) -> torch.dtype:
    return torch.float32 if isinstance(space, gym.spaces.Box) else torch.long


def env_values(space: gym.Space, action: Any, batched: bool = False) -> Tensor:
    """Env action(s) -> env-value tensor (the dataset's and the dynamics model's form); validated first."""
    arr = check_action(space, action, batched)
    return torch.as_tensor(np.array(arr)).to(_value_dtype(space))  # a copy (ascontiguousarray makes 0-d 1-d)


def null_values(space: gym.Space, n: int) -> Tensor:
    """(n, *E) placeholder env values, for frames without an action (ignored under a False action mask)."""
    return torch.zeros((n, *event_shape(space)), dtype=_value_dtype(space))


def _start(space: gym.Space, like: Tensor) -> Tensor | None:
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        return torch.as_tensor(space.start, device=like.device)
    return None


def indices_to_values(space: gym.Space, a: Tensor) -> Tensor:
    """Policy-index tensor (*B, *E) -> env values (*B, *E): adds ``start`` back for integer spaces."""
    start = _start(space, a)
    return a if start is None else a + start


def values_to_indices(space: gym.Space, values: Tensor) -> Tensor:
    """Env-value tensor (*B, *E) -> policy indices (*B, *E): long for integer spaces, float32 for Box."""
    start = _start(space, values)
    if start is not None:
        return (values - start).long()
    return values.long() if isinstance(space, gym.spaces.MultiBinary) else values.float()
