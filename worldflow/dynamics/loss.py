"""The dynamics objective on clean latent clips: diffusion-forcing (τ, d) per frame, shortcut forcing.

Dreamer 4 eq. 7 with x-prediction; the maths is in :mod:`worldflow.flow`, the batch layout (single-frame
items, data-parallel rows) here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from worldflow import flow, rng
from worldflow.config import DynamicsConfig
from worldflow.distributed import rows_of
from worldflow.dynamics.actions import Actions, shift_actions, tree_map
from worldflow.dynamics.model import DynamicsModel

# ---------------------------------------------------------------------------------------------------
# Training


def _model_fn(model: DynamicsModel, weights: dict[str, Tensor] | None = None) -> flow.ModelFn:
    """The model as a flow model function; conditioning comes in as keyword arguments (sliced by flow).
    ``weights``: run it with these parameters instead (its EMA weights), via torch.func.functional_call."""

    def fn(z, tau, d, actions=None, action_mask=None, task=None):
        if weights is not None:
            return torch.func.functional_call(model, weights, (z, tau, d, actions, action_mask, task))[0]
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
        acts = tree_map(lambda a: a[sl], prev_actions)
        mask = None if prev_mask is None else prev_mask[sl]
        parts.append((rows.within(g_single, rows.total), b - n_single, "seq", latents[sl], acts, mask,
                      None if task is None else task[sl]))

    fn = _model_fn(model)
    # Shortcut Models take the bootstrap targets from the EMA weights (dynamics.ema_targets)
    target_fn = _model_fn(model, model.ema.params()) if cfg.ema_targets and model.ema is not None else None
    boot_frac = cfg.bootstrap_fraction if cfg.objective == "shortcut" else 0.0
    loss, terms = latents.new_zeros(()), {}
    frames = {"flow": 0, "bootstrap": 0}  # frame counts of each kind, to average the diagnostics
    sums = {"flow": latents.new_zeros(()), "bootstrap": latents.new_zeros(())}
    for part_rows, items, name, z1, acts, mask, tk in parts:
        n = part_rows.total
        tau, d = flow.sample_tau_d(n, z1.shape[1], cfg.k_max, boot_frac, generator, z1.device)
        if name == "seq":
            tau, d = flow.context_prefix(
                tau, d, flow.context_level(cfg.context_signal, cfg.k_max, cfg.context_noise), cfg.k_max,
                cfg.context_rows, generator)
        noise = rng.randn((n, *z1.shape[1:]), generator, z1.device, z1.dtype)
        # half-step passes iff the global part has bootstrap frames: the same model calls in every process
        run_boot = bool(flow.is_bootstrap(d, cfg.k_max).any())
        tau, d, noise = part_rows.take(tau), part_rows.take(d), part_rows.take(noise)
        # a part whose rows all sit in other processes still runs (on zero rows, loss 0) for the same reason
        part, pt = flow.objective_loss(
            cfg.objective, fn, z1, tau, d, cfg.k_max, cfg.ramp_weight, noise, generator, run_boot,
            target_fn, actions=acts, action_mask=mask, task=tk,
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
