"""Causal video tokenizer (Dreamer 4): frames <-> tanh-bounded latent tokens, one frame at a time.

Per frame the encoder sees P patch tokens (+ learned position embeddings) followed by N_l learned latent
tokens; the decoder sees P learned patch-query tokens followed by the N_l latents projected back to model
width. Both are :class:`~worldflow.nn.SpaceTimeTransformer` stacks (block-causal in time, sliding window
``cfg.context`` frames) with these spatial attention rules (True = row may attend column)::

    encoder        keys: patches  latents          decoder        keys: queries  latents
    query patches         yes      no              query patches          yes      yes
    query latents         yes      yes             query latents          no       yes

Temporal attention is per token position, so these rules also hold across frames. With
``cfg.latent_layout = "patch"`` (not in Dreamer 4) there are no separate latent tokens or patch queries:
each patch's encoder output is its latent (N_l = P) and the decoder sees the P latents at their patch
positions, all attending to all (a ViT autoencoder). Pixels are predicted
in [-1, 1] by a linear head with no output activation (a tanh would have vanishing gradients exactly at
the saturated black/white pixels that synthetic frames are full of); :meth:`CausalTokenizer.decode`
clamps. See docs/tokenizer.md.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from worldflow import rng
from worldflow.config import Config, TokenizerConfig
from worldflow.data.pixels import to_signed, to_uint8, to_unit
from worldflow.distributed import rows_of
from worldflow.nn import KVCache, SpaceTimeTransformer

__all__ = ["CausalTokenizer", "TokenizerLoss", "RunningRMS"]


def to_patches(x: Tensor, p: int) -> Tensor:
    """(B, T, H, W, C) -> (B, T, P, p*p*C): non-overlapping p x p patches, row-major."""
    return rearrange(x, "b t (gh p1) (gw p2) c -> b t (gh gw) (p1 p2 c)", p1=p, p2=p)


def spatial_masks(patches: int, latents: int) -> tuple[Tensor, Tensor]:
    """Encoder and decoder (S, S) attention masks for token order [patches, latents], S = P + N_l."""
    s = patches + latents
    is_patch = torch.arange(s) < patches
    enc = ~(is_patch[:, None] & ~is_patch[None, :])  # patch queries never see latent keys
    dec = ~(~is_patch[:, None] & is_patch[None, :])  # latent queries never see patch-query keys
    return enc, dec


class CausalTokenizer(nn.Module):
    """Block-causal masked-autoencoding video tokenizer.

    Frames are channel-last: uint8 (B, T, H, W, 3) in [0, 255] or float in [0, 1]; H = W = image_size,
    divisible by ``cfg.patch``. Latents are float (B, T, N_l, D_b) in (-1, 1) (tanh), N_l =
    ``cfg.num_latents(image_size)``, D_b = ``cfg.latent_dim``.
    """

    def __init__(self, cfg: TokenizerConfig, image_size: int):
        super().__init__()
        if image_size % cfg.patch:
            raise ValueError(f"image size {image_size} is not divisible by patch {cfg.patch}")
        self.cfg, self.image_size = cfg, image_size
        self.grid = image_size // cfg.patch
        self.num_patches = self.grid**2
        patch_dim = cfg.patch * cfg.patch * 3
        width = cfg.transformer.width
        n_l = cfg.num_latents(image_size)

        self.learned = cfg.latent_layout == "learned"
        if not self.learned and n_l != self.num_patches:
            raise ValueError(f"tokenizer.latent_layout=patch needs one latent per patch: set "
                             f"tokenizer.latent_tokens={self.num_patches} or 0 (got {n_l})")
        # Latents sit after the patches in the token order; in the patch layout they are the patches.
        self.latent_start = self.num_patches if self.learned else 0

        # encoder side
        self.patch_in = nn.Linear(patch_dim, width)
        self.patch_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        if self.learned:
            self.latent_tokens = nn.Parameter(torch.randn(n_l, width) * 0.02)
        self.encoder = SpaceTimeTransformer(cfg.transformer)
        self.to_latent = nn.Linear(width, cfg.latent_dim)
        # decoder side
        self.from_latent = nn.Linear(cfg.latent_dim, width)
        self.latent_pos = nn.Parameter(torch.randn(n_l, width) * 0.02)
        if self.learned:
            self.patch_queries = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.decoder = SpaceTimeTransformer(cfg.transformer)
        self.patch_out = nn.Linear(width, patch_dim)

        enc, dec = spatial_masks(self.num_patches, n_l) if self.learned else (None, None)
        self.register_buffer("enc_mask", enc, persistent=False)
        self.register_buffer("dec_mask", dec, persistent=False)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(N_l, D_b): latent tokens per frame and channels per token."""
        return self.latent_pos.shape[0], self.cfg.latent_dim

    @property
    def tokens_per_frame(self) -> int:
        """S: transformer tokens per frame, P + N_l (learned layout) or P (patch layout)."""
        return self.latent_start + self.latent_pos.shape[0]

    # ----------------------------------------------------------------------------------- pixels <-> patches

    def patchify(self, x: Tensor) -> Tensor:
        """(B, T, H, W, 3) -> (B, T, P, patch*patch*3)."""
        if x.shape[-3:] != (self.image_size, self.image_size, 3):
            n = self.image_size
            raise ValueError(f"expected frames (..., {n}, {n}, 3), got {tuple(x.shape)}")
        return to_patches(x, self.cfg.patch)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, P, patch*patch*3) -> (B, T, H, W, 3)."""
        p = self.cfg.patch
        return rearrange(x, "b t (gh gw) (p1 p2 c) -> b t (gh p1) (gw p2) c", gh=self.grid, p1=p, p2=p)

    # ------------------------------------------------------------------------------------------ internals

    def sample_patch_mask(self, b: int, t: int, device: torch.device,
                          generator: torch.Generator | None = None) -> Tensor:
        """Masked autoencoding: per frame p ~ U(0, mask_max), each patch masked w.p. p -> bool (B, T, P).

        Drawn for the global batch and cut to this batch's rows (the whole batch outside data-parallel
        training, see worldflow.distributed.rows_of)."""
        rows = rows_of(b)
        p = rng.rand((rows.total, t, 1), generator, device) * self.cfg.mask_max
        u = rng.rand((rows.total, t, self.num_patches), generator, device)
        return rows.take(u) < rows.take(p)

    def encoder_tokens(self, x: Tensor, patch_mask: Tensor | None = None,
                       cache: KVCache | None = None) -> Tensor:
        """Signed frames (B, T, H, W, 3) -> encoder outputs (B, T, S, width); S = P + N_l (patch layout P)."""
        emb = self.patch_in(self.patchify(x))
        if patch_mask is not None:  # replace the content, keep the position: MAE-style
            emb = torch.where(patch_mask[..., None], self.mask_token.to(emb.dtype), emb)
        tokens = emb + self.patch_pos
        if self.learned:
            b, t = emb.shape[:2]
            lat = self.latent_tokens.to(emb.dtype).expand(b, t, -1, -1)
            tokens = torch.cat((tokens, lat), dim=2)
        return self.encoder(tokens, spatial_mask=self.enc_mask, window=self._window(cache), cache=cache)

    def bottleneck(self, h: Tensor) -> Tensor:
        """Encoder outputs (B, T, S, width) -> latents (B, T, N_l, D_b) in (-1, 1), float32.

        tanh runs in float32 even under bf16 autocast: bf16 would round |z| > 0.996 to exactly 1.
        """
        return torch.tanh(self.to_latent(h[:, :, self.latent_start :]).float())

    def decoder_tokens(self, latents: Tensor, cache: KVCache | None = None) -> Tensor:
        """Latents (B, T, N_l, D_b) -> decoder outputs (B, T, S, width); the first P rows are the patches."""
        if latents.shape[-2:] != self.latent_shape:
            raise ValueError(f"expected latents (..., {self.latent_shape}), got {tuple(latents.shape)}")
        tokens = self.from_latent(latents) + self.latent_pos
        if self.learned:
            b, t = tokens.shape[:2]
            q = self.patch_queries.to(tokens.dtype).expand(b, t, -1, -1)
            tokens = torch.cat((q, tokens), dim=2)
        return self.decoder(tokens, spatial_mask=self.dec_mask, window=self._window(cache), cache=cache)

    def predict_pixels(self, latents: Tensor, cache: KVCache | None = None) -> Tensor:
        """Latents (B, T, N_l, D_b) -> unclamped pixels (B, T, H, W, 3) on the [-1, 1] scale."""
        h = self.decoder_tokens(latents, cache)
        return self.unpatchify(self.patch_out(h[:, :, : self.num_patches]))

    def _window(self, cache: KVCache | None) -> int | None:
        return None if cache is not None else self.cfg.context  # a cache carries its own window

    # --------------------------------------------------------------------------------------------- API

    def forward(self, frames: Tensor, mask: bool = True, generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
        """Training pass: frames (B, T, H, W, 3) uint8 or float [0, 1] ->

        - ``recon``: (B, T, H, W, 3) float on the [0, 1] scale, *unclamped* (for the loss);
        - ``latents``: (B, T, N_l, D_b) in (-1, 1);
        - ``patch_mask``: (B, T, P) bool, the patches replaced by the mask token.
        Patches are masked only if ``mask`` and the module is in training mode; randomness comes from
        ``generator`` when given (exact resume).
        """
        x = to_signed(frames)
        b, t = x.shape[:2]
        patch_mask = None
        if mask and self.training and self.cfg.mask_max > 0:
            patch_mask = self.sample_patch_mask(b, t, x.device, generator)
        latents = self.bottleneck(self.encoder_tokens(x, patch_mask))
        recon = (self.predict_pixels(latents) + 1.0) * 0.5
        if patch_mask is None:
            patch_mask = torch.zeros(b, t, self.num_patches, dtype=torch.bool, device=x.device)
        return {"recon": recon, "latents": latents, "patch_mask": patch_mask}

    def encode(self, frames: Tensor, cache: KVCache | None = None) -> Tensor:
        """Frames (B, T, H, W, 3), uint8 or float [0, 1] -> latents (B, T, N_l, D_b) in (-1, 1).

        Never masks. With a cache (:meth:`new_encode_cache`) the frames continue the cached stream.
        """
        return self.bottleneck(self.encoder_tokens(to_signed(frames), cache=cache))

    def decode(self, latents: Tensor, cache: KVCache | None = None) -> Tensor:
        """Latents (B, T, N_l, D_b) -> frames (B, T, H, W, 3) float in [0, 1] (clamped)."""
        return ((self.predict_pixels(latents, cache) + 1.0) * 0.5).clamp(0.0, 1.0)

    def decode_uint8(self, latents: Tensor, cache: KVCache | None = None) -> Tensor:
        """Latents (B, T, N_l, D_b) -> frames (B, T, H, W, 3) uint8."""
        return to_uint8(self.decode(latents, cache))

    def new_encode_cache(self, batch: int) -> KVCache:
        """Empty streaming cache for :meth:`encode_step` (window ``cfg.context`` frames, bounded)."""
        return self.encoder.new_cache(batch, self.cfg.context)

    def new_decode_cache(self, batch: int) -> KVCache:
        """Empty streaming cache for :meth:`decode_step` (window ``cfg.context`` frames, bounded)."""
        return self.decoder.new_cache(batch, self.cfg.context)

    def encode_step(self, frame: Tensor, cache: KVCache) -> Tensor:
        """One frame (B, H, W, 3) -> its latents (B, N_l, D_b); appends it to ``cache``."""
        return self.encode(frame[:, None], cache)[:, 0]

    def decode_step(self, latents: Tensor, cache: KVCache) -> Tensor:
        """One frame's latents (B, N_l, D_b) -> frame (B, H, W, 3) in [0, 1]; appends it to ``cache``."""
        return self.decode(latents[:, None], cache)[:, 0]


# ------------------------------------------------------------------------------------------------ loss


class RunningRMS(nn.Module):
    """Running root-mean-square of a scalar loss term: ``sqrt(EMA(value^2))`` with decay ``decay``.

    Updated only in training mode, on the detached value; bias-corrected like Adam's moments
    (divided by ``1 - decay^n``) so the estimate is exact from the first step for a constant term.
    Before any update it reads 1 (no normalisation).
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("mean_sq", torch.zeros((), dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, value: Tensor) -> None:
        self.count += 1
        self.mean_sq.mul_(self.decay).add_((1.0 - self.decay) * value.detach().float().square())

    def value(self) -> Tensor:
        corr = 1.0 - self.decay ** self.count.float()
        rms = (self.mean_sq / corr.clamp_min(1e-12)).sqrt()
        return torch.where(self.count > 0, rms, torch.ones_like(rms))

    def forward(self, value: Tensor) -> Tensor:
        """Update (in training mode) with a scalar term, return the detached running RMS (scalar)."""
        if self.training:
            self.update(value)
        return self.value()


class TokenizerLoss(nn.Module):
    """``MSE / rms_mse + lpips_weight * LPIPS / rms_lpips`` (Dreamer 4: each term over its running RMS).

    ``forward(recon, target) -> (loss, terms)``: recon (B, T, H, W, 3) float on the [0, 1] scale (the
    tokenizer's ``forward(...)["recon"]``), target the input frames (uint8 or float [0, 1]). MSE is the
    mean over all pixels and channels on the [0, 1] scale; LPIPS is the mean per-frame distance on
    [-1, 1] images. Each term is divided by ``rms + 1e-8`` where rms is the detached running RMS of that
    scalar term over training steps (:class:`RunningRMS`), so every term contributes gradients of unit
    typical scale whatever its raw magnitude. The LPIPS term exists only if ``cfg.lpips_path`` is set
    (a missing file raises FileNotFoundError; nothing downloads). ``terms`` holds detached scalars for
    logging: mse, psnr, mse_rms (and lpips, lpips_rms).
    """

    def __init__(self, cfg: TokenizerConfig, eps: float = 1e-8):
        super().__init__()
        self.lpips_weight, self.eps = cfg.lpips_weight, eps
        self.patch, self.hard_weight, self.hard_frac = cfg.patch, cfg.hard_patch_weight, cfg.hard_patch_frac
        self.hard_schedule, self.hard_steps = cfg.hard_patch_schedule, cfg.hard_patch_steps
        self.mse_rms = RunningRMS(cfg.rms_decay)
        if self.hard_weight > 0:  # only then: checkpoints without the term keep their exact keys
            self.hard_rms = RunningRMS(cfg.rms_decay)
        self.lpips_rms = RunningRMS(cfg.rms_decay)
        lp = None
        if cfg.lpips_path and cfg.lpips_weight > 0:
            from worldflow.tokenizer.lpips import load_lpips

            lp = load_lpips(cfg.lpips_path)
        # Plain attribute, not a submodule: frozen LPIPS weights stay out of checkpoints and optimisers.
        object.__setattr__(self, "lpips", lp)

    def forward(self, recon: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        recon, target = recon.float(), to_unit(target)
        mse = (recon - target).square().mean()
        mse_rms = self.mse_rms(mse)
        loss = mse / (mse_rms + self.eps)
        terms = {
            "mse": mse.detach(),
            "psnr": -10.0 * torch.log10(mse.detach().clamp_min(1e-10)),
            "mse_rms": mse_rms,
        }
        if self.hard_weight > 0:
            hard = self.hard_patch_mse(recon, target)
            hard_rms = self.hard_rms(hard)
            w = self.hard_weight_now()
            loss = loss + w * hard / (hard_rms + self.eps)
            terms.update(hard_mse=hard.detach(), hard_rms=hard_rms, hard_weight=w.detach())
        if self.lpips is not None:
            lp = self.lpips.to(recon.device)
            a = rearrange(recon * 2 - 1, "... h w c -> (...) c h w")
            b = rearrange(target * 2 - 1, "... h w c -> (...) c h w")
            dist = lp(a, b).mean()
            lp_rms = self.lpips_rms(dist)
            loss = loss + self.lpips_weight * dist / (lp_rms + self.eps)
            terms.update(lpips=dist.detach(), lpips_rms=lp_rms)
        return loss, terms


    def hard_weight_now(self) -> Tensor:
        """The worst-patches weight at this training step: constant, or falling linearly from
        ``hard_patch_weight`` to 0 over ``hard_patch_steps`` steps (the step is the running RMS's update
        count, so it is checkpointed with the loss and resumes exactly)."""
        w = torch.tensor(float(self.hard_weight))
        if self.hard_schedule == "linear":
            w = w * (1.0 - self.mse_rms.count.float() / max(1, self.hard_steps)).clamp(min=0.0)
        return w

    def hard_patch_mse(self, recon: Tensor, target: Tensor) -> Tensor:
        """Mean MSE of each frame's worst ``hard_frac`` of patches: (B, T, H, W, 3) pair -> scalar.

        A whole-frame MSE shrinks with an object's area (an 8x8 ball is 1.6% of a 64x64 frame), so a
        small moving object is the last thing learned; the worst patches are where it is missing.
        """
        err = to_patches((recon - target).square(), self.patch).mean(-1)  # (B, T, P)
        k = max(1, round(self.hard_frac * err.shape[-1]))
        return err.topk(k, dim=-1).values.mean()


class TokenizerTraining(torch.nn.Module):
    """The tokenizer plus its loss, trained and checkpointed together (the loss keeps running-RMS buffers
    that an exact resume must restore)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.tokenizer = CausalTokenizer(cfg.tokenizer, image_size=cfg.data.size)
        self.loss = TokenizerLoss(cfg.tokenizer)

    def forward(self, frames: torch.Tensor, gen: torch.Generator | None = None):
        out = self.tokenizer(frames, mask=True, generator=gen)
        return self.loss(out["recon"], frames)
