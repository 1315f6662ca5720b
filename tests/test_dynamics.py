"""Tests for worldflow.dynamics: information flow, action spaces, cached rollouts, memory, training."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from worldflow import flow
from worldflow.config import DynamicsConfig, TransformerConfig
from worldflow.dynamics import (
    ActionEncoder,
    DynamicsModel,
    RolloutStream,
    dynamics_loss,
    rollout,
    shift_actions,
)
from worldflow.errors import InputError

N, D = 4, 3  # latent tokens, latent dim


def tiny_cfg(**kw) -> DynamicsConfig:
    t = TransformerConfig(width=16, depth=2, heads=2, kv_heads=1, temporal_every=2)
    base = dict(transformer=t, registers=1, agent_tokens=2, num_tasks=3, k_max=8, context=3, steps=2)
    base.update(kw)
    return DynamicsConfig(**base)


def tiny_model(space=gym.spaces.Discrete(3), seed=0, **kw) -> DynamicsModel:
    torch.manual_seed(seed)
    return DynamicsModel(tiny_cfg(**kw), N, D, space).eval()


def grid_inputs(b=2, t=5, k_max=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tau, d = flow.sample_tau_d(b, t, k_max, 0.5, generator=g)
    return torch.randn(b, t, N, D, generator=g), tau, d


def test_token_layout_and_small_model():
    m = tiny_model(pack=2)
    assert m.tokens_per_frame == N // 2 + 1 + 1 + 1 + 2
    assert sum(p.numel() for p in m.parameters()) < 1_000_000
    z, tau, d = grid_inputs()
    x_hat, agent = m(z, tau, d)
    assert x_hat.shape == z.shape and agent.shape == (2, 5, 2, 16)
    sm = m.spatial_mask
    agent_cols = sm[:, m.layout["agent"]]
    assert agent_cols[m.layout["agent"]].all() and not agent_cols[: m.layout["agent"].start].any()
    assert sm[m.layout["agent"]].all()


def test_noise_token_uses_grid_indices():
    m = tiny_model()
    z, _, _ = grid_inputs(b=1, t=1)
    seen = {}
    m.tau_embed.register_forward_hook(lambda mod, inp, out: seen.__setitem__("tau", inp[0]))
    m.step_embed.register_forward_hook(lambda mod, inp, out: seen.__setitem__("step", inp[0]))
    m(z, torch.tensor([[0.375]]), torch.tensor([[0.125]]))
    assert seen["tau"].item() == 3 and seen["step"].item() == 3  # τ·K_max, log2(1/d)


def test_causality():
    m = tiny_model()
    z, tau, d = grid_inputs(t=6)
    a = torch.randint(0, 3, (2, 6))
    x_ref, ag_ref = m(z, tau, d, a)
    for k in (1, 3, 5):
        z2, a2, tau2 = z.clone(), a.clone(), tau.clone()
        z2[:, k:] += torch.randn_like(z2[:, k:])
        a2[:, k:] = (a2[:, k:] + 1) % 3
        tau2[:, k:] = 0.0
        x2, ag2 = m(z2, tau2, d, a2)
        torch.testing.assert_close(x2[:, :k], x_ref[:, :k], rtol=0, atol=1e-6)
        torch.testing.assert_close(ag2[:, :k], ag_ref[:, :k], rtol=0, atol=1e-6)
        assert not torch.allclose(x2[:, k:], x_ref[:, k:])


def test_agent_tokens_never_change_predictions():
    m = tiny_model()
    z, tau, d = grid_inputs()
    x_ref, ag_ref = m(z, tau, d, task=torch.tensor([0, 1]))
    x2, ag2 = m(z, tau, d, task=torch.tensor([2, 2]))
    assert torch.equal(x2, x_ref) and not torch.allclose(ag2, ag_ref)  # the task reaches agent outputs only
    with torch.no_grad():
        m.agent_embed.add_(torch.randn_like(m.agent_embed))
        m.task_embed.weight.add_(1.0)
    x3, _ = m(z, tau, d, task=torch.tensor([0, 1]))
    assert torch.equal(x3, x_ref)
    # and agent tokens do see the frame: changing the latents changes their outputs
    _, ag4 = m(z + 1, tau, d, task=torch.tensor([0, 1]))
    assert not torch.allclose(ag4, ag_ref)


SPACES = {
    "box": (gym.spaces.Box(-2.0, 2.0, (3,)), lambda b, t: torch.rand(b, t, 3) * 4 - 2),
    "box_unbounded": (gym.spaces.Box(-np.inf, np.inf, (2, 2)), lambda b, t: torch.randn(b, t, 2, 2)),
    "discrete": (gym.spaces.Discrete(4, start=1), lambda b, t: torch.randint(1, 5, (b, t))),
    "multidiscrete": (gym.spaces.MultiDiscrete([3, 5]), lambda b, t: torch.stack(
        [torch.randint(0, 3, (b, t)), torch.randint(0, 5, (b, t))], -1)),
    "multibinary": (gym.spaces.MultiBinary(4), lambda b, t: torch.randint(0, 2, (b, t, 4))),
    "tuple": (gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Box(0, 1, (1,)))),
              lambda b, t: (torch.randint(0, 2, (b, t)), torch.rand(b, t, 1))),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SPACES))
def test_action_spaces(name):
    space, draw = SPACES[name]
    m = tiny_model(space)
    z, tau, d = grid_inputs(t=4)
    a = draw(2, 4)
    x, _ = m(z, tau, d, a)
    a2 = draw(2, 4)
    x2, _ = m(z, tau, d, a2)
    assert x.shape == z.shape and not torch.allclose(x, x2)  # actions condition the prediction
    # a masked frame is the base embedding alone: the same as no actions at all
    mask = torch.zeros(2, 4, dtype=torch.bool)
    enc = m.action_encoder
    torch.testing.assert_close(enc(a, mask, (2, 4)), enc(None, None, (2, 4)))
    torch.testing.assert_close(m(z, tau, d, a, mask)[0], m(z, tau, d)[0])
    # loss and rollout run with this space
    loss, _ = dynamics_loss(m, z, a, torch.ones(2, 4, dtype=torch.bool), m.cfg, torch.Generator())
    assert torch.isfinite(loss)
    out = rollout(m, z[:, :2], draw(2, 5), 3, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, N, D) and torch.isfinite(out).all()


def test_no_action_space_and_none_actions():
    m = tiny_model(space=None)
    z, tau, d = grid_inputs()
    assert m(z, tau, d)[0].shape == z.shape
    assert rollout(m, z[:, :2], None, 2, steps=1, generator=torch.Generator()).shape == (2, 2, N, D)
    enc = ActionEncoder(gym.spaces.Discrete(3), 8)
    assert torch.equal(enc(None, None, (2, 3)), enc.base.expand(2, 3, 8))


def test_shift_actions_alignment():
    a = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[True, True, True, False]])
    prev, prev_mask = shift_actions(a, mask)
    assert prev[0, 1:].tolist() == [5, 6, 7]  # frame t carries action t−1 (which led to it)
    assert prev_mask.tolist() == [[False, True, True, True]]
    m = tiny_model()
    z, tau, d = grid_inputs(b=1, t=4)
    # dataset action 1 (taken at frame 1) influences frame 2 onwards, never frames 0–1
    x_ref, _ = m(z, tau, d, *shift_actions(a % 3, mask))
    a2 = a.clone()
    a2[0, 1] += 1
    x2, _ = m(z, tau, d, *shift_actions(a2 % 3, mask))
    assert torch.equal(x2[:, :2], x_ref[:, :2]) and not torch.allclose(x2[:, 2], x_ref[:, 2])


@pytest.mark.parametrize("steps", [1, 2, 8])
@pytest.mark.parametrize("context_noise", [True, False])
def test_cached_rollout_equals_full_recompute(steps, context_noise):
    m = tiny_model(context_noise=context_noise)  # window C = 3 frames
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 2, N, D, generator=g)
    acts = torch.randint(0, 3, (2, 2 + 7), generator=g)
    task = torch.tensor([1, 2])
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(1)
        outs.append(rollout(m, ctx, acts, 7, steps, generator=gen, task=task, use_cache=use_cache))
    assert outs[0].shape == (2, 7, N, D)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)  # inside and beyond the window


@pytest.mark.parametrize("context_noise", [True, False])
def test_deferred_commit_equals_plain_stream(context_noise):
    """imagine(defer_commit=True) runs each frame's commit pass inside the next call: the same frames,
    the same random draws and, after flush(), the same cache and agent outputs as the plain path."""
    m = tiny_model(context_noise=context_noise)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 2, N, D, generator=g)
    acts = torch.randint(0, 3, (2, 8), generator=g)
    runs = []
    with torch.no_grad():
        for defer in (False, True):
            s = RolloutStream(m, 2, generator=torch.Generator().manual_seed(3))
            s.observe(ctx, *shift_actions(acts[:, :2], None))
            out = [s.imagine(2, acts[:, t - 1 : t], defer_commit=defer) for t in range(2, 8)]
            agent = s.flush() if defer else out[-1][1]  # the last frame's commit-pass agent outputs
            runs.append((torch.cat([z for z, _ in out], 1), s, agent))
    (z_a, s_a, agent_a), (z_b, s_b, agent_b) = runs
    torch.testing.assert_close(z_a, z_b, rtol=1e-5, atol=1e-5)
    assert s_b.pending is None and s_b.t == s_a.t == 8 and s_b.flush() is None
    assert s_a.generator.initial_seed() == 3 and torch.equal(  # the same number of draws were made
        torch.randn(1, generator=s_a.generator), torch.randn(1, generator=s_b.generator))
    torch.testing.assert_close(agent_a, agent_b, rtol=1e-5, atol=1e-5)
    for layer in range(s_a.cache.layers):
        for ka, kb in zip(s_a.cache.get(layer), s_b.cache.get(layer)):
            torch.testing.assert_close(ka, kb)


def test_rollout_matches_manual_sampling():
    """The first generated frame equals K x-space Euler steps on the model with the context prepended."""
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 2, N, D, generator=g)
    acts = torch.randint(0, 3, (1, 3), generator=g)
    out = rollout(m, ctx, acts, 1, 2, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    tau_ctx = flow.snap_tau(m.cfg.context_signal, 8)
    assert tau_ctx == 7 / 8
    ctx_in = flow.corrupt(ctx, torch.randn(ctx.shape, generator=gen), torch.full((1, 2), tau_ctx))
    z = torch.randn(1, 1, N, D, generator=gen)
    prev, mask = shift_actions(acts, None)
    with torch.no_grad():
        for k in range(2):
            tau = torch.tensor([[tau_ctx, tau_ctx, k / 2]])
            d = torch.tensor([[1 / 8, 1 / 8, 1 / 2]])
            x = m(torch.cat([ctx_in, z], 1), tau, d, prev, mask)[0][:, -1:]
            z = x if k == 1 else z + 0.5 * (x - z) / (1 - k / 2)
    torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-5)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_long_rollout_bounded_memory():
    """10,000 frames with the cache: constant cache tensors and flat RSS (so constant cost per frame).

    softcap 0 puts attention on SDPA, a third of the soft-capped path's per-call cost on these tiny
    tensors; the 10,000-step world-model env test (test_wm_env) runs the soft-capped default path."""
    tcfg = TransformerConfig(width=16, depth=1, heads=2, kv_heads=1, temporal_every=1, softcap=0.0)
    torch.manual_seed(0)
    cfg = tiny_cfg(transformer=tcfg, agent_tokens=1, k_max=4)
    m = DynamicsModel(cfg, 2, 4, gym.spaces.Discrete(3)).eval()
    stream = RolloutStream(m, 1, generator=torch.Generator().manual_seed(0))
    a = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        for i in range(10_000):
            z, _ = stream.imagine(1, a)
            if i == 999:
                shapes = [tuple(k.shape) for k in stream.cache.k + stream.cache.v]
                nbytes, rss0 = stream.cache.nbytes(), _rss_mb()
    assert torch.isfinite(z).all() and stream.t == 10_000
    assert [tuple(k.shape) for k in stream.cache.k + stream.cache.v] == shapes
    assert stream.cache.nbytes() == nbytes and stream.cache.length == m.cfg.context - 1
    assert not stream.history
    assert _rss_mb() - rss0 < 16  # MB: nothing grows with the rollout length


def test_rollout_from_scratch_and_k_checks():
    m = tiny_model()
    empty = torch.zeros(2, 0, N, D)
    out = rollout(m, empty, torch.randint(0, 3, (2, 3)), 3, 1, generator=torch.Generator())
    assert out.shape == (2, 3, N, D)
    with pytest.raises(ValueError):
        rollout(m, empty, None, 1, 3)
    with pytest.raises(ValueError):
        rollout(m, empty, None, 1, 16)  # K > K_max


@pytest.mark.parametrize("objective", ["shortcut", "flow_x", "flow_v"])
def test_training_loss_decreases(objective):
    torch.manual_seed(0)
    cfg = tiny_cfg(objective=objective, context=4)
    m = DynamicsModel(cfg, N, D, gym.spaces.Discrete(3))
    # toy video: a pattern that moves according to the action (+1/−1/0 token shift per frame)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 1, N, D, generator=g)
    actions = torch.randint(0, 3, (8, 6), generator=g)
    frames = [base]
    for t in range(5):
        shift = (actions[:, t] - 1)[:, None, None, None]
        frames.append(torch.stack([torch.roll(f, int(s), dims=1) for f, s in zip(frames[-1], shift)]))
    latents = torch.cat(frames, 1).tanh()
    mask = torch.ones(8, 6, dtype=torch.bool)

    def eval_loss() -> float:  # fixed (τ, d, noise) draws, so before/after compare like with like
        with torch.no_grad():
            gens = [torch.Generator().manual_seed(s) for s in range(4)]
            return sum(dynamics_loss(m, latents, actions, mask, cfg, g)[0].item() for g in gens) / 4

    before = eval_loss()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss, terms = dynamics_loss(m, latents, actions, mask, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert eval_loss() < 0.9 * before  # (flow_v keeps a large irreducible noise-variance part)
    assert set(terms) >= {"loss", "flow", "bootstrap", "bootstrap_frac", "single_frac"}
    if objective != "shortcut":
        assert terms["bootstrap_frac"] == 0


def test_dynamics_loss_single_frame_split():
    m = tiny_model()
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape[:2])))
    z = torch.randn(10, 4, N, D)
    cfg = tiny_cfg(bootstrap_fraction=0.0, single_frame_fraction=0.3)
    _, terms = dynamics_loss(m, z, torch.randint(0, 3, (10, 4)), None, cfg, torch.Generator().manual_seed(0))
    n_single = round(terms["single_frac"].item() * 10)
    assert n_single in (3,) and calls == [(n_single * 4, 1), (10 - n_single, 4)]


def test_dynamics_loss_trains_on_the_rollouts_context_labels():
    """With context_rows, every model call of a training step — the main pass and both half steps of the
    bootstrap target — sees rows whose first frames carry the rollout's (τ_ctx, d_min) context label; a
    rollout at K = 2 then conditions on a pattern the model was trained with (d_min context, then d = 1/2)."""
    m = tiny_model()
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append((args[1].clone(), args[2].clone())))
    cfg = tiny_cfg(single_frame_fraction=0.0, bootstrap_fraction=1.0, context_rows=1.0)
    z = torch.randn(6, 4, N, D)
    dynamics_loss(m, z, torch.randint(0, 3, (6, 4)), None, cfg, torch.Generator().manual_seed(0))
    tau_ctx, d_min = flow.context_level(cfg.context_signal, cfg.k_max), 1.0 / cfg.k_max
    assert len(seen) == 3  # x̂ pass, then the two half steps on the bootstrap rows
    for tau, d in seen:
        assert ((tau[:, 0] == tau_ctx) & (d[:, 0] == d_min)).all()  # every row starts with context
    assert (seen[0][1][:, -1] > d_min).all()  # and ends with a bootstrap frame, as a step of K < K_max
    # off (the default): independent per-frame levels, the first frame almost never at τ_ctx
    seen.clear()
    dynamics_loss(m, z, torch.randint(0, 3, (6, 4)), None, tiny_cfg(single_frame_fraction=0.0),
                  torch.Generator().manual_seed(0))
    assert not ((seen[0][0] == tau_ctx) & (seen[0][1] == d_min)).all(1).any()



def test_heun_rollout_of_a_flow_model_uses_trained_labels_and_equals_recompute():
    """A flow_x model sampled with Heun: every pass carries d = d_min (the only label flow_loss trains),
    each frame costs 2K − 1 denoising calls, and the cached stream equals full recompute."""
    m = tiny_model(objective="flow_x", sampler="heun")
    labels = []
    m.register_forward_pre_hook(lambda mod, args: labels.append(args[2][:, -1].unique().tolist()))
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 2, N, D, generator=g)
    acts = torch.randint(0, 3, (2, 2 + 3), generator=g)
    outs, calls = [], []
    for use_cache in (True, False):
        outs.append(rollout(m, ctx, acts, 3, 4, generator=torch.Generator().manual_seed(1),
                            use_cache=use_cache))
        calls.append(len(labels) - sum(calls))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert all(lab == [1 / 8] for lab in labels)  # tiny_cfg: k_max 8
    # observe, then 3 frames x (2K - 1) calls; commits ride along (cache) or run on their own (recompute)
    assert calls == [1 + 3 * 7, 1 + 3 * (7 + 1)]


def test_bootstrap_targets_come_from_the_ema_weights_when_asked():
    """dynamics.ema_targets: the half steps run with the averaged weights (functional_call), the x̂ pass
    with the trained ones; equal weights give the plain loss, different ones a different loss."""
    cfg = dict(single_frame_fraction=0.0, bootstrap_fraction=1.0, ema=0.5)
    z, acts = torch.randn(4, 3, N, D), torch.randint(0, 3, (4, 3))

    def loss(model, **kw):
        return dynamics_loss(model, z, acts, None, tiny_cfg(**cfg, **kw), torch.Generator().manual_seed(0))[0]

    m = tiny_model(**cfg, ema_targets=True)
    plain = tiny_model(**cfg)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(loss(m, ema_targets=True), loss(plain))  # EMA == weights at the start
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with_ema = loss(m, ema_targets=True)
    assert not torch.allclose(with_ema, loss(m))  # the same weights with their own targets
    with_ema.backward()
    assert all(b.grad is None for b in m.ema.buffers())  # targets are constants
    with pytest.raises(InputError, match="ema_targets needs dynamics.ema > 0"):
        tiny_model(ema_targets=True)
