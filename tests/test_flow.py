"""Tests for worldflow.flow: every check compares against an independent transcription of Dreamer 4 eq. 5–8"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worldflow import flow

K_MAX = 16


class ToyModel(nn.Module):
    """Deterministic x-predictor with τ-, d-, time- and condition-dependence, small enough to reason about.

    out[b, t] = z[b, t] W + mean(z[b, :t+1]) U + τ·a + log2(d)·c + bias[b]   (causal in time, like dynamics)
    """

    def __init__(self, features: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64) * 0.5)
        self.W, self.U = r(features, features), r(features, features)
        self.a, self.c = r(features), r(features)

    def forward(self, z, tau, d, bias=None):
        t = torch.arange(1, z.shape[1] + 1, dtype=z.dtype)[None, :, None]
        causal_mean = z.cumsum(1) / t
        out = z @ self.W + causal_mean @ self.U + tau[..., None] * self.a + torch.log2(d)[..., None] * self.c
        return out if bias is None else out + bias[:, None, :]


def reference_loss(model, z1, z0, tau, d, k_max, ramp=True, bias=None, stop_grad=True):
    """Transcription of Dreamer 4 eq. 6–8, frame by frame, half steps on *all* rows, explicit .detach()."""
    B, T = tau.shape
    d_min = 1.0 / k_max
    zt = (1 - tau)[..., None] * z0 + tau[..., None] * z1
    x_hat = model(zt, tau, d, bias)
    boot = d > d_min
    half = torch.where(boot, d / 2, d)
    f1 = model(zt, tau, half, bias)
    b1 = (f1 - zt) / (1 - tau)[..., None]
    z_mid = torch.where(boot[..., None], zt + b1 * half[..., None], zt)
    tau_mid = torch.where(boot, tau + half, tau)
    f2 = model(z_mid, tau_mid, half, bias)
    b2 = (f2 - z_mid) / (1 - tau_mid)[..., None]
    target = (b1 + b2) / 2
    if stop_grad:
        target = target.detach()
    total = 0.0
    for b in range(B):
        for t in range(T):
            w = 0.9 * tau[b, t] + 0.1 if ramp else 1.0
            if d[b, t] == d_min:
                total = total + w * ((x_hat[b, t] - z1[b, t]) ** 2).mean()
            else:
                v_hat = (x_hat[b, t] - zt[b, t]) / (1 - tau[b, t])
                total = total + w * (1 - tau[b, t]) ** 2 * ((v_hat - target[b, t]) ** 2).mean()
    return total / (B * T)


def _batch(B=5, T=4, F=6, seed=1, k_max=K_MAX, mixed=True):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    tau, d = flow.sample_tau_d(B, T, k_max, 0.5, generator=g)
    if mixed:  # a bootstrap row with one flow frame and an all-flow row: exercises per-frame selection
        d[0, 1], tau[0, 1] = 1.0 / k_max, 3.0 / k_max
        d[1], tau[1] = 1.0 / k_max, torch.arange(T) / k_max
        d[2, 0], tau[2, 0] = 0.5, 0.5
    bias = torch.randn(B, F, generator=g, dtype=torch.float64)
    return z1, z0, tau.double(), d.double(), bias


# ---------------------------------------------------------------------------------------------------
# Conventions


def test_corrupt_endpoints_and_identity():
    g = torch.Generator().manual_seed(0)
    z1, z0, x_hat = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    tau = torch.tensor([[0.0, 0.25, 0.5, 0.75, 0.9375]] * 3, dtype=torch.float64)
    zt = flow.corrupt(z1, z0, tau)
    assert torch.equal(zt[:, 0], z0[:, 0])  # τ = 0 is pure noise
    assert torch.equal(flow.corrupt(z1, z0, torch.ones_like(tau)), z1)  # τ = 1 is clean data
    v, v_hat = z1 - z0, flow.x_to_v(x_hat, zt, tau)
    lhs = ((x_hat - z1) ** 2).sum(-1)
    rhs = (1 - tau) ** 2 * ((v_hat - v) ** 2).sum(-1)
    torch.testing.assert_close(lhs, rhs)  # ‖x̂ − z1‖² = (1 − τ)²‖v̂ − v‖²
    torch.testing.assert_close(flow.v_to_x(v_hat, zt, tau), x_hat)
    # the true clean latents have exactly the true velocity
    torch.testing.assert_close(flow.x_to_v(z1, zt, tau), v)


def test_euler_step_formula_and_exact_landing():
    g = torch.Generator().manual_seed(0)
    z, x_hat = torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g)
    d = torch.full((2, 8), 0.125)
    tau = (torch.arange(8) * 0.125).expand(2, 8)
    out = flow.euler_step(z, x_hat, tau, d)
    expect = z + d[..., None] * (x_hat - z) / (1 - tau[..., None])
    torch.testing.assert_close(out, expect)
    assert torch.equal(out[:, -1], x_hat[:, -1])  # τ = 1 − d: exactly x̂, no rounding


def test_grid_indices_exact():
    for e in range(5):
        d = 2.0**-e
        for i in range(2**e):
            tau = torch.tensor([[i * d]])
            assert flow.tau_index(tau, K_MAX).item() == i * (K_MAX >> e)
            assert flow.step_index(torch.tensor([[d]])).item() == e
    assert flow.snap_tau(0.9, 64) == 58 / 64 and flow.snap_tau(0.9, 8) == 7 / 8
    assert flow.snap_tau(1.0, 8) == 7 / 8 and flow.snap_tau(-1.0, 8) == 0.0


# ---------------------------------------------------------------------------------------------------
# The (τ, d) sampler


def test_sample_tau_d_on_grid_and_fractions():
    g = torch.Generator().manual_seed(0)
    boot_rows, boot_exps, n_rows = 0, [], 0
    for _ in range(200):
        tau, d = flow.sample_tau_d(8, 5, K_MAX, 0.25, generator=g)
        e = -torch.log2(d)
        assert torch.equal(e, e.round()) and ((e >= 0) & (e <= math.log2(K_MAX))).all()  # d = 2^-e
        assert torch.equal(tau / d, (tau / d).round())  # τ on d's grid
        assert (tau >= 0).all() and (1 - tau >= d).all()  # 1 − τ ≥ d
        boot = d > 1.0 / K_MAX
        rows = boot.any(1)
        assert torch.equal(boot.all(1), rows)  # a row is all flow or all bootstrap
        boot_rows += int(rows.sum())
        n_rows += 8
        boot_exps.append(e[boot])
    assert abs(boot_rows / n_rows - 0.25) < 0.04
    # bootstrap d uniform over exponents {0, …, log2 K_max − 1} (d > d_min)
    counts = torch.bincount(torch.cat(boot_exps).long(), minlength=4)
    assert counts[4:].sum() == 0 and (counts[:4].float() / counts.sum() - 0.25).abs().max() < 0.05


def test_sample_tau_d_exact_row_count_and_uniform_tau():
    g = torch.Generator().manual_seed(1)
    idx = []
    for _ in range(100):
        tau, d = flow.sample_tau_d(4, 3, 8, 0.25, generator=g)
        assert int((d > 1 / 8).any(1).sum()) == 1  # batch·fraction = 1 exactly: stochastic rounding exact
        idx.append(flow.tau_index(tau[d == 1 / 8], 8))
    counts = torch.bincount(torch.cat(idx), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.04  # flow rows: τ uniform on the 1/8 grid
    # small batches keep the configured share on average (3 · 0.25 = 0.75 rows per batch)
    n = sum(int((flow.sample_tau_d(3, 1, 8, 0.25, generator=g)[1] > 1 / 8).sum()) for _ in range(400))
    assert abs(n / 400 - 0.75) < 0.08
    tau, d = flow.sample_tau_d(6, 2, 8, 0.0, generator=g)
    assert (d == 1 / 8).all()
    tau, d = flow.sample_tau_d(3, 2, 1, 0.25, generator=g)  # K_max = 1: only d = 1, τ = 0
    assert (d == 1).all() and (tau == 0).all()


def test_context_prefix_puts_the_samplers_label_pattern_in_rows():
    """A chosen row starts with j in 1..T-1 frames at (tau_ctx, d_min); everything else keeps its draw."""
    g = torch.Generator().manual_seed(3)
    tau_ctx = flow.context_level(0.9, K_MAX)
    chosen, lengths = 0, set()
    for _ in range(200):
        tau0, d0 = flow.sample_tau_d(8, 5, K_MAX, 0.5, generator=g)
        tau, d = flow.context_prefix(tau0, d0, tau_ctx, K_MAX, 0.5, generator=g)
        ctx = (tau == tau_ctx) & (d == 1.0 / K_MAX)
        changed = (tau != tau0) | (d != d0)
        assert not (changed & ~ctx).any()  # only ever overwritten with the context label
        for r in range(8):
            if not changed[r].any():
                continue
            chosen += 1
            j = int(changed[r].nonzero().max()) + 1  # the prefix ends at the last overwritten frame
            assert j <= 4 and ctx[r, :j].all()  # a prefix, never the last frame
            lengths.add(j)
        e = -torch.log2(d)
        assert torch.equal(e, e.round()) and torch.equal(tau / d, (tau / d).round())  # still on the grid
    # a chosen row whose first frames already held the label is invisible here, so the count is a bound
    assert 0.40 * 1600 < chosen <= 0.5 * 1600 + 200 and lengths == {1, 2, 3, 4}
    # the inference pattern: d_min context followed by a frame at d > d_min occurs (bootstrap rows)
    tau, d = flow.context_prefix(*flow.sample_tau_d(64, 4, K_MAX, 1.0, generator=g), tau_ctx, K_MAX, 1.0,
                                 generator=g)
    assert ((d[:, 0] == 1.0 / K_MAX) & (tau[:, 0] == tau_ctx) & (d[:, -1] > 1.0 / K_MAX)).all()
    same = flow.context_prefix(tau, d, tau_ctx, K_MAX, 0.0, generator=g)
    assert same[0] is tau and same[1] is d  # fraction 0 (the default) draws nothing, changes nothing
    assert flow.context_level(0.9, 64) == 58 / 64 and flow.context_level(0.9, 64, noisy=False) == 63 / 64


# ---------------------------------------------------------------------------------------------------
# Shortcut forcing


@pytest.mark.parametrize("ramp", [True, False])
def test_shortcut_loss_matches_transcription(ramp):
    model = ToyModel()
    z1, z0, tau, d, bias = _batch()
    loss, terms = flow.shortcut_forcing_loss(model, z1, tau, d, K_MAX, ramp=ramp, noise=z0, bias=bias)
    ref = reference_loss(model, z1, z0, tau, d, K_MAX, ramp=ramp, bias=bias)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    boot = d > 1 / K_MAX
    assert 0 < terms["bootstrap_frac"] < 1 and terms["bootstrap_frac"] == boot.float().mean()
    torch.testing.assert_close(
        terms["loss"], (terms["flow"] * (~boot).sum() + terms["bootstrap"] * boot.sum()) / boot.numel()
    )


def test_shortcut_loss_each_term_and_scaling():
    """Single-frame cases checked by hand: the flow term, and the (1 − τ)² and ramp on the bootstrap term."""
    model = ToyModel(features=3)
    g = torch.Generator().manual_seed(3)
    z1, z0 = torch.randn(1, 1, 3, generator=g, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64)
    tau = torch.tensor([[0.25]], dtype=torch.float64)
    for d_val in (1 / K_MAX, 0.25):
        d = torch.tensor([[d_val]], dtype=torch.float64)
        loss, _ = flow.shortcut_forcing_loss(model, z1, tau, d, K_MAX, noise=z0)
        zt = 0.75 * z0 + 0.25 * z1
        x_hat = model(zt, tau, d)
        w = 0.9 * 0.25 + 0.1
        if d_val == 1 / K_MAX:
            expect = w * ((x_hat - z1) ** 2).mean()
        else:
            b1 = (model(zt, tau, d / 2) - zt) / 0.75
            zm = zt + b1 * 0.125
            b2 = (model(zm, tau + 0.125, d / 2) - zm) / (1 - 0.375)
            expect = w * 0.75**2 * (((x_hat - zt) / 0.75 - (b1 + b2) / 2) ** 2).mean()
        torch.testing.assert_close(loss, expect)


def test_perfect_model_has_zero_loss():
    """Data z1 = c (a point mass): f ≡ c is exact, so both terms vanish iff conventions are consistent."""
    c = torch.randn(1, 1, 4, dtype=torch.float64).expand(6, 5, 4)
    oracle = lambda z, tau, d: c[: z.shape[0]]
    tau, d = flow.sample_tau_d(6, 5, K_MAX, 0.5, generator=torch.Generator().manual_seed(0))
    loss, terms = flow.shortcut_forcing_loss(oracle, c, tau.double(), d.double(), K_MAX)
    assert terms["bootstrap_frac"] > 0 and loss.item() < 1e-20
    # and the sampler recovers c exactly from any noise, for every K
    for k in (1, 2, 4, 16):
        assert torch.equal(flow.sample(oracle, (6, 5, 4), k, dtype=torch.float64), c)


def test_stop_gradient():
    z1, z0, tau, d, bias = _batch(seed=4)
    grads = {}
    for name in ("impl", "ref", "ref_no_sg"):
        model = ToyModel(seed=7)
        if name == "impl":
            loss, _ = flow.shortcut_forcing_loss(model, z1, tau, d, K_MAX, noise=z0, bias=bias)
        else:
            loss = reference_loss(model, z1, z0, tau, d, K_MAX, bias=bias, stop_grad=name == "ref")
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["impl"], grads["ref"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads["impl"], grads["ref_no_sg"])  # the test can see a missing sg


def test_half_steps_no_grad_and_only_bootstrap_rows():
    model = ToyModel()
    z1, z0, tau, d, bias = _batch()
    calls = []

    def spy(z, tau, d, bias):
        out = model(z, tau, d, bias)
        calls.append((z.shape[0], out.requires_grad, torch.is_grad_enabled()))
        return out

    flow.shortcut_forcing_loss(spy, z1, tau, d, K_MAX, noise=z0, bias=bias)
    n_boot_rows = int((d > 1 / K_MAX).any(1).sum())
    assert calls == [(5, True, True), (n_boot_rows, False, False), (n_boot_rows, False, False)]
    calls.clear()
    d_flow = torch.full_like(d, 1 / K_MAX)
    flow.shortcut_forcing_loss(spy, z1, tau * 0, d_flow, K_MAX, noise=z0, bias=bias)
    assert len(calls) == 1  # no bootstrap rows → no extra passes


# ---------------------------------------------------------------------------------------------------
# Plain flow matching


def test_flow_loss_x_and_v():
    model = ToyModel()
    z1, z0, tau, _, bias = _batch(mixed=False)
    tau = (tau * K_MAX).floor() / K_MAX
    seen = []
    spy = lambda z, t, d, bias: seen.append(d) or model(z, t, d, bias)
    zt = (1 - tau)[..., None] * z0 + tau[..., None] * z1
    w = (0.9 * tau + 0.1)[..., None]
    out = model(zt, tau, torch.full_like(tau, 1 / K_MAX), bias)
    for pred, target in (("x", z1), ("v", z1 - z0)):
        loss, _ = flow.flow_loss(spy, z1, tau, K_MAX, prediction=pred, noise=z0, bias=bias)
        torch.testing.assert_close(loss, (w * (out - target) ** 2).mean())
        assert (seen[-1] == 1 / K_MAX).all()
    # objective dispatch
    loss, _ = flow.objective_loss("flow_v", model, z1, tau, tau, K_MAX, noise=z0, bias=bias)
    torch.testing.assert_close(loss, (w * (out - (z1 - z0)) ** 2).mean())
    with pytest.raises(ValueError):
        flow.prediction_of("meanflow")
    # a velocity model converted to x-prediction takes the same Euler steps as z + d·v̂
    vx = flow.as_x_prediction(lambda z, t, d: torch.ones_like(z), "v")
    z = torch.zeros(1, 1, 2, dtype=torch.float64)
    t, dd = torch.tensor([[0.25]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    torch.testing.assert_close(flow.euler_step(z, vx(z, t, dd), t, dd), z + 0.25)


# ---------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sampler_schedule_and_last_step(steps):
    g = torch.Generator().manual_seed(0)
    seen, outs = [], []

    def model_fn(z, tau, d):
        seen.append((tau.clone(), d.clone()))
        outs.append(torch.randn(z.shape, generator=g))
        return outs[-1]

    z = flow.sample(model_fn, (2, 3, 4), steps, generator=torch.Generator().manual_seed(1), k_max=8)
    assert len(seen) == steps
    for k, (tau, d) in enumerate(seen):
        assert tau.shape == (2, 3) and (tau == k / steps).all() and (d == 1 / steps).all()
    assert torch.equal(z, outs[-1])  # lands exactly on the last x̂


def test_sampler_matches_manual_euler():
    model = ToyModel(features=4)
    z0 = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = flow.denoise(model, z0, 4)
        z = z0
        for k in range(4):
            tau = torch.full((2, 3), k / 4, dtype=torch.float64)
            d = torch.full((2, 3), 0.25, dtype=torch.float64)
            x = model(z, tau, d)
            z = x if k == 3 else z + 0.25 * (x - z) / (1 - k / 4)
    torch.testing.assert_close(out, z)


def test_heun_matches_manual_transcription():
    """Heun on the velocity v = (x̂ − z)/(1 − τ): Euler predictor, corrector with the mean slope, and a
    plain Euler last step; 2K − 1 model calls."""
    model = ToyModel(features=4)
    calls = []
    counted = lambda z, tau, d: calls.append(1) or model(z, tau, d)
    z0 = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = flow.denoise(counted, z0, 4, sampler="heun")
        z, d = z0, 0.25
        for k in range(4):
            t = k / 4
            tau = torch.full((2, 3), t, dtype=torch.float64)
            x = model(z, tau, torch.full_like(tau, d))
            if k == 3:
                z = x
                continue
            v1 = (x - z) / (1 - t)
            zp = z + d * v1
            v2 = (model(zp, tau + d, torch.full_like(tau, d)) - zp) / (1 - t - d)
            z = z + d * (v1 + v2) / 2
    torch.testing.assert_close(out, z)
    assert len(calls) == flow.network_evaluations(4, "heun") == 7 and flow.network_evaluations(4) == 4
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        flow.denoise(model, z0, 4, sampler="rk4")


def test_heun_is_second_order_on_gaussian_data():
    """Data z1 ~ N(μ, σ²) per feature: the exact x-prediction is E[z1 | z̃] = μ + τσ²(z̃ − τμ)/s(τ)², with
    s(τ)² = τ²σ² + (1 − τ)², and the probability-flow ODE carries z0 to exactly μ + σ·z0. Euler's endpoint
    error falls ~2x per halving of the step, Heun's ~4x, and Heun beats Euler at equal model calls."""
    mu, sigma = torch.tensor([1.5, -0.5]), torch.tensor([0.3, 2.0])

    def oracle(z, tau, d):
        t = tau[..., None]
        return mu + t * sigma**2 * (z - t * mu) / (t**2 * sigma**2 + (1 - t) ** 2)

    z0 = torch.randn(4096, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + sigma * z0
    err = {(s, k): (flow.denoise(oracle, z0, k, sampler=s) - exact).abs().mean().item()
           for s in flow.SAMPLERS for k in (4, 8, 16, 32)}
    for k in (4, 8, 16):
        assert 1.6 < err["euler", k] / err["euler", 2 * k] < 2.5
        assert err["heun", k] / err["heun", 2 * k] > 3.0
    assert err["heun", 8] < err["euler", 16]  # 15 calls against 16


def test_flow_models_are_sampled_with_the_label_they_trained_on():
    """A plain flow model trained only at d = d_min (flow_loss) is fed d_min by the samplers; a shortcut
    model gets the step it takes, d = 1/K."""
    seen = []
    fn = lambda z, tau, d: seen.append(d.unique().tolist()) or torch.zeros_like(z)
    for objective, label in (("shortcut", 1 / 4), ("flow_x", 1 / K_MAX), ("flow_v", 1 / K_MAX)):
        seen.clear()
        flow.denoise(flow.as_sampler_fn(fn, objective, K_MAX), torch.randn(2, 1, 3), 4, K_MAX)
        assert seen == [[label]] * 4


def test_sampler_rejects_off_grid_steps():
    f = lambda z, tau, d: z
    for bad in (3, 0, 16):
        with pytest.raises(ValueError):
            flow.sample(f, (1, 1, 2), bad, k_max=8)
