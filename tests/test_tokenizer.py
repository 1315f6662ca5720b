"""Causal tokenizer: causality, streaming, masking, attention rules, overfitting, loss normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from worldflow.config import load_config
from worldflow.tokenizer.lpips import LPIPSVGG, load_lpips
from worldflow.tokenizer.model import CausalTokenizer, RunningRMS, TokenizerLoss

SIZE = 16


def tiny_cfg(**kw):
    return dataclasses.replace(load_config("tiny").tokenizer, **kw)


def make(seed=0, layout="learned", **kw) -> CausalTokenizer:
    """The tiny tokenizer; ``layout="patch"`` gives one latent per patch (N_l = P)."""
    torch.manual_seed(seed)
    if layout == "patch":
        kw = {"latent_layout": "patch", "latent_tokens": (SIZE // tiny_cfg().patch) ** 2, **kw}
    return CausalTokenizer(tiny_cfg(**kw), SIZE).eval()


LAYOUTS = pytest.mark.parametrize("layout", ["learned", "patch"])


def moving_squares(n=4, t=6, size=SIZE, side=5, seed=1) -> torch.Tensor:
    """n clips (n, t, size, size, 3) float [0, 1]: one coloured square bouncing on black."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, t, size, size, 3)
    for i in range(n):
        x, y = torch.randint(0, size - side, (2,), generator=g).tolist()
        vx, vy = torch.randint(-2, 3, (2,), generator=g).tolist()
        col = torch.rand(3, generator=g) * 0.7 + 0.3
        for f in range(t):
            out[i, f, y : y + side, x : x + side] = col
            if not 0 <= x + vx <= size - side:
                vx = -vx
            if not 0 <= y + vy <= size - side:
                vy = -vy
            x, y = x + vx, y + vy
    return out


def psnr(a, b):
    return float(-10 * torch.log10((a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------------------ API


def test_shapes_ranges_and_input_formats():
    tok = make()
    frames = torch.randint(0, 256, (2, 3, SIZE, SIZE, 3), dtype=torch.uint8)
    z = tok.encode(frames)
    assert z.shape == (2, 3, *tok.latent_shape) == (2, 3, 4, 8)
    assert torch.allclose(z, tok.encode(frames.float() / 255.0), atol=1e-6)  # uint8 == float [0, 1]
    x = tok.decode(z)
    assert x.shape == (2, 3, SIZE, SIZE, 3) and x.min() >= 0 and x.max() <= 1
    assert tok.decode_uint8(z).dtype == torch.uint8
    with pytest.raises(ValueError):
        tok.encode(torch.zeros(1, 1, 12, 12, 3))


@LAYOUTS
def test_latents_strictly_inside_unit_interval(layout):
    tok = make(layout=layout)
    extreme = torch.cat([torch.zeros(1, 2, SIZE, SIZE, 3), torch.ones(1, 2, SIZE, SIZE, 3)], 1)
    for frames in (torch.rand(2, 4, SIZE, SIZE, 3), extreme):
        z = tok.encode(frames)
        assert z.abs().max() < 1.0


@LAYOUTS
def test_causality_of_latents_and_reconstructions(layout):
    tok = make(layout=layout)
    x = torch.rand(2, 6, SIZE, SIZE, 3)
    x2 = x.clone()
    x2[:, 3] = torch.rand_like(x2[:, 3])
    a, b = tok(x), tok(x2)
    for key in ("latents", "recon"):
        assert torch.allclose(a[key][:, :3], b[key][:, :3], atol=1e-5), key
        assert not torch.allclose(a[key][:, 3:], b[key][:, 3:], atol=1e-4), key
    z = tok.encode(x)
    z2 = z.clone()
    z2[:, 4] = -z2[:, 4]
    assert torch.allclose(tok.decode(z)[:, :4], tok.decode(z2)[:, :4], atol=1e-5)


@LAYOUTS
def test_streaming_equals_whole_clip_beyond_window(layout):
    tok = make(layout=layout, context=3)
    x = torch.rand(2, 8, SIZE, SIZE, 3)
    z = tok.encode(x)
    enc = tok.new_encode_cache(2)
    z_stream = torch.stack([tok.encode_step(x[:, t], enc) for t in range(8)], 1)
    assert torch.allclose(z_stream, z, atol=1e-5)
    dec = tok.new_decode_cache(2)
    x_stream = torch.stack([tok.decode_step(z[:, t], dec) for t in range(8)], 1)
    assert torch.allclose(x_stream, tok.decode(z), atol=1e-5)
    assert enc.k[0].shape[2] == enc.slots == 2 * 2 + 2  # bounded: 2 (context - 1) slots to slide + 2 working


@LAYOUTS
def test_masking_only_in_training_mode(layout):
    tok = make(layout=layout)
    x = torch.rand(2, 4, SIZE, SIZE, 3)
    a, b = tok(x, mask=True), tok(x, mask=True)  # eval mode: mask ignored
    assert not a["patch_mask"].any()
    assert torch.equal(a["recon"], b["recon"])
    assert torch.allclose(a["latents"], tok.encode(x), atol=1e-6)
    tok.train()
    c, d = tok(x, mask=True), tok(x, mask=True)
    assert c["patch_mask"].any() and not torch.equal(c["patch_mask"], d["patch_mask"])
    assert not torch.allclose(c["recon"], d["recon"])
    assert torch.allclose(tok(x, mask=False)["recon"], a["recon"], atol=1e-6)  # no mask = eval result
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(tok(x, generator=g1)["recon"], tok(x, generator=g2)["recon"])  # reproducible


# ---------------------------------------------------------------------------------------- attention rules


def test_encoder_patches_do_not_see_latents():
    tok = make()
    x = torch.rand(1, 3, SIZE, SIZE, 3) * 2 - 1
    h = tok.encoder_tokens(x)
    with torch.no_grad():
        tok.latent_tokens.add_(torch.randn_like(tok.latent_tokens))
    h2 = tok.encoder_tokens(x)
    p = tok.num_patches
    assert torch.allclose(h[:, :, :p], h2[:, :, :p], atol=1e-6)
    assert not torch.allclose(h[:, :, p:], h2[:, :, p:], atol=1e-3)


def test_decoder_latents_do_not_see_patch_queries():
    tok = make()
    z = torch.rand(1, 3, *tok.latent_shape) * 2 - 1
    h = tok.decoder_tokens(z)
    with torch.no_grad():
        tok.patch_queries.add_(torch.randn_like(tok.patch_queries))
    h2 = tok.decoder_tokens(z)
    p = tok.num_patches
    assert torch.allclose(h[:, :, p:], h2[:, :, p:], atol=1e-6)
    assert not torch.allclose(h[:, :, :p], h2[:, :, :p], atol=1e-3)
    # and the patch queries do read the latents
    assert not torch.allclose(tok.decoder_tokens(-z)[:, :, :p], h2[:, :, :p], atol=1e-3)


def test_patch_layout_has_one_latent_per_patch_and_names_a_wrong_count():
    tok = make(layout="patch")
    z = tok.encode(torch.rand(2, 3, SIZE, SIZE, 3))
    assert z.shape == (2, 3, tok.num_patches, tok.cfg.latent_dim)
    assert not hasattr(tok, "latent_tokens") and not hasattr(tok, "patch_queries")  # no unused weights
    with pytest.raises(ValueError, match=f"tokenizer.latent_tokens={tok.num_patches}"):
        make(latent_layout="patch", latent_tokens=tok.num_patches + 1)
    auto = tiny_cfg(latent_layout="patch", latent_tokens=0)  # 0 = one per patch, at any frame size
    for size in (SIZE, 2 * SIZE):
        assert CausalTokenizer(auto, size).latent_shape == ((size // auto.patch) ** 2, auto.latent_dim)
        assert auto.num_latents(size) == (size // auto.patch) ** 2
    assert tok.tokens_per_frame == tok.num_patches and make().tokens_per_frame == make().num_patches + 4


def test_patch_layout_latents_carry_their_patch():
    """A patch's content reaches its own latent most strongly at initialisation: the residual stream
    carries it there, which is why this layout learns in few steps (docs/tokenizer.md)."""
    tok = make(layout="patch")
    x = torch.rand(1, 1, SIZE, SIZE, 3)
    z = tok.bottleneck(tok.encoder_tokens(x * 2 - 1))
    p = tok.cfg.patch
    x2 = x.clone()
    x2[:, :, :p, :p] = 1 - x2[:, :, :p, :p]  # change patch 0 only
    dz = (tok.bottleneck(tok.encoder_tokens(x2 * 2 - 1)) - z).abs().sum(-1)[0, 0]  # (P,)
    assert dz.argmax() == 0 and dz[0] > 2 * dz[1:].max()


# ------------------------------------------------------------------------------------------- training


@LAYOUTS
def test_tiny_tokenizer_overfits_moving_squares(layout):
    """Capacity/optimisation check: 2 clips of 6 16x16 frames of moving squares (the tokenizer's whole
    temporal window), tiny preset, 300 Adam steps (~6 s on one core). An untrained tokenizer scores ~15 dB;
    seeds 0-7 all reach > 28 dB in 300 steps (seed 0: ~40 dB)."""
    tok = make(seed=0, layout=layout)
    clips = moving_squares(n=2)
    loss_fn = TokenizerLoss(tok.cfg)
    opt = torch.optim.AdamW(tok.parameters(), lr=5e-3, weight_decay=0.0, betas=(0.9, 0.95))
    tok.train()
    for step in range(300):
        for g in opt.param_groups:
            g["lr"] = 5e-3 * min(1.0, (step + 1) / 20)  # short warm-up, as the trainer does
        out = tok(clips, mask=False)  # masking is a regulariser; this test measures fitting
        loss, _ = loss_fn(out["recon"], clips)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
    tok.eval()
    with torch.no_grad():
        z = tok.encode(clips)
        recon = tok.decode(z)
    assert z.abs().max() < 1.0
    assert psnr(recon, clips) > 25.0


# ----------------------------------------------------------------------------------------------- loss


def test_loss_normalisation_constant_error_tends_to_one():
    cfg = tiny_cfg(rms_decay=0.9)
    loss_fn = TokenizerLoss(cfg).train()
    target = torch.rand(2, 3, SIZE, SIZE, 3)
    sign = torch.where(torch.rand_like(target) > 0.5, 1.0, -1.0)
    for c in (0.1, 0.02):  # a constant-magnitude error, then a jump to another magnitude
        recon = target + c * sign
        for _ in range(150):
            loss, terms = loss_fn(recon, target)
        assert torch.allclose(terms["mse"], torch.tensor(c**2), rtol=1e-4)
        assert torch.allclose(terms["mse_rms"], terms["mse"], rtol=1e-3)  # RMS of a constant = itself
        assert abs(float(loss) - 1.0) < 1e-3
    assert "lpips" not in terms  # lpips_path empty -> term absent


def test_hard_patch_term_is_the_mean_of_each_frames_worst_patches():
    """tokenizer.hard_patch_weight adds mean_{b,t} mean_{k worst patches} MSE_patch over its running RMS;
    checked against a loop over frames and patches. Off (weight 0), the loss and its buffers are as before."""
    cfg = tiny_cfg(hard_patch_weight=0.5, hard_patch_frac=0.25)  # 16x16 frames, patch 4: 16 patches, k = 4
    loss_fn = TokenizerLoss(cfg).train()
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, SIZE, SIZE, 3, generator=gen)
    recon = torch.rand(2, 3, SIZE, SIZE, 3, generator=gen)
    loss, terms = loss_fn(recon, target)
    p, worst = cfg.patch, []
    for b in range(2):
        for t in range(3):
            err = (recon[b, t] - target[b, t]) ** 2
            per_patch = sorted(err[i:i + p, j:j + p].mean().item()
                               for i in range(0, SIZE, p) for j in range(0, SIZE, p))
            worst.append(sum(per_patch[-4:]) / 4)
    hard = sum(worst) / len(worst)
    assert terms["hard_mse"].item() == pytest.approx(hard, rel=1e-5)
    mse = ((recon - target) ** 2).mean().item()
    want = mse / terms["mse_rms"].item() + 0.5 * hard / terms["hard_rms"].item()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(1.5, rel=1e-4)  # first step: each RMS equals its term
    off = TokenizerLoss(tiny_cfg())
    assert "hard_mse" not in off(recon, target)[1] and not any("hard" in k for k in off.state_dict())


def test_hard_patch_linear_schedule_falls_to_zero_and_follows_the_checkpointed_step():
    cfg = tiny_cfg(hard_patch_weight=2.0, hard_patch_schedule="linear", hard_patch_steps=4)
    loss_fn = TokenizerLoss(cfg).train()
    x = torch.rand(1, 2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    weights = [float(loss_fn(x * 0.9, x)[1]["hard_weight"]) for _ in range(6)]
    assert weights == pytest.approx([1.5, 1.0, 0.5, 0.0, 0.0, 0.0])  # 2 * (1 - step / 4), step = 1, 2, ...
    resumed = TokenizerLoss(cfg).train()
    resumed.load_state_dict({k: v for k, v in loss_fn.state_dict().items()})
    assert float(resumed(x * 0.9, x)[1]["hard_weight"]) == 0.0  # the step came back with the buffers


def test_running_rms_tracks_ema_of_squares_and_freezes_in_eval():
    rms = RunningRMS(0.9).train()
    vals = torch.rand(50) * 3
    ema, n = 0.0, 0
    for v in vals:
        out = rms(v)
        n += 1
        ema = 0.9 * ema + 0.1 * float(v) ** 2
        assert abs(float(out) - (ema / (1 - 0.9**n)) ** 0.5) < 1e-4
    rms.eval()
    before = float(rms.value())
    rms(torch.tensor(100.0))
    assert float(rms.value()) == before
    assert float(RunningRMS(0.9).value()) == 1.0  # no statistics yet -> no normalisation
    assert {"mean_sq", "count"} <= set(rms.state_dict())  # restored by checkpoints


def test_loss_gradient_is_normalised():
    loss_fn = TokenizerLoss(tiny_cfg()).train()
    target = torch.rand(1, 2, SIZE, SIZE, 3)
    recon = (target + 0.3).requires_grad_(True)
    loss, _ = loss_fn(recon, target)
    loss.backward()
    # d/dx [mse / rms] with rms = mse (first step): 2 (x - t) / (N mse)
    n = target.numel()
    assert torch.allclose(recon.grad, 2 * 0.3 / (n * 0.09) * torch.ones_like(recon), rtol=1e-3)


# ---------------------------------------------------------------------------------------------- LPIPS


class _ToyLPIPS(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean(dim=(1, 2, 3))


def test_lpips_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lpips_path"):
        TokenizerLoss(tiny_cfg(lpips_path=str(tmp_path / "nope.safetensors")))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_lpips_full_module_term(tmp_path, fmt):
    if fmt == "torchscript":
        path = tmp_path / "lpips.pt"
        torch.jit.save(torch.jit.script(_ToyLPIPS()), str(path))
    else:
        path = tmp_path / "lpips.pt2"
        ex = (torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE))  # distinct: no aliasing
        torch.export.save(torch.export.export(_ToyLPIPS(), ex), str(path))
    loss_fn = TokenizerLoss(tiny_cfg(lpips_path=str(path))).train()
    target = torch.rand(1, 2, SIZE, SIZE, 3)
    recon = (target + 0.1).requires_grad_(True)
    loss, terms = loss_fn(recon, target)
    assert torch.allclose(terms["lpips"], torch.tensor(0.2), atol=1e-5)  # |0.1 * 2| on [-1, 1] images
    assert torch.allclose(loss, torch.tensor(1.0 + 0.2), atol=1e-4)  # both terms normalised to 1
    loss.backward()
    assert recon.grad is not None
    assert not any("lpips." in k for k in loss_fn.state_dict())  # frozen weights stay out of checkpoints


def test_lpips_vgg_state_dict_layout_roundtrip(tmp_path):
    """The lpips-package key layout (net.sliceK.i.*, linK.model.1.weight) loads into LPIPSVGG."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = LPIPSVGG()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("lins.")}
    sd.update({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(ref.lins)})
    path = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_lpips(path)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loaded(x, y), ref(x, y), atol=1e-5)
    assert torch.allclose(loaded(x, x), torch.zeros(2), atol=1e-6)
    del sd["lin0.model.1.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError, match="lacks"):
        load_lpips(path)
