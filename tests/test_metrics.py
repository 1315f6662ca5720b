"""Metrics against known values."""

import math

import numpy as np
import pytest
import torch

from worldflow.eval.metrics import pooled_psnr, psnr, ssim


def test_psnr_of_known_noise():
    target = torch.full((4, 32, 32, 3), 0.5)
    pred = target.clone()
    pred[..., ::2, :, :] += 0.1  # half the pixels off by 0.1 -> MSE = 0.005
    expected = 10 * math.log10(1 / 0.005)
    assert torch.allclose(psnr(pred, target), torch.full((4,), expected), atol=1e-3)


def test_pooled_psnr_is_the_psnr_of_the_mean_mse():
    """Two frames, one an exact copy (MSE 0) and one with MSE 0.01: the per-frame mean is dominated by the
    copy's 100 dB, the pooled value is 10 log10(1 / 0.005) = 23.01 dB."""
    target = torch.full((2, 8, 8, 3), 0.5)
    pred = target.clone()
    pred[1] += 0.1  # MSE 0.01 on frame 1, 0 on frame 0
    assert float(psnr(pred, target).mean()) == pytest.approx((100 + 20) / 2, abs=1e-3)
    assert pooled_psnr(pred, target) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)
    assert pooled_psnr(pred[1:], target[1:]) == pytest.approx(float(psnr(pred[1:], target[1:])), abs=1e-4)
    u8 = (target * 255).round().to(torch.uint8)
    assert pooled_psnr(u8, u8) == pytest.approx(100.0)  # identical: capped, not inf


def test_psnr_uint8_matches_float():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8, generator=g)
    assert psnr(a, b).shape == (2, 3)
    assert torch.allclose(psnr(a, b), psnr(a.float() / 255, b.float() / 255))


def test_ssim_identical_is_one_and_noise_is_less():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 32, 32, 3, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim(noisy, x)
    assert (s < 0.9).all() and (s > -1).all()


def test_ssim_constant_shift_matches_formula():
    # Two constant images: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) (variance terms cancel).
    a, b = torch.full((1, 16, 16, 3), 0.3), torch.full((1, 16, 16, 3), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1)
    assert torch.allclose(ssim(a, b), torch.tensor([expected]), atol=1e-5)


def test_object_match_counts_exact_frames_only():
    from worldflow.envs.catch import read_objects

    from worldflow.eval.metrics import object_match

    truth = np.zeros((2, 3, 64, 64, 3), np.uint8)  # 2 clips x 3 frames, one ball in cell (2, 5)
    truth[:, :, 16:24, 40:48] = (255, 64, 64)
    pred = truth.copy()
    pred[0, 1] = 0  # ball lost in one frame
    pred[1, 2, 16:24, 40:48] = (60, 15, 15)  # ball too faint to read in another
    m = object_match(read_objects(pred), read_objects(truth), lead=2)
    assert m["ball"].shape == (2, 3) and m["paddle"].shape == (2, 3)
    assert m["ball"].tolist() == [[True, False, True], [True, True, False]]
    assert m["paddle"].all()  # no paddle anywhere, in both


def test_frechet_distance_against_closed_forms():
    """Identical sets give 0; a shifted copy gives ||c||^2; a scaled copy (mu -> s mu, S -> s^2 S) gives
    (1 - s)^2 (||mu||^2 + Tr S), all from the same sample, so the values are exact up to float error."""
    from worldflow.eval.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + torch.randn(6, generator=g)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert frechet_distance(x, x + c) == pytest.approx(float(c.square().sum()), rel=1e-6)
    s = 1.7
    mu, cov = x.double().mean(0), torch.cov(x.double().T)
    want = (1 - s) ** 2 * float(mu.square().sum() + torch.trace(cov))
    assert frechet_distance(x, s * x) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(x, x[torch.randperm(500, generator=g)]) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(x, x[:, :3])


def test_gaussian_moments_stream_equals_the_feature_sets():
    """Rows added in chunks give the same mean, covariance and Fréchet distance as the whole sets: the
    long-horizon evaluation keeps O(D^2) moments per window instead of every frame's features."""
    from worldflow.eval.metrics import GaussianMoments, frechet_distance

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g).tanh()
    y = (torch.randn(200, 5, generator=g) * 0.5 + 0.2).tanh()
    mx, my = GaussianMoments(5), GaussianMoments(5)
    for chunk in x.split(7):
        mx.add(chunk)
    for chunk in y.split(32):
        my.add(chunk)
    assert mx.n == 300 and torch.allclose(mx.cov, torch.cov(x.double().T), atol=1e-12)
    assert mx.frechet(my) == pytest.approx(frechet_distance(x, y), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 rows"):
        GaussianMoments.of(x[:1]).frechet(my)


def test_reservoir_is_a_uniform_seeded_subsample_of_the_stream():
    """Algorithm R: a stream no longer than the capacity is kept whole and in order; a longer one leaves
    each row kept with probability capacity / n, whatever its position or the chunking, and a seed
    fixes the sample."""
    from worldflow.eval.metrics import Reservoir

    rows = torch.arange(10.0)[:, None].repeat(1, 3)
    small = Reservoir(16, 3, torch.Generator().manual_seed(0))
    small.add(rows[:4])
    small.add(rows[4:])
    assert torch.equal(small.rows, rows) and small.n == 10

    n, cap, trials = 400, 40, 300
    stream = torch.arange(float(n))[:, None]
    counts = torch.zeros(n)
    for t in range(trials):
        r = Reservoir(cap, 1, torch.Generator().manual_seed(t))
        for chunk in stream.split(7):  # chunking must not matter
            r.add(chunk)
        kept = r.rows[:, 0].long()
        assert len(kept) == cap and len(set(kept.tolist())) == cap  # no row twice
        counts[kept] += 1
    # every position kept with probability cap / n = 0.1: first, middle and last quarters alike
    quarters = counts.view(4, -1).sum(1) / (trials * n / 4)
    assert torch.allclose(quarters, torch.full((4,), cap / n), atol=0.01), quarters
    again = Reservoir(cap, 1, torch.Generator().manual_seed(5))
    again.add(stream)
    other = Reservoir(cap, 1, torch.Generator().manual_seed(5))
    other.add(stream)
    assert torch.equal(again.rows, other.rows)


def test_spearman_against_the_textbook_formula_and_with_ties():
    """Without ties ρ = 1 − 6 Σ d² / (n (n² − 1)); with ties, the Pearson correlation of average ranks
    (transcribed here by hand for a small case)."""
    from worldflow.eval.metrics import rank_average, spearman

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, generator=g), torch.randn(40, generator=g)
    rx, ry = x.argsort().argsort().double() + 1, y.argsort().argsort().double() + 1
    n = 40
    assert spearman(x, y) == pytest.approx(1 - 6 * ((rx - ry) ** 2).sum().item() / (n * (n * n - 1)))
    assert spearman(x, x.exp()) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    # ties: x ranks (1, 2.5, 2.5, 4), y ranks (2, 1, 3, 4)
    assert rank_average(torch.tensor([1.0, 5.0, 5.0, 9.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    a, b = torch.tensor([1.0, 2.5, 2.5, 4.0]) - 2.5, torch.tensor([2.0, 1.0, 3.0, 4.0]) - 2.5
    expect = float((a * b).sum() / (a.norm() * b.norm()))
    got = spearman(torch.tensor([1.0, 5.0, 5.0, 9.0]), torch.tensor([0.2, 0.1, 0.3, 0.4]))
    assert got == pytest.approx(expect)
    assert spearman(torch.ones(5), torch.arange(5.0)) is None and spearman(x[:2], y[:2]) is None
