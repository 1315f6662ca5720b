"""Autoregressive generation one frame at a time: :class:`RolloutStream`, :func:`rollout_stream` (an
iterator over frames, constant memory for any horizon) and :func:`rollout` (all frames at once)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from worldflow import flow, rng
from worldflow.dynamics.actions import Actions, cat_actions, tree_map
from worldflow.dynamics.model import DynamicsModel

# ---------------------------------------------------------------------------------------------------
# Rollout


class RolloutStream:
    """Autoregressive generation one frame at a time, with a bounded KV cache (or full recompute).

    ``observe`` commits given frames as context; ``imagine`` generates the next frame in K steps of the
    model's ``cfg.sampler`` (``commit=False`` passes over the cache; :func:`flow.denoise`) and then
    commits it. A committed frame is fed at the
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
        self.tau_ctx = flow.context_level(signal, cfg.k_max, self.noisy)
        self.d_ctx = 1.0 / cfg.k_max
        self.cache = model.new_cache(batch) if use_cache else None
        self.history: list[tuple[Tensor, Tensor, Tensor, Actions, Tensor | None]] = []
        # a generated frame whose commit pass is deferred into the next call (``imagine(defer_commit=True)``)
        self.pending: tuple[Tensor, Tensor, Tensor, Actions, Tensor | None] | None = None
        self.t = 0  # absolute index of the next frame
        # when set (e.g. 2K), imagine() also denoises each frame's noise at this many steps and keeps the
        # per-row mean squared latent difference in last_disagreement (B,): a hallucination signal
        self.check_steps: int | None = None
        self.last_disagreement: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, I) noise of ``shape`` (B, ...) for corrupting and sampling (subclasses may draw per row)."""
        return rng.randn(shape, self.generator, self.device, dtype)

    def _per_frame(self, value: float, frames: int) -> Tensor:
        return torch.full((self.batch, frames), value, device=self.device)

    def _run(self, z: Tensor, tau: Tensor, d: Tensor, acts: Actions, mask: Tensor | None, commit: bool):
        """Model outputs (x̂, agent) for the new frames z (B, T', N, D) after everything committed so far.

        A pending frame (a deferred commit pass) rides along in front of the new frames: one call
        instead of two, committing it (and the new frames if ``commit``); the new frames attend to it
        exactly as they would after a separate commit pass; its own outputs are not read, so the call
        computes only the new frames' (``outputs``).
        """
        if self.pending is not None and (self.pending[3] is None) != (acts is None):
            self.flush()  # cannot share a call (one labelled, one not): commit it on its own
        if self.cache is not None and self.pending is not None:
            p, n = self.pending, z.shape[1]
            self.pending = None
            cat = lambda a, b: torch.cat((a, b), dim=1)
            labelled = acts is not None
            both = (cat(p[0], z), cat(p[1], tau), cat(p[2], d),
                    cat_actions([p[3], acts]) if labelled else None, cat(p[4], mask) if labelled else None)
            x, agent = self.model(*both, self.task, self.cache, self.t, True if commit else 1, outputs=n)
            self.t += 1
            return x, agent
        if self.cache is not None:
            return self.model(z, tau, d, acts, mask, self.task, self.cache, self.t, commit)
        new = (z, tau, d, acts, mask)
        seq = self.history + [new]
        cat = lambda i: torch.cat([h[i] for h in seq], dim=1)
        all_acts = None if acts is None else cat_actions([h[3] for h in seq])
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
        latents, tau, d, actions, action_mask = self._context_inputs(latents, actions, action_mask)
        _, agent = self._run(latents, tau, d, actions, action_mask, commit=True)
        self.t += latents.shape[1]
        return agent

    def _context_inputs(self, latents: Tensor, actions: Actions, action_mask: Tensor | None):
        """The inputs of a commit pass: latents corrupted to τ_ctx (fresh noise), labels (τ_ctx, d_min)."""
        n = latents.shape[1]
        tau = self._per_frame(self.tau_ctx, n)
        if self.noisy:
            latents = flow.corrupt(latents, self.noise(latents.shape, latents.dtype), tau)
        if actions is not None and action_mask is None:
            action_mask = torch.ones(self.batch, n, dtype=torch.bool, device=self.device)
        return latents, tau, self._per_frame(self.d_ctx, n), actions, action_mask

    def flush(self) -> Tensor | None:
        """Run a deferred commit pass now; returns its agent-token outputs (B, 1, A, width), or None if
        nothing was pending."""
        if self.pending is None:
            return None
        p, self.pending = self.pending, None
        _, agent = self._run(*p, commit=True)
        self.t += 1
        return agent

    def imagine(self, steps: int, actions: Actions = None, action_mask: Tensor | None = None,
                defer_commit: bool = False):
        """Generate and commit the next frame; actions frame-aligned (B, 1, ...) (the action leading to it).

        Returns (latents (B, 1, N, D), agent-token outputs (B, 1, A, width) of its commit pass).
        ``defer_commit``: the commit pass runs inside the next call (the next frame's first denoising
        pass, or :meth:`observe` / :meth:`flush`), saving one model call per frame; the agent outputs are
        then not computed here (None). The random draws and the results are those of the plain path.
        """
        m = self.model
        shape = (self.batch, 1, m.latent_tokens, m.latent_dim)
        if actions is not None and action_mask is None:
            action_mask = torch.ones(self.batch, 1, dtype=torch.bool, device=self.device)

        def fn(z, tau, d):
            return self._run(z, tau, d, actions, action_mask, commit=False)[0]

        fn = flow.as_sampler_fn(fn, m.cfg.objective, m.cfg.k_max)
        z0 = self.noise(shape)
        z = flow.denoise(fn, z0, steps, m.cfg.k_max, sampler=m.cfg.sampler)
        if self.check_steps:  # the same noise denoised at K' steps: disagreement flags a doubtful frame
            z_check = flow.denoise(fn, z0, self.check_steps, m.cfg.k_max, sampler=m.cfg.sampler)
            self.last_disagreement = (z - z_check).pow(2).flatten(1).mean(1)  # (B,)
        if defer_commit and self.cache is not None:
            self.pending = self._context_inputs(z, actions, action_mask)  # noise drawn now, as observe would
            return z, None
        return z, self.observe(z, actions, action_mask)


def _leaf(actions: Actions) -> Tensor:
    """The first tensor of an action pytree (its leading dims are the pytree's (B, T))."""
    while isinstance(actions, (tuple, list, dict)):
        actions = next(iter(actions.values())) if isinstance(actions, dict) else actions[0]
    return actions


def action_window(actions: Actions, action_mask: Tensor | None, lo: int, hi: int
                  ) -> tuple[Actions, Tensor | None]:
    """Dataset actions ``lo .. hi-1`` of ``actions`` (B, T_a, ...) with their mask (B, hi - lo).

    Indices outside [0, T_a) get a zero action with mask False: before the first frame there is no
    action, and past the end of a clip the action is unknown (the unlabeled path). ``actions`` None gives
    (None, None); ``action_mask`` None means every given action is real.
    """
    if actions is None:
        return None, None
    leaf = _leaf(actions)
    b, t_a = leaf.shape[:2]
    mask = action_mask if action_mask is not None else leaf.new_ones(b, t_a, dtype=torch.bool)
    a, z = max(lo, 0), min(hi, t_a)
    before, after = a - lo, hi - max(z, a)

    def pad(x: Tensor) -> Tensor:
        inside = x[:, a:z] if z > a else x[:, :0]
        parts = [x.new_zeros((b, before, *x.shape[2:])), inside, x.new_zeros((b, after, *x.shape[2:]))]
        return torch.cat(parts, dim=1)

    return tree_map(pad, actions), pad(mask)


def rollout_stream(
    model: DynamicsModel,
    context_latents: Tensor,
    actions: Actions,
    horizon: int | None,
    steps: int | None = None,
    context_signal: float | None = None,
    generator: torch.Generator | None = None,
    action_mask: Tensor | None = None,
    task: Tensor | None = None,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """Generated latents one frame at a time: yields (B, 1, N, D) for each of ``horizon`` frames
    (``horizon`` None: without end).

    Arguments as in :func:`rollout`, except that the dataset-aligned ``actions`` (B, T_a, ...) may have
    any length T_a: a frame whose action lies past T_a gets a masked action (see :func:`action_window`),
    so a long rollout follows a clip's true actions as far as the clip goes and continues without them.
    With the cache (default) memory and time per frame are constant (the window of
    ``cfg.context`` frames); nothing is kept per frame. ``steps`` is checked here, before the first frame.
    """
    cfg = model.cfg
    steps = cfg.steps if steps is None else steps
    flow.check_steps(steps, cfg.k_max)
    return _stream(model, context_latents, actions, action_mask, horizon, steps,
                   RolloutStream(model, context_latents.shape[0], task, context_signal, generator, use_cache))


@torch.no_grad()
def _stream(model: DynamicsModel, context_latents: Tensor, actions: Actions, action_mask: Tensor | None,
            horizon: int | None, steps: int, stream: RolloutStream) -> Iterator[Tensor]:
    c = context_latents.shape[1]
    # frame t carries the action that led to it: dataset action t - 1 (worldflow.dynamics.actions)
    if c:
        stream.observe(context_latents, *action_window(actions, action_mask, -1, c - 1))
    h = 0
    while horizon is None or h < horizon:
        t = c + h
        # open loop: nothing reads a frame's agent outputs, so its commit pass rides with the next frame's
        # first denoising pass (K calls per frame instead of K + 1)
        z, _ = stream.imagine(steps, *action_window(actions, action_mask, t - 1, t), defer_commit=True)
        yield z
        h += 1


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
    taken at frame t, so generated frame C+h is conditioned on action C+h−1 (the last action is unused;
    shorter actions leave the frames past them unlabeled, as in :func:`rollout_stream`); action_mask
    (B, C+H) or None. steps K (default ``cfg.steps``) is a power of two ≤ K_max; context level as in
    :class:`RolloutStream`. ``use_cache=False`` is the full-recompute reference path. This is
    :func:`rollout_stream` collected; a long rollout should consume the stream instead of holding all
    H frames.
    """
    frames = list(rollout_stream(model, context_latents, actions, horizon, steps, context_signal, generator,
                                 action_mask, task, use_cache))
    if not frames:
        b = context_latents.shape[0]
        return context_latents.new_zeros(b, 0, *context_latents.shape[2:])
    return torch.cat(frames, dim=1)
