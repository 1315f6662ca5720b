"""Shared transformer blocks: attention paths, causality, windows, KV-cache streaming, masks."""

from __future__ import annotations

import pytest
import torch

from worldflow.config import TransformerConfig
from worldflow.nn import (
    RMSNorm,
    SpaceTimeTransformer,
    SwiGLU,
    apply_rope,
    attend,
    rope_angles,
    swiglu_hidden,
    temporal_mask,
)

ATOL = 1e-5


def naive_attention(q, k, v, mask=None, softcap=0.0):
    """Textbook reference: repeat kv heads, explicit logits, cap, mask, softmax; empty rows -> 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        mask = mask.expand_as(logits)
        logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, -1)
    if mask is not None:
        p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def make(width=32, depth=4, heads=4, kv_heads=2, temporal_every=2, softcap=50.0, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        width=width, depth=depth, heads=heads, kv_heads=kv_heads, temporal_every=temporal_every,
        softcap=softcap,
    )
    return SpaceTimeTransformer(cfg).eval()


# ----------------------------------------------------------------------------------------------- blocks


def test_rmsnorm_and_swiglu_shapes():
    x = torch.randn(2, 3, 32)
    y = RMSNorm(32)(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4)
    assert swiglu_hidden(32, 4.0) == 88 and swiglu_hidden(128, 4.0) == 344
    assert SwiGLU(32, 4.0)(x).shape == x.shape


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        cq, sq = rope_angles(torch.tensor([m]), 16)
        ck, sk = rope_angles(torch.tensor([n]), 16)
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()

    assert torch.allclose(score(3, 1), score(1003, 1001), atol=1e-4)
    assert not torch.allclose(score(3, 1), score(1, 3), atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("backend", ["auto", "math"])
def test_attend_matches_naive(heads, kv_heads, softcap, backend):
    torch.manual_seed(1)
    q = torch.randn(2, heads, 7, 8) * 3  # large logits so the cap matters
    k, v = torch.randn(2, kv_heads, 9, 8) * 3, torch.randn(2, kv_heads, 9, 8)
    mask = torch.rand(7, 9) > 0.4
    mask[:, 0] = True
    out = attend(q, k, v, mask, softcap, backend)
    assert torch.allclose(out, naive_attention(q, k, v, mask, softcap), atol=ATOL)
    # per-batch/per-head masks broadcast too
    mask4 = torch.rand(2, heads, 7, 9) > 0.3
    mask4[..., 0] = True
    assert torch.allclose(attend(q, k, v, mask4, softcap, backend), naive_attention(q, k, v, mask4, softcap),
                          atol=ATOL)


def test_softcap_changes_result():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 8) * 5, torch.randn(1, 2, 5, 8) * 5, torch.randn(1, 2, 5, 8)
    assert not torch.allclose(attend(q, k, v, softcap=1.0), attend(q, k, v), atol=1e-3)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_attend_fully_masked_row_is_zero_not_nan(softcap):
    torch.manual_seed(3)
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out = attend(q, k, v, mask, softcap)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.allclose(out, naive_attention(q, k, v, mask, softcap), atol=ATOL)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_temporal_mask_band():
    m = temporal_mask(torch.arange(5), torch.arange(5), window=2)
    assert m.tolist()[3] == [False, False, True, True, False]


# ------------------------------------------------------------------------------------------ transformer


@pytest.mark.parametrize("softcap", [0.0, 50.0])
def test_causality(softcap):
    net = make(softcap=softcap)
    x = torch.randn(2, 6, 5, 32)
    y = net(x)
    x2 = x.clone()
    x2[:, 3] += torch.randn_like(x2[:, 3])
    y2 = net(x2)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=ATOL)
    assert not torch.allclose(y[:, 3:], y2[:, 3:], atol=1e-3)


def test_window_single_temporal_layer():
    """With one temporal layer, frames older than the window have no influence at all."""
    net = make(depth=2, temporal_every=2)
    assert net.temporal_layers == 1
    w = 3
    x = torch.randn(1, 8, 4, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y, y2 = net(x, window=w), net(x2, window=w)
    changed = [(y[:, t] - y2[:, t]).abs().max().item() > 1e-4 for t in range(8)]
    assert changed == [True] * w + [False] * (8 - w)


def test_window_receptive_field_of_stack():
    """Each temporal layer looks back window-1 frames; stacked, the reach adds up."""
    net = make(depth=4, temporal_every=2)  # 2 temporal layers
    w, n = 3, 8
    x = torch.randn(1, n, 4, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y, y2 = net(x, window=w), net(x2, window=w)
    reach = net.temporal_layers * (w - 1)
    changed = [(y[:, t] - y2[:, t]).abs().max().item() > 1e-5 for t in range(n)]
    assert changed == [t <= reach for t in range(n)]


@pytest.mark.parametrize("grad", [True, False])  # with grad: cache concatenated; without: the working slot
@pytest.mark.parametrize("softcap", [0.0, 50.0])
@pytest.mark.parametrize("length", [3, 4, 12])  # < window, = window, 3x window
def test_streaming_with_cache_equals_full(length, softcap, grad):
    w = 4
    net = make(softcap=softcap)
    x = torch.randn(2, length, 5, 32)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[:4, 4] = False  # token 4 one-way, as the dynamics agent token
    torch.set_grad_enabled(grad)
    try:
        _streaming_checks(net, x, mask, w, length)
    finally:
        torch.set_grad_enabled(True)


def _streaming_checks(net, x, mask, w, length):
    full = net(x, spatial_mask=mask, window=w)
    cache = net.new_cache(2, w)
    steps = [net(x[:, t : t + 1], spatial_mask=mask, cache=cache) for t in range(length)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)
    assert cache.next_t == length and cache.length == min(length, w - 1)
    # several frames per call (chunked streaming) give the same result
    cache.reset()
    chunks = [net(x[:, t : t + 2], spatial_mask=mask, cache=cache) for t in range(0, length, 2)]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=ATOL)


@pytest.mark.parametrize("grad", [True, False])
def test_commit_first_n_frames_equals_commit_then_denoise(grad):
    """commit=1 on two frames: the first is committed and the second attends to it, not kept — the
    same as committing the first alone and then running the second with commit=False."""
    net = make()
    x = torch.randn(2, 7, 5, 32)
    with torch.set_grad_enabled(grad):
        caches = [net.new_cache(2, 3), net.new_cache(2, 3)]
        for c in caches:
            for t in range(4):  # fill past the window, so the commit drops the oldest frame
                net(x[:, t : t + 1], cache=c)
        fused = net(x[:, 4:6], cache=caches[0], commit=1)
        net(x[:, 4:5], cache=caches[1])
        alone = net(x[:, 5:6], cache=caches[1], commit=False)
        assert torch.allclose(fused[:, 1:], alone, atol=ATOL)
        assert (caches[0].length, caches[0].next_t) == (caches[1].length, caches[1].next_t) == (2, 5)
        after = [net(x[:, 5:6], cache=c) for c in caches]  # the caches hold the same frames
        assert torch.allclose(after[0], after[1], atol=ATOL)
        with pytest.raises(ValueError, match="commit=3"):
            net(x[:, 4:6], cache=caches[0], commit=3)


@pytest.mark.parametrize("depth,every", [(4, 2), (3, 2), (2, 5)])  # last block temporal/spatial after/none
def test_outputs_of_the_last_frames_equal_the_full_forward(depth, every):
    """outputs=n computes only the last n frames past the last temporal layer's keys/values: their outputs
    and the cache left behind are those of the full forward, with a cache (a commit riding with the next
    frame's pass, commit=1) and without (the whole clip)."""
    net, w, n = make(depth=depth, temporal_every=every), 3, 7
    x = torch.randn(2, n + 1, 5, 32)
    with torch.no_grad():
        full = net(x, window=w)
        torch.testing.assert_close(net(x, window=w, outputs=2), full[:, -2:], rtol=0, atol=ATOL)
        pruned, plain = net.new_cache(2, w), net.new_cache(2, w)
        for t in range(n):
            y = net(x[:, t : t + 2], cache=pruned, commit=1, outputs=1)  # commit t, look at t + 1
            assert y.shape == (2, 1, 5, 32)
            torch.testing.assert_close(y, full[:, t + 1 : t + 2], rtol=0, atol=ATOL)
            net(x[:, t : t + 1], cache=plain)
        for layer in range(plain.layers):
            for a, b in zip(pruned.get(layer), plain.get(layer)):
                torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="outputs=0"):
            net(x[:, :2], window=w, outputs=0)


def test_sliding_cache_over_many_windows_equals_recompute():
    """A long no-grad stream slides the held frames through the buffer and moves them back to slot 0 when
    the free slots run out; the fused commit (commit=1 on two frames) and single-frame commits must keep
    giving full-recompute results, and rows copied between caches at different buffer offsets still match."""
    net, w, n = make(), 4, 20
    x = torch.randn(2, n + 1, 5, 32)
    with torch.no_grad():
        full = net(x, window=w)
        fused, single = net.new_cache(2, w), net.new_cache(2, w)
        starts = set()
        for t in range(n):
            y = net(x[:, t : t + 2], cache=fused, commit=1)  # commit frame t, look at frame t + 1
            assert torch.allclose(y, full[:, t : t + 2], atol=ATOL)
            assert torch.allclose(net(x[:, t : t + 1], cache=single), full[:, t : t + 1], atol=ATOL)
            starts.add(fused.start)
        assert len(starts) > 2 and 0 in starts  # it slid, and was moved back
        for layer in range(fused.layers):
            for a, b in zip(fused.get(layer), single.get(layer)):
                assert torch.allclose(a, b, atol=ATOL)
        other = net.new_cache(1, w)
        for t in range(n):  # row 1's frames, committed the fused way: another buffer offset
            net(x[1:, t : t + 2], cache=other, commit=1)
        assert other.start != single.start
        single.copy_rows_from([0], other)  # row 0 now holds row 1's history
        y = net(x[[1, 1], n : n + 1], cache=single)
        assert torch.allclose(y[0], full[1, n : n + 1], atol=ATOL)
        assert torch.allclose(y[1], full[1, n : n + 1], atol=ATOL)


def test_cache_is_bounded_and_preallocated():
    net = make()
    cache = net.new_cache(1, 3)
    net(torch.randn(1, 1, 5, 32), cache=cache)
    ptrs, nbytes = [t.data_ptr() for t in cache.k + cache.v], cache.nbytes()
    for _ in range(10):
        net(torch.randn(1, 1, 5, 32), cache=cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs and cache.nbytes() == nbytes
    # window - 1 held frames, as many free slots to slide into, 2 working slots
    assert all(t.shape[2] == 2 * 2 + 2 for t in cache.k)


def test_commit_false_leaves_cache_unchanged():
    net = make()
    cache = net.new_cache(2, 4)
    x = torch.randn(2, 5, 5, 32)
    for t in range(3):
        net(x[:, t : t + 1], cache=cache)
    snap = [t.clone() for t in cache.k + cache.v], cache.length, cache.next_t
    y_a = net(x[:, 3:4], cache=cache, commit=False)
    y_b = net(x[:, 3:4] + 0.5, cache=cache, commit=False)  # re-denoise: a different version of frame 3
    assert all(torch.equal(a, b) for a, b in zip(snap[0], cache.k + cache.v))
    assert (cache.length, cache.next_t) == snap[1:]
    assert not torch.allclose(y_a, y_b)
    y_c = net(x[:, 3:4], cache=cache, commit=True)
    assert torch.allclose(y_a, y_c, atol=ATOL) and cache.next_t == 4


def test_t0_shift_invariance_and_cache_checks():
    net = make()
    x = torch.randn(1, 4, 5, 32)
    assert torch.allclose(net(x, t0=0), net(x, t0=1000), atol=1e-4)  # RoPE is relative
    cache = net.new_cache(1, 3)
    net(x[:, :1], cache=cache, t0=7)
    assert cache.next_t == 8
    with pytest.raises(ValueError):
        net(x[:, 1:2], cache=cache, t0=3)
    with pytest.raises(ValueError):
        net(x[:, 1:2], cache=cache, window=5)
    with pytest.raises(ValueError):
        net(torch.randn(2, 1, 5, 32), cache=cache)


def test_spatial_mask_blocks_influence():
    """A key token no other query may attend (the dynamics agent token) influences only itself."""
    net = make()
    s = 6
    mask = torch.ones(s, s, dtype=torch.bool)
    mask[: s - 1, s - 1] = False
    x = torch.randn(2, 4, s, 32)
    x2 = x.clone()
    x2[:, :, s - 1] += torch.randn_like(x2[:, :, s - 1])
    y, y2 = net(x, spatial_mask=mask), net(x2, spatial_mask=mask)
    assert torch.allclose(y[:, :, : s - 1], y2[:, :, : s - 1], atol=ATOL)
    assert not torch.allclose(y[:, :, s - 1], y2[:, :, s - 1], atol=1e-3)
    # ...while the agent token does see everything else
    x3 = x.clone()
    x3[:, :, 0] += 1.0
    assert not torch.allclose(net(x3, spatial_mask=mask)[:, :, s - 1], y[:, :, s - 1], atol=1e-3)


@pytest.mark.parametrize("softcap", [0.0, 50.0])
def test_fully_masked_spatial_row_no_nan(softcap):
    net = make(softcap=softcap)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    x = torch.randn(1, 3, 5, 32, requires_grad=True)
    y = net(x, spatial_mask=mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_gqa_fewer_params_and_backward():
    full, gqa = make(kv_heads=4), make(kv_heads=1)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(gqa) < n(full)
    gqa.train()
    gqa(torch.randn(2, 3, 5, 32)).square().mean().backward()
    assert all(p.grad is not None for p in gqa.parameters())
