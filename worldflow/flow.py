"""Flow maths of Dreamer 4 eq. 5–8: conventions, the discrete (τ, d) grid, shortcut forcing, samplers.

Conventions (Dreamer 4; SD3/MeanFlow use the opposite sign):

- signal level τ ∈ [0, 1]: **τ = 0 is pure noise, τ = 1 is clean data**;
- corruption z̃ = (1 − τ)·z0 + τ·z1 with z0 ~ N(0, I) and z1 the clean latents; velocity v = z1 − z0;
- x-prediction: the network outputs ẑ1 = f(z̃, τ, d); its velocity is v̂ = (ẑ1 − z̃)/(1 − τ), so
  ‖ẑ1 − z1‖² = (1 − τ)²·‖v̂ − v‖²;
- x-space Euler step z ← z + d·(ẑ1 − z)/(1 − τ), which lands exactly on ẑ1 when τ = 1 − d.

τ and d are discrete: d ∈ {1, 1/2, …, 1/K_max} and τ ∈ {0, d, …, 1 − d}. Every value is a dyadic rational,
exact in floating point, so grid membership is tested with ``==`` and indices are recovered exactly by
:func:`tau_index` / :func:`step_index`.

Shapes: ``tau`` and ``d`` have the leading (batch, time) shape of the latents — (B, T) for latents
(B, T, ...). A *model function* is ``model_fn(z, tau, d, **cond) -> out`` with ``out`` shaped like ``z``;
conditioning tensors in ``cond`` are batch-first and are sliced together with ``z`` when a loss runs a pass
on a subset of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from worldflow import rng
from worldflow.errors import InputError

ModelFn = Callable[..., Tensor]

EPS = 1e-6  # guard for 1 − τ; the grid already guarantees 1 − τ ≥ d ≥ 1/K_max
OBJECTIVES = ("shortcut", "flow_x", "flow_v")


# ---------------------------------------------------------------------------------------------------
# Conventions


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """View a per-frame tensor (B, T) so it broadcasts against ``like`` (B, T, ...); floats take its dtype."""
    t = t.reshape(t.shape + (1,) * (like.dim() - t.dim()))
    return t if t.dtype == torch.bool else t.to(like.dtype)


def corrupt(z1: Tensor, z0: Tensor, tau: Tensor) -> Tensor:
    """z̃ = (1 − τ)·z0 + τ·z1.  z1, z0: (B, T, ...); tau: (B, T). τ = 0 gives noise, τ = 1 clean data."""
    t = _bcast(tau, z1)
    return (1 - t) * z0 + t * z1


def x_to_v(x_hat: Tensor, z_t: Tensor, tau: Tensor) -> Tensor:
    """Velocity of an x-prediction: v̂ = (ẑ1 − z̃)/(1 − τ).  x_hat, z_t: (B, T, ...); tau: (B, T)."""
    return (x_hat - z_t) / (1 - _bcast(tau, z_t)).clamp_min(EPS)


def v_to_x(v_hat: Tensor, z_t: Tensor, tau: Tensor) -> Tensor:
    """Clean latents implied by a velocity: ẑ1 = z̃ + (1 − τ)·v̂ (the inverse of :func:`x_to_v`)."""
    return z_t + (1 - _bcast(tau, z_t)) * v_hat


def euler_step(z: Tensor, x_hat: Tensor, tau: Tensor, d: Tensor) -> Tensor:
    """x-space Euler step z ← z + d·(ẑ1 − z)/(1 − τ), from level τ to τ + d.

    z, x_hat: (B, T, ...); tau, d: (B, T). The step fraction r = d/(1 − τ) is clamped to 1 so a step never
    overshoots; when r = 1 (the last step, τ = 1 − d) the result is ``x_hat`` bit for bit — computing
    ``z + (x_hat − z)`` would round.
    """
    r = (_bcast(d, z) / (1 - _bcast(tau, z)).clamp_min(EPS)).clamp(max=1.0)
    return torch.where(r >= 1, x_hat, z + r * (x_hat - z))


def ramp_weight(tau: Tensor, ramp: bool = True) -> Tensor:
    """Loss weight w(τ) = 0.9·τ + 0.1 (Dreamer 4): noisier frames carry less signal, weigh them less."""
    return 0.9 * tau + 0.1 if ramp else torch.ones_like(tau)


# ---------------------------------------------------------------------------------------------------
# The discrete grid


def check_k_max(k_max: int) -> int:
    """Return log2(K_max); K_max must be a power of two ≥ 1."""
    if k_max < 1 or k_max & (k_max - 1):
        raise ValueError(f"k_max must be a power of two >= 1, got {k_max}")
    return k_max.bit_length() - 1


def check_steps(steps: int, k_max: int | None = None, flag: str | None = None) -> None:
    """Sampling steps K must be a power of two (so d = 1/K is on the grid) and at most K_max.

    InputError (a ValueError); with ``flag`` (the CLI's ``--steps``) the message names the flag."""
    check_k_max(steps)
    if k_max is not None and steps > k_max:
        if flag:
            raise InputError(f"{flag} {steps} is finer than the model was trained for (k_max = {k_max}, the "
                             f"smallest step 1/{k_max}): use {flag} {k_max} or less")
        raise InputError(f"steps K={steps} exceeds k_max={k_max}: d=1/K is not on the trained grid")


def tau_index(tau: Tensor, k_max: int) -> Tensor:
    """Integer index of τ on the finest grid: τ·K_max ∈ {0, …, K_max − 1} (int64, exact for dyadic τ)."""
    return torch.round(tau * k_max).long()


def step_index(d: Tensor) -> Tensor:
    """Integer log2 step index: −log2(d) ∈ {0, …, log2 K_max} (0 ↔ d = 1, log2 K_max ↔ d = d_min)."""
    return torch.round(-torch.log2(d)).long()


def snap_tau(value: float, k_max: int) -> float:
    """Nearest level on the finest grid {0, 1/K_max, …, 1 − 1/K_max} (used for the context level τ_ctx)."""
    return min(max(round(value * k_max), 0), k_max - 1) / k_max


def context_level(signal: float, k_max: int, noisy: bool = True) -> float:
    """τ_ctx, the level a rollout labels its context frames with: ``signal`` snapped to the grid when the
    context is corrupted (Dreamer 4's context noise), else the cleanest level 1 − 1/K_max."""
    return snap_tau(signal, k_max) if noisy else 1.0 - 1.0 / k_max


def is_bootstrap(d: Tensor, k_max: int) -> Tensor:
    """Frames trained with the bootstrap (self-consistency) term: d > d_min = 1/K_max.  (B, T) bool."""
    return d > 1.0 / k_max


def sample_tau_d(
    batch: int,
    frames: int,
    k_max: int,
    bootstrap_fraction: float = 0.25,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw per-frame (τ, d), each (batch, frames) float32, on the discrete grid (diffusion forcing).

    Dreamer 4: d ~ 1/U{1, 2, 4, …, K_max}, τ ~ U on d's grid {0, d, …, 1 − d}. Rows are of two kinds:
    *flow rows* use d = d_min = 1/K_max; *bootstrap rows* (a share ``bootstrap_fraction`` of the rows, the
    Shortcut Models k = 1/4) draw, per frame, d = 2^-e with e ~ U{0, …, log2 K_max − 1}, i.e. the
    d > d_min values {1, 1/2, …, 2/K_max}, uniform over the exponent. The number of bootstrap rows is
    stochastically rounded (expectation exactly batch·fraction) and the rows are placed at random.
    Everything is drawn as integers and divided by powers of two, so values are exact.
    """
    e_max = check_k_max(k_max)
    if device is None and generator is not None:
        device = generator.device  # no device given: everything where the generator lives
    n_boot = 0
    if e_max > 0 and bootstrap_fraction > 0:
        u = rng.rand((), generator).item()
        n_boot = min(batch, int(math.floor(batch * bootstrap_fraction + u)))
    boot_rows = torch.zeros(batch, dtype=torch.bool, device=device)
    boot_rows[rng.randperm(batch, generator, device)[:n_boot]] = True

    # exponent e: d = 2^-e.  Flow rows: e = e_max.  Bootstrap rows: e ~ U{0, …, e_max − 1}.
    e_boot = rng.randint(max(e_max, 1), (batch, frames), generator, device)
    e = torch.where(boot_rows[:, None], e_boot, torch.full_like(e_boot, e_max))
    n_levels = torch.ones_like(e) << e  # 1/d levels on d's grid
    i = (rng.rand((batch, frames), generator, device) * n_levels).long().clamp_max(n_levels - 1)  # τ = i·d
    d = torch.ldexp(torch.ones_like(e, dtype=torch.float32), -e)
    return i.float() * d, d


def context_prefix(
    tau: Tensor,
    d: Tensor,
    tau_ctx: float,
    k_max: int,
    fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Give a share ``fraction`` of the rows the sampler's label pattern: a context prefix at (τ_ctx, d_min).

    tau, d: (B, T) from :func:`sample_tau_d`. In each chosen row (stochastically rounded count, placed at
    random) the first j frames, j ~ U{1, …, T − 1}, become (τ_ctx, d_min) — exactly how an autoregressive
    rollout labels the frames it conditions on — and the frames from j on keep their draws, so a bootstrap
    row becomes d_min context followed by d > d_min frames, as at inference. Without this, independent
    per-frame levels almost never put every earlier frame near clean (with τ ~ U, all of 7 frames above 0.9
    has probability 10⁻⁷) and the sampler's pattern is one the model never trained on. Returns new
    (tau, d); the draws are exact grid values.
    """
    b, t = tau.shape
    if t < 2 or fraction <= 0 or b == 0:
        return tau, d
    u = rng.rand((), generator).item()
    n = min(b, int(math.floor(b * fraction + u)))
    chosen = torch.zeros(b, dtype=torch.bool, device=tau.device)
    chosen[rng.randperm(b, generator, tau.device)[:n]] = True
    j = 1 + rng.randint(t - 1, (b,), generator, tau.device)  # prefix length in {1, …, T − 1}
    prefix = chosen[:, None] & (torch.arange(t, device=tau.device)[None, :] < j[:, None])
    return (torch.where(prefix, torch.full_like(tau, tau_ctx), tau),
            torch.where(prefix, torch.full_like(d, 1.0 / k_max), d))


# ---------------------------------------------------------------------------------------------------
# Objectives


def _slice_cond(value: Any, rows: Tensor) -> Any:
    """Select batch rows of a conditioning value (tensor, or tuple/list/dict of them; others pass)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        return value[rows]
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_cond(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _slice_cond(v, rows) for k, v in value.items()}
    return value


def _frame_mse(a: Tensor, b: Tensor) -> Tensor:
    """Squared error averaged over the feature dims of each frame: (B, T, ...) → (B, T)."""
    return (a - b).pow(2).flatten(2).mean(-1)


def _noise(z1: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    return noise if noise is not None else rng.randn(z1.shape, generator, z1.device, z1.dtype)


@torch.no_grad()
def bootstrap_target(model_fn: ModelFn, z_t: Tensor, tau: Tensor, d: Tensor, boot: Tensor, **cond) -> Tensor:
    """Velocity target sg((b' + b'')/2) of two half steps, run on whole sequences without gradients.

    z_t: (B, T, ...); tau, d, boot: (B, T). Frames with ``boot`` False keep their (z̃, τ, d) and act as
    context only (their target is not used). Returns (B, T, ...)::

        b'  = (f(z̃, τ, d/2) − z̃) / (1 − τ)
        z'  = z̃ + b'·d/2
        b'' = (f(z', τ + d/2, d/2) − z') / (1 − (τ + d/2))
    """
    half = torch.where(boot, d / 2, d)
    b1 = x_to_v(model_fn(z_t, tau, half, **cond), z_t, tau)
    z_mid = torch.where(_bcast(boot, z_t), z_t + b1 * _bcast(half, z_t), z_t)
    tau_mid = torch.where(boot, tau + half, tau)
    b2 = x_to_v(model_fn(z_mid, tau_mid, half, **cond), z_mid, tau_mid)
    return (b1 + b2) / 2


def shortcut_forcing_loss(
    model_fn: ModelFn,
    z1: Tensor,
    tau: Tensor,
    d: Tensor,
    k_max: int,
    ramp: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    run_bootstrap: bool | None = None,
    target_fn: ModelFn | None = None,
    **cond,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Shortcut forcing with x-prediction (Dreamer 4 eq. 6–8).

    z1: clean latents (B, T, ...); tau, d: (B, T) on the grid (see :func:`sample_tau_d`); noise z0 like z1
    (drawn from ``generator`` when None). ``model_fn(z, tau, d, **cond)`` returns ẑ1 shaped like z.
    Per frame::

        loss_t = w(τ)·‖ẑ1 − z1‖²                                    d = d_min   (flow term, x-space)
               = w(τ)·(1 − τ)²·‖(ẑ1 − z̃)/(1 − τ) − sg(b' + b'')/2‖²   d > d_min   (bootstrap, v-space)

    ‖·‖² is the mean over a frame's feature dims; the loss is the mean of loss_t over all B·T frames.
    The half-step passes run only when there are bootstrap frames, only on the rows that contain them;
    ``run_bootstrap`` overrides the "when" (True: run them even on zero rows). A data-parallel caller
    whose batch is a slice of a global batch passes the global batch's answer, so every process makes the
    same model calls (FSDP2 gathers parameters per call). An empty batch gives a zero loss, not NaN.
    Returns (loss, terms) with detached diagnostics: ``flow`` and ``bootstrap`` (mean weighted term over
    frames of that kind, 0 if none) and ``bootstrap_frac``. ``target_fn`` (default ``model_fn``) computes
    the two half steps of the bootstrap target, e.g. the model with its EMA weights (Shortcut Models).
    """
    z0 = _noise(z1, noise, generator)
    z_t = corrupt(z1, z0, tau)
    x_hat = model_fn(z_t, tau, d, **cond)
    w = ramp_weight(tau, ramp)
    boot = is_bootstrap(d, k_max)

    per_frame = w * _frame_mse(x_hat, z1)
    if boot.any() if run_bootstrap is None else run_bootstrap:
        rows = boot.any(dim=1).nonzero().squeeze(1)
        zr, tr, dr, br = z_t[rows], tau[rows], d[rows], boot[rows]
        target = bootstrap_target(target_fn or model_fn, zr, tr, dr, br, **_slice_cond(cond, rows))
        v_hat = x_to_v(x_hat[rows], zr, tr)
        boot_term = w[rows] * (1 - tr) ** 2 * _frame_mse(v_hat, target)
        per_frame = per_frame.index_put((rows,), torch.where(br, boot_term, per_frame[rows]))
    loss = per_frame.mean() if per_frame.numel() else per_frame.sum()
    return loss, _terms(loss, per_frame, boot)


def _terms(loss: Tensor, per_frame: Tensor, boot: Tensor) -> dict[str, Tensor]:
    pf, n_b = per_frame.detach(), boot.sum()
    n_f = boot.numel() - n_b
    zero = pf.new_zeros(())
    return {
        "loss": loss.detach(),
        "flow": pf[~boot].sum() / n_f if n_f > 0 else zero,
        "bootstrap": pf[boot].sum() / n_b if n_b > 0 else zero,
        "bootstrap_frac": n_b.float() / boot.numel(),
    }


def flow_loss(
    model_fn: ModelFn,
    z1: Tensor,
    tau: Tensor,
    k_max: int,
    prediction: str = "x",
    ramp: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    **cond,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain flow matching (ablation baselines), the network always fed d = d_min.

    ``prediction='x'``: the output is ẑ1 and the loss is w(τ)·‖ẑ1 − z1‖² (= the shortcut flow term).
    ``prediction='v'``: the *same* output head is read as a velocity v̂ and the loss is w(τ)·‖v̂ − v‖²
    with v = z1 − z0 (the "v-pred" baseline of Dreamer 4); samplers convert it with :func:`v_to_x`
    (see :func:`as_x_prediction`). Reduction as in :func:`shortcut_forcing_loss`.
    """
    if prediction not in ("x", "v"):
        raise ValueError(f"prediction must be 'x' or 'v', got {prediction!r}")
    z0 = _noise(z1, noise, generator)
    z_t = corrupt(z1, z0, tau)
    d = torch.full_like(tau, 1.0 / k_max)
    out = model_fn(z_t, tau, d, **cond)
    target = z1 if prediction == "x" else z1 - z0
    per_frame = ramp_weight(tau, ramp) * _frame_mse(out, target)
    loss = per_frame.mean() if per_frame.numel() else per_frame.sum()
    return loss, _terms(loss, per_frame, torch.zeros_like(tau, dtype=torch.bool))


def prediction_of(objective: str) -> str:
    """What the network output means under an objective: 'x' (clean latents) or 'v' (velocity)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    return "v" if objective == "flow_v" else "x"


def objective_loss(
    objective: str,
    model_fn: ModelFn,
    z1: Tensor,
    tau: Tensor,
    d: Tensor,
    k_max: int,
    ramp: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    run_bootstrap: bool | None = None,
    target_fn: ModelFn | None = None,
    **cond,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on ``objective`` (shortcut | flow_x | flow_v); flow objectives ignore ``d`` (use d_min),
    ``run_bootstrap`` and ``target_fn`` (see :func:`shortcut_forcing_loss`)."""
    if objective == "shortcut":
        return shortcut_forcing_loss(model_fn, z1, tau, d, k_max, ramp, noise, generator, run_bootstrap,
                                     target_fn, **cond)
    return flow_loss(model_fn, z1, tau, k_max, prediction_of(objective), ramp, noise, generator, **cond)


def as_x_prediction(model_fn: ModelFn, prediction: str) -> ModelFn:
    """Wrap a model function so it always returns ẑ1 (converting a velocity output with v_to_x)."""
    if prediction == "x":
        return model_fn
    if prediction != "v":
        raise ValueError(f"prediction must be 'x' or 'v', got {prediction!r}")
    return lambda z, tau, d, **cond: v_to_x(model_fn(z, tau, d, **cond), z, tau)


def as_sampler_fn(model_fn: ModelFn, objective: str, k_max: int) -> ModelFn:
    """A trained model as the samplers call it: returns ẑ1 and sees only step labels it was trained with.

    A shortcut model is conditioned on the step it takes (d = 1/K). A plain flow model (flow_x, flow_v)
    only ever saw d = d_min in training (:func:`flow_loss`), so it gets d_min whatever the step size;
    feeding it d = 1/K would hand it an embedding that never trained.
    """
    fn = as_x_prediction(model_fn, prediction_of(objective))
    if objective == "shortcut":
        return fn
    return lambda z, tau, d, **cond: fn(z, tau, torch.full_like(d, 1.0 / k_max), **cond)


# ---------------------------------------------------------------------------------------------------
# Sampling


SAMPLERS = ("euler", "heun")


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")


def network_evaluations(steps: int, sampler: str = "euler") -> int:
    """Model calls to denoise one frame: K for Euler, 2K − 1 for Heun (its last step is an Euler step)."""
    check_sampler(sampler)
    return steps if sampler == "euler" else 2 * steps - 1


def denoise(
    model_fn: ModelFn, z: Tensor, steps: int, k_max: int | None = None, lead: int = 2,
    sampler: str = "euler", **cond,
) -> Tensor:
    """K steps from pure noise ``z`` (τ = 0) to clean latents (τ = 1), d = 1/K.

    z: noise with ``lead`` leading per-frame dims, e.g. (B, T, ...) for lead=2 — a whole sequence at a
    common level, or (B, 1, ...) for one frame of an autoregressive rollout whose ``model_fn`` closes over
    the KV cache. Step k feeds τ = k/K; the last step (τ = 1 − d) returns ẑ1 exactly. Returns z's shape.

    ``sampler``: ``euler`` (x-space Euler, one call a step) or ``heun`` (Heun's second-order method on
    the velocity v = (ẑ1 − z)/(1 − τ): an Euler predictor to τ + d, the velocity there, and the average
    of the two slopes; 2 calls a step). Heun's last step is the Euler step: its corrector would need the
    velocity at τ = 1, where 1 − τ = 0 (as in Karras et al. 2022, Alg. 1). So K Heun steps cost 2K − 1
    calls (:func:`network_evaluations`).
    """
    check_steps(steps, k_max)
    check_sampler(sampler)
    per_frame = z.shape[:lead]
    d = torch.full(per_frame, 1.0 / steps, device=z.device)
    for k in range(steps):
        tau = torch.full(per_frame, k / steps, device=z.device)
        x_hat = model_fn(z, tau, d, **cond)
        if sampler == "euler" or k == steps - 1:
            z = euler_step(z, x_hat, tau, d)
            continue
        v1 = x_to_v(x_hat, z, tau)
        z_pred = z + _bcast(d, z) * v1
        v2 = x_to_v(model_fn(z_pred, tau + d, d, **cond), z_pred, tau + d)
        z = z + _bcast(d, z) * (v1 + v2) / 2
    return z


def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | None = None,
    k_max: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    lead: int = 2,
    sampler: str = "euler",
    **cond,
) -> Tensor:
    """Draw z0 ~ N(0, I) of ``shape`` and :func:`denoise` it in ``steps`` steps; returns ``shape``."""
    z = rng.randn(shape, generator, device, dtype)
    return denoise(model_fn, z, steps, k_max, lead, sampler, **cond)
