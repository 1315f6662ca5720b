"""Action tokens of the dynamics model and the alignment of actions to frames.

**Action alignment.** Datasets store ``actions[t]``: the action taken at frame t, leading to frame t+1
(``action_mask[t]`` False where there is none). The model's tokens of frame t carry the action that *led
to* frame t, i.e. dataset action t−1; frame 0 of a sequence carries the base embedding alone.
:func:`shift_actions` converts.

Actions of Tuple / Dict spaces travel as tuples / dicts of tensors (``Actions``); :func:`tree_map` and
:func:`cat_actions` treat them as pytrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn

Actions = Any  # a tensor (B, T, ...), or a tuple / dict of them for Tuple / Dict spaces


def init_small(m: nn.Module) -> None:
    """Transformer-style init (std 0.02) for the embeddings and projections around the backbone."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def tree_map(fn: Callable[[Tensor], Tensor], actions: Actions) -> Actions:
    if actions is None:
        return None
    if isinstance(actions, (tuple, list)):
        return type(actions)(tree_map(fn, a) for a in actions)
    if isinstance(actions, dict):
        return {k: tree_map(fn, a) for k, a in actions.items()}
    return fn(actions)


# ---------------------------------------------------------------------------------------------------
# Actions


def _leaves(space: gym.Space, prefix: str = "") -> list[tuple[str, gym.Space]]:
    """Leaf spaces with their path ('0', 'move', 'move.1' …) in a fixed order (Tuple order, Dict keys)."""
    if isinstance(space, gym.spaces.Tuple):
        return [leaf for i, s in enumerate(space.spaces) for leaf in _leaves(s, f"{prefix}{i}.")]
    if isinstance(space, gym.spaces.Dict):
        return [leaf for k, s in space.spaces.items() for leaf in _leaves(s, f"{prefix}{k}.")]
    return [(prefix.rstrip(".") or "action", space)]


def _leaf_values(actions: Actions, space: gym.Space) -> list[Tensor]:
    """The action tensors of every leaf, in :func:`_leaves` order."""
    if isinstance(space, gym.spaces.Tuple):
        return [v for a, s in zip(actions, space.spaces) for v in _leaf_values(a, s)]
    if isinstance(space, gym.spaces.Dict):
        return [v for k, s in space.spaces.items() for v in _leaf_values(actions[k], s)]
    return [actions]


class _BoxEmbed(nn.Module):
    """Box: a linear map of the flattened action, rescaled to [-1, 1] when the bounds are finite.

    One Linear over the flattened components equals a sum of per-component linear maps, so each
    component is still embedded on its own (as in Dreamer 4) at the cost of one matmul.
    """

    def __init__(self, space: gym.spaces.Box, width: int):
        super().__init__()
        low = torch.as_tensor(space.low, dtype=torch.float32).flatten()
        high = torch.as_tensor(space.high, dtype=torch.float32).flatten()
        finite = torch.isfinite(low) & torch.isfinite(high) & (high > low)
        self.register_buffer("center", torch.where(finite, (high + low) / 2, 0.0), persistent=False)
        self.register_buffer("scale", torch.where(finite, (high - low) / 2, 1.0), persistent=False)
        self.ndim = len(space.shape)
        self.proj = nn.Linear(low.numel(), width, bias=False)

    def forward(self, a: Tensor, mask: Tensor) -> Tensor:
        """a (B, T, *shape) → (B, T, width)."""
        a = a.flatten(a.dim() - self.ndim) if self.ndim else a[..., None]
        a = (a.float() - self.center) / self.scale
        return self.proj(torch.where(mask[..., None], a, 0.0))


class _IndexEmbed(nn.Module):
    """Discrete / MultiDiscrete / MultiBinary: one table, a sub-action per offset range; lookups summed."""

    def __init__(self, space: gym.Space, width: int):
        super().__init__()
        if isinstance(space, gym.spaces.Discrete):
            sizes, start, self.ndim = torch.tensor([int(space.n)]), torch.tensor([int(space.start)]), 0
        elif isinstance(space, gym.spaces.MultiDiscrete):
            sizes = torch.as_tensor(space.nvec, dtype=torch.long).flatten()
            start = torch.as_tensor(getattr(space, "start", 0), dtype=torch.long).expand(space.nvec.shape)
            start, self.ndim = start.flatten(), space.nvec.ndim
        elif isinstance(space, gym.spaces.MultiBinary):
            bits = math.prod(space.shape)
            sizes, start, self.ndim = torch.full((bits,), 2), torch.zeros(bits), len(space.shape)
        else:
            raise TypeError(f"unsupported action space {space}")
        self.register_buffer("offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("start", start.long(), persistent=False)
        self.register_buffer("top", sizes - 1, persistent=False)
        self.table = nn.Embedding(int(sizes.sum()), width)

    def forward(self, a: Tensor, mask: Tensor) -> Tensor:
        """a (B, T, *shape) integer → (B, T, width)."""
        a = a.flatten(a.dim() - self.ndim) if self.ndim else a[..., None]
        idx = (a.long() - self.start).clamp(min=0).minimum(self.top)  # masked rows may hold fill values
        return self.table(torch.where(mask[..., None], idx, 0) + self.offset).sum(-2)


class ActionEncoder(nn.Module):
    """One action token per frame from a gymnasium action space.

    token = base + mask · Σ_components embed(component): Box → linear; Discrete → lookup; MultiDiscrete →
    lookup per dim; MultiBinary → lookup per bit; Tuple / Dict → their leaves. ``actions=None`` or
    ``mask`` False gives the base embedding alone (unlabeled video, or the first frame of a sequence).
    """

    def __init__(self, space: gym.Space | None, width: int):
        super().__init__()
        self.space = space
        self.base = nn.Parameter(torch.randn(width) * 0.02)
        leaves = _leaves(space) if space is not None else []
        self.embeds = nn.ModuleList(
            _BoxEmbed(s, width) if isinstance(s, gym.spaces.Box) else _IndexEmbed(s, width) for _, s in leaves
        )

    def forward(self, actions: Actions, mask: Tensor | None, batch_shape: tuple[int, int]) -> Tensor:
        """actions: frame-aligned (B, T, ...) leaves or None; mask (B, T) bool or None → (B, T, width)."""
        out = self.base.expand(*batch_shape, -1)
        if actions is None or self.space is None:
            return out
        if mask is None:
            mask = torch.ones(batch_shape, dtype=torch.bool, device=self.base.device)
        values = _leaf_values(actions, self.space)
        comp = sum(e(v, mask) for e, v in zip(self.embeds, values))
        return out + comp * mask[..., None].to(out.dtype)


def shift_actions(actions: Actions, action_mask: Tensor | None) -> tuple[Actions, Tensor | None]:
    """Dataset-aligned (action taken at frame t) → frame-aligned (action that led to frame t).

    actions leaves (B, T, ...), action_mask (B, T) or None. Frame 0 gets a masked (zero) action.
    """
    if actions is None:
        return None, None

    def shift(a: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)

    leaf = _first_leaf(actions)
    mask = action_mask if action_mask is not None else leaf.new_ones(leaf.shape[:2], dtype=torch.bool)
    mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return tree_map(shift, actions), mask


def _first_leaf(actions: Actions) -> Tensor:
    if isinstance(actions, (tuple, list)):
        return _first_leaf(actions[0])
    if isinstance(actions, dict):
        return _first_leaf(next(iter(actions.values())))
    return actions


def cat_actions(items: list[Actions]) -> Actions:
    first = items[0]
    if isinstance(first, (tuple, list)):
        return type(first)(cat_actions([it[i] for it in items]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: cat_actions([it[k] for it in items]) for k in first}
    return torch.cat(items, dim=1)
