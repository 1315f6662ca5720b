"""Dynamics transformer (DESIGN §5): latents + actions + agent tokens → x̂; shortcut forcing; rollout.

Tokens of one frame, in this order (``DynamicsModel.layout``)::

    [ S_z spatial | S_r registers | 1 (τ, d) | 1 action | A agent ]

- spatial: Linear of the tokenizer latents, ``pack`` latents (concatenated channels) per token;
- registers: learned, the same for every frame;
- (τ, d): embedding of τ's index on the K_max grid ‖ embedding of log2(1/d), projected to the width;
- action: :class:`ActionEncoder` (base embedding + each action component embedded on its own);
- agent: learned agent embeddings + task embedding; they attend to every token of their frame, and no
  other token attends to them, so the task cannot leak into predicted frames.

**Action alignment.** Datasets store ``actions[t]``: the action taken at frame t, leading to frame t+1
(``action_mask[t]`` False where there is none). The model's tokens of frame t carry the action that *led
to* frame t, i.e. dataset action t−1; frame 0 of a sequence carries the base embedding alone.
:func:`shift_actions` converts; :func:`dynamics_loss` and :func:`rollout` take dataset-aligned actions and
shift internally, :meth:`DynamicsModel.forward` takes frame-aligned (already shifted) actions.

The flow maths (corruption, (τ, d) sampling, objectives, Euler steps) all live in :mod:`worldflow.flow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn

from worldflow import flow, rng
from worldflow.config import DynamicsConfig
from worldflow.distributed import rows_of
from worldflow.nn import KVCache, SpaceTimeTransformer

Actions = Any  # a tensor (B, T, ...), or a tuple / dict of them for Tuple / Dict spaces


def _init_small(m: nn.Module) -> None:
    """Transformer-style init (std 0.02) for the embeddings and projections around the backbone."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def _tree_map(fn: Callable[[Tensor], Tensor], actions: Actions) -> Actions:
    if actions is None:
        return None
    if isinstance(actions, (tuple, list)):
        return type(actions)(_tree_map(fn, a) for a in actions)
    if isinstance(actions, dict):
        return {k: _tree_map(fn, a) for k, a in actions.items()}
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
    component is still embedded on its own (DESIGN §5) at the cost of one matmul.
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
    return _tree_map(shift, actions), mask


def _first_leaf(actions: Actions) -> Tensor:
    if isinstance(actions, (tuple, list)):
        return _first_leaf(actions[0])
    if isinstance(actions, dict):
        return _first_leaf(next(iter(actions.values())))
    return actions


# ---------------------------------------------------------------------------------------------------
# Model


class DynamicsModel(nn.Module):
    """x-prediction dynamics transformer over (B, T, N_l, D_b) tokenizer latents (DESIGN §5).

    cfg: :class:`DynamicsConfig`; latent_tokens N_l and latent_dim D_b of the tokenizer; action_space: the
    environment's gymnasium space (None: video only).
    """

    def __init__(
        self, cfg: DynamicsConfig, latent_tokens: int, latent_dim: int, action_space: gym.Space | None
    ):
        super().__init__()
        if latent_tokens % cfg.pack:
            raise ValueError(f"latent_tokens {latent_tokens} not divisible by pack {cfg.pack}")
        self.cfg = cfg
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        self.log2_k_max = flow.check_k_max(cfg.k_max)
        width = cfg.transformer.width
        sizes = dict(
            spatial=latent_tokens // cfg.pack,
            registers=cfg.registers,
            noise=1,
            action=1,
            agent=cfg.agent_tokens,
        )
        self.layout: dict[str, slice] = {}
        i = 0
        for name, n in sizes.items():
            self.layout[name] = slice(i, i + n)
            i += n
        self.tokens_per_frame = i

        self.embed_latents = nn.Linear(cfg.pack * latent_dim, width)
        self.registers = nn.Parameter(torch.randn(cfg.registers, width) * 0.02)
        self.tau_embed = nn.Embedding(cfg.k_max, width)  # τ·K_max ∈ {0, …, K_max − 1}
        self.step_embed = nn.Embedding(self.log2_k_max + 1, width)  # log2(1/d) ∈ {0, …, log2 K_max}
        self.noise_proj = nn.Linear(2 * width, width)
        self.action_encoder = ActionEncoder(action_space, width)
        self.agent_embed = nn.Parameter(torch.randn(cfg.agent_tokens, width) * 0.02)
        self.task_embed = nn.Embedding(max(1, cfg.num_tasks), width)
        self.head = nn.Linear(width, cfg.pack * latent_dim)
        self.apply(_init_small)
        self.backbone = SpaceTimeTransformer(cfg.transformer)  # initialises itself
        self.register_buffer("spatial_mask", self._spatial_mask(), persistent=False)

    def _spatial_mask(self) -> Tensor:
        """(S, S) bool, True = query may attend key: agent tokens see all, nothing sees agent tokens."""
        s, agent = self.tokens_per_frame, self.layout["agent"]
        m = torch.ones(s, s, dtype=torch.bool)
        m[:, agent] = False
        m[agent, :] = True
        return m

    def tokens(
        self,
        z: Tensor,
        tau: Tensor,
        d: Tensor,
        actions: Actions = None,
        action_mask: Tensor | None = None,
        task: Tensor | None = None,
    ) -> Tensor:
        """Input tokens (B, T, S, width) of noisy latents z (B, T, N_l, D_b) at levels tau, d (B, T)."""
        b, t, n, dim = z.shape
        cfg = self.cfg
        spatial = self.embed_latents(z.reshape(b, t, n // cfg.pack, cfg.pack * dim))
        registers = self.registers.expand(b, t, -1, -1)
        tau_i = flow.tau_index(tau, cfg.k_max).clamp(0, cfg.k_max - 1)
        step_i = flow.step_index(d).clamp(0, self.log2_k_max)
        noise = self.noise_proj(torch.cat([self.tau_embed(tau_i), self.step_embed(step_i)], dim=-1))
        action = self.action_encoder(actions, action_mask, (b, t))
        task = torch.zeros(b, dtype=torch.long, device=z.device) if task is None else task
        agent = self.agent_embed + self.task_embed(task)[:, None, None, :]  # (B, 1, A, W)
        agent = agent.expand(b, t, -1, -1)
        return torch.cat([spatial, registers, noise[:, :, None], action[:, :, None], agent], dim=2)

    def forward(
        self,
        z: Tensor,
        tau: Tensor,
        d: Tensor,
        actions: Actions = None,
        action_mask: Tensor | None = None,
        task: Tensor | None = None,
        cache: KVCache | None = None,
        t0: int | None = None,
        commit: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Predict clean latents.

        z: noisy latents (B, T, N_l, D_b); tau, d: (B, T) on the grid; actions: **frame-aligned** leaves
        (B, T, ...) (the action that led to each frame, see :func:`shift_actions`) or None; action_mask
        (B, T) bool; task (B,) long or None (task 0). cache / t0 / commit: streaming, as in
        :meth:`SpaceTimeTransformer.forward`; the temporal window is always ``cfg.context``.
        Returns x̂ (B, T, N_l, D_b) (read as velocity under objective flow_v) and the agent-token outputs
        (B, T, A, width).
        """
        b, t, n, dim = z.shape
        x = self.tokens(z, tau, d, actions, action_mask, task)
        h = self.backbone(x, self.spatial_mask, self.cfg.context, cache, t0, commit)
        out = self.head(h[:, :, self.layout["spatial"]]).reshape(b, t, n, dim)
        return out, h[:, :, self.layout["agent"]]

    def new_cache(self, batch: int) -> KVCache:
        """A bounded KV cache holding the last ``cfg.context − 1`` frames (constant memory)."""
        return self.backbone.new_cache(batch, self.cfg.context)


# ---------------------------------------------------------------------------------------------------
# Training


def _model_fn(model: DynamicsModel) -> flow.ModelFn:
    """The model as a flow model function; conditioning comes in as keyword arguments (sliced by flow)."""

    def fn(z, tau, d, actions=None, action_mask=None, task=None):
        return model(z, tau, d, actions, action_mask, task)[0]

    return fn


def _single_frames(latents: Tensor, task: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(b, T, N, D) items → (b·T, 1, N, D) independent single frames (every frame of the item is used)."""
    b, t = latents.shape[:2]
    single = latents.reshape(b * t, 1, *latents.shape[2:])
    return single, None if task is None else task.repeat_interleave(t)


def dynamics_loss(
    model: DynamicsModel,
    latents: Tensor,
    actions: Actions,
    action_mask: Tensor | None,
    cfg: DynamicsConfig,
    generator: torch.Generator | None = None,
    task: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dynamics objective on clean latents (B, T, N, D) with dataset-aligned actions (B, T, ...).

    A share ``cfg.single_frame_fraction`` of the items (stochastically rounded) becomes single frames: each
    of their T frames is an independent 1-frame sequence with no incoming action (the model learns to
    generate a first frame); the rest keep their T frames with temporal window ``cfg.context``. Splitting
    the batch costs no extra tokens (a masked time attention would). Per-frame (τ, d) come from
    :func:`flow.sample_tau_d` (bootstrap rows only for ``objective='shortcut'``) and the loss from
    :func:`flow.objective_loss`. The two parts are weighted by item count (each item's loss is the mean
    over its frames). Returns (loss, terms).
    """
    b, t = latents.shape[:2]
    # Under data-parallel training this batch is rows [start, stop) of a global batch (else all of it):
    # every draw below is made for the global batch and cut to these rows, so each process sees the
    # single-process numbers for its rows (worldflow.distributed.rows_of).
    rows = rows_of(b)
    g_single = 0  # single-frame items of the global batch: its first g_single rows
    if t > 1 and cfg.single_frame_fraction > 0:
        u = rng.rand((), generator).item()
        g_single = min(rows.total, int(math.floor(rows.total * cfg.single_frame_fraction + u)))
    n_single = min(max(g_single - rows.start, 0), b)  # ... of which this batch holds its first n_single
    prev_actions, prev_mask = shift_actions(actions, action_mask)
    parts = []  # (rows of the part's global batch, items here, name, z1, actions, mask, task)
    if g_single:
        z, tk = _single_frames(latents[:n_single], None if task is None else task[:n_single])
        parts.append((rows.within(0, g_single).repeat(t), n_single, "single", z, None, None, tk))
    if g_single < rows.total:
        sl = slice(n_single, b)
        acts = _tree_map(lambda a: a[sl], prev_actions)
        mask = None if prev_mask is None else prev_mask[sl]
        parts.append((rows.within(g_single, rows.total), b - n_single, "seq", latents[sl], acts, mask,
                      None if task is None else task[sl]))

    fn = _model_fn(model)
    boot_frac = cfg.bootstrap_fraction if cfg.objective == "shortcut" else 0.0
    loss, terms = latents.new_zeros(()), {}
    frames = {"flow": 0, "bootstrap": 0}  # frame counts of each kind, to average the diagnostics
    sums = {"flow": latents.new_zeros(()), "bootstrap": latents.new_zeros(())}
    for part_rows, items, name, z1, acts, mask, tk in parts:
        n = part_rows.total
        tau, d = flow.sample_tau_d(n, z1.shape[1], cfg.k_max, boot_frac, generator, z1.device)
        noise = rng.randn((n, *z1.shape[1:]), generator, z1.device, z1.dtype)
        # half-step passes iff the global part has bootstrap frames: the same model calls in every process
        run_boot = bool(flow.is_bootstrap(d, cfg.k_max).any())
        tau, d, noise = part_rows.take(tau), part_rows.take(d), part_rows.take(noise)
        # a part whose rows all sit in other processes still runs (on zero rows, loss 0) for the same reason
        part, pt = flow.objective_loss(
            cfg.objective, fn, z1, tau, d, cfg.k_max, cfg.ramp_weight, noise, generator, run_boot,
            actions=acts, action_mask=mask, task=tk,
        )  # fmt: skip
        loss = loss + part * (items / b)
        if items:
            terms[f"loss_{name}"] = pt["loss"]
        n_boot = int(flow.is_bootstrap(d, cfg.k_max).sum())
        for key, n in (("flow", tau.numel() - n_boot), ("bootstrap", n_boot)):
            sums[key] = sums[key] + pt[key] * n
            frames[key] += n
    total = frames["flow"] + frames["bootstrap"]
    terms.update(
        loss=loss.detach(),
        flow=sums["flow"] / max(frames["flow"], 1),
        bootstrap=sums["bootstrap"] / max(frames["bootstrap"], 1),
        bootstrap_frac=torch.tensor(frames["bootstrap"] / total),
        single_frac=torch.tensor(n_single / b),
    )
    return loss, terms


# ---------------------------------------------------------------------------------------------------
# Rollout


class RolloutStream:
    """Autoregressive generation one frame at a time, with a bounded KV cache (or full recompute).

    ``observe`` commits given frames as context; ``imagine`` generates the next frame in K x-space Euler
    steps (``commit=False`` passes over the cache) and then commits it. A committed frame is fed at the
    context level τ_ctx = ``context_signal`` snapped to the K_max grid, corrupted with fresh noise and
    labelled (τ_ctx, d_min) — a label the model saw in training (flow rows). With ``cfg.context_noise``
    False the clean latents are fed, labelled τ = 1 − 1/K_max: the highest level on the training grid (τ = 1
    itself never occurs in training, so its embedding would be untrained).

    With ``use_cache=False`` every pass recomputes the whole committed history with the same window (the
    reference the cached path must match; memory grows with the rollout).
    """

    def __init__(
        self,
        model: DynamicsModel,
        batch: int,
        task: Tensor | None = None,
        context_signal: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        cfg = model.cfg
        self.model, self.batch, self.task, self.generator = model, batch, task, generator
        signal = cfg.context_signal if context_signal is None else context_signal
        self.noisy = cfg.context_noise
        self.tau_ctx = flow.snap_tau(signal, cfg.k_max) if self.noisy else 1.0 - 1.0 / cfg.k_max
        self.d_ctx = 1.0 / cfg.k_max
        self.cache = model.new_cache(batch) if use_cache else None
        self.history: list[tuple[Tensor, Tensor, Tensor, Actions, Tensor | None]] = []
        self.t = 0  # absolute index of the next frame

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, I) noise of ``shape`` (B, ...) for corrupting and sampling (subclasses may draw per row)."""
        return rng.randn(shape, self.generator, self.device, dtype)

    def _per_frame(self, value: float, frames: int) -> Tensor:
        return torch.full((self.batch, frames), value, device=self.device)

    def _run(self, z: Tensor, tau: Tensor, d: Tensor, acts: Actions, mask: Tensor | None, commit: bool):
        """Model outputs (x̂, agent) for the new frames z (B, T', N, D) after everything committed so far."""
        if self.cache is not None:
            return self.model(z, tau, d, acts, mask, self.task, self.cache, self.t, commit)
        new = (z, tau, d, acts, mask)
        seq = self.history + [new]
        cat = lambda i: torch.cat([h[i] for h in seq], dim=1)
        all_acts = None if acts is None else _cat_actions([h[3] for h in seq])
        all_mask = None if acts is None else cat(4)
        x, agent = self.model(cat(0), cat(1), cat(2), all_acts, all_mask, self.task)
        if commit:
            self.history.append(new)
        n = z.shape[1]
        return x[:, -n:], agent[:, -n:]

    def observe(self, latents: Tensor, actions: Actions = None, action_mask: Tensor | None = None) -> Tensor:
        """Commit clean latents (B, T', N, D) as context; actions frame-aligned (B, T', ...) or None.

        Returns the agent-token outputs (B, T', A, width) of the committed frames.
        """
        n = latents.shape[1]
        tau = self._per_frame(self.tau_ctx, n)
        if self.noisy:
            latents = flow.corrupt(latents, self.noise(latents.shape, latents.dtype), tau)
        if actions is not None and action_mask is None:
            action_mask = torch.ones(self.batch, n, dtype=torch.bool, device=self.device)
        _, agent = self._run(latents, tau, self._per_frame(self.d_ctx, n), actions, action_mask, commit=True)
        self.t += n
        return agent

    def imagine(self, steps: int, actions: Actions = None, action_mask: Tensor | None = None):
        """Generate and commit the next frame; actions frame-aligned (B, 1, ...) (the action leading to it).

        Returns (latents (B, 1, N, D), agent-token outputs (B, 1, A, width) of its commit pass).
        """
        m = self.model
        shape = (self.batch, 1, m.latent_tokens, m.latent_dim)
        if actions is not None and action_mask is None:
            action_mask = torch.ones(self.batch, 1, dtype=torch.bool, device=self.device)

        def fn(z, tau, d):
            return self._run(z, tau, d, actions, action_mask, commit=False)[0]

        fn = flow.as_x_prediction(fn, flow.prediction_of(m.cfg.objective))
        z = flow.denoise(fn, self.noise(shape), steps, m.cfg.k_max)
        return z, self.observe(z, actions, action_mask)


def _cat_actions(items: list[Actions]) -> Actions:
    first = items[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_actions([it[i] for it in items]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat_actions([it[k] for it in items]) for k in first}
    return torch.cat(items, dim=1)


@torch.no_grad()
def rollout(
    model: DynamicsModel,
    context_latents: Tensor,
    actions: Actions,
    horizon: int,
    steps: int | None = None,
    context_signal: float | None = None,
    generator: torch.Generator | None = None,
    action_mask: Tensor | None = None,
    task: Tensor | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Generate ``horizon`` frames after C context frames; returns latents (B, H, N, D).

    context_latents (B, C, N, D) (C may be 0); actions **dataset-aligned** (B, C+H, ...) or None: action t is
    taken at frame t, so generated frame C+h is conditioned on action C+h−1 (the last action is unused);
    action_mask (B, C+H) or None. steps K (default ``cfg.steps``) is a power of two ≤ K_max; context level
    as in :class:`RolloutStream`. ``use_cache=False`` is the full-recompute reference path.
    """
    cfg = model.cfg
    steps = cfg.steps if steps is None else steps
    flow.check_steps(steps, cfg.k_max)
    b, c = context_latents.shape[:2]
    stream = RolloutStream(model, b, task, context_signal, generator, use_cache)
    prev_actions, prev_mask = shift_actions(actions, action_mask)
    frame_actions = lambda lo, hi: (
        _tree_map(lambda a: a[:, lo:hi], prev_actions),
        None if prev_mask is None else prev_mask[:, lo:hi],
    )
    if c:
        stream.observe(context_latents, *frame_actions(0, c))
    out = []
    for h in range(horizon):
        z, _ = stream.imagine(steps, *frame_actions(c + h, c + h + 1))
        out.append(z)
    if not out:
        return context_latents.new_zeros(b, 0, *context_latents.shape[2:])
    return torch.cat(out, dim=1)
