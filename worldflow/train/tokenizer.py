"""``worldflow train tokenizer``: fit the causal video tokenizer on episode clips.

Held-out PSNR/SSIM are logged every ``eval_every`` steps, with a reconstruction video
(ground truth | reconstruction | difference) of held-out clips written to ``<run>/tokenizer/media``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from worldflow.agent.model import record_dataset
from worldflow.checkpoint import load_weights
from worldflow.config import Config, to_dict, warn_if_window_exceeds_training
from worldflow.data.clips import ClipBank
from worldflow.eval.metrics import object_match, psnr, ssim
from worldflow.eval.visual import comparison_video, write_media
from worldflow.runs import device_of, phase_checkpoint, phase_config, resolve_config, start_phase
from worldflow.tokenizer.model import CausalTokenizer, TokenizerLoss
from worldflow.train.trainer import Trainer, status_note

PHASE = "tokenizer"


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


def load_tokenizer(run: str | Path, device: torch.device | str = "cpu") -> tuple[CausalTokenizer, Config]:
    """The trained tokenizer of a run (eval mode, frozen) and the config it was trained with."""
    cfg = phase_config(run, PHASE)
    wrap = TokenizerTraining(cfg)
    load_weights(wrap, phase_checkpoint(run, PHASE))
    tok = wrap.tokenizer.to(device).eval().requires_grad_(False)
    return tok, cfg


@torch.no_grad()
def evaluate_tokenizer(tok: CausalTokenizer, frames: torch.Tensor, batch: int = 16, reader=None
                       ) -> dict[str, Any]:
    """Reconstruction PSNR/SSIM of uint8 clips (N, T, H, W, 3); returns means and the reconstructions.

    With an object reader (worldflow.envs.object_reader) also ``objects``: {object: fraction of frames
    whose reconstructed object cells equal the true ones}. PSNR alone hides a lost sprite: a missing 8×8
    ball costs 64 of 4096 pixels, so a tokenizer can score 33 dB and still drop the ball in a third of
    the frames (measured on Catch, session 10).
    """
    was_training = tok.training
    tok.eval()
    recons = []
    for i in range(0, len(frames), batch):
        x = frames[i : i + batch]
        recons.append(tok.decode(tok.encode(x)))
    tok.train(was_training)
    recon = torch.cat(recons)
    target = frames.float() / 255.0
    out = {"recon_psnr": float(psnr(recon, target).mean()), "recon_ssim": float(ssim(recon, target).mean()),
           "recon": recon}
    if reader is not None:
        match = object_match(reader(recon.cpu().numpy()), reader(frames.cpu().numpy()), lead=2)
        out["objects"] = {k: float(m.mean()) for k, m in match.items()}
    return out


def train(cfg: Config, data: str | Path, run: str | Path, resume: bool = True, progress: bool = True
          ) -> dict[str, Any]:
    """Train the tokenizer; returns the trainer summary with the final held-out metrics."""
    from worldflow.eval.rollouts import reader_of

    phase_dir = start_phase(run, PHASE, cfg)
    record_dataset(run, data)
    torch.manual_seed(cfg.train_tokenizer.seed)
    device = device_of(cfg)
    train_bank = ClipBank.load(data, cfg.data, split="train", progress=progress)
    held = ClipBank.load(data, cfg.data, split="heldout", progress=progress)
    clip_len = cfg.tokenizer.clip_len or cfg.data.clip_len
    warn_if_window_exceeds_training("tokenizer", cfg.tokenizer.context, clip_len)
    eval_frames = held.fixed_clips(n=32, clip_len=cfg.data.clip_len).to(device)
    reader = reader_of(data)
    model = TokenizerTraining(cfg).to(device)
    trainer = Trainer(model, cfg.train_tokenizer, run, PHASE, to_dict(cfg), progress=progress)

    def batch_fn(gen: torch.Generator) -> torch.Tensor:
        return train_bank.sample(cfg.train_tokenizer.batch, clip_len, gen)["frames"].to(device)

    def loss_fn(m: TokenizerTraining, frames: torch.Tensor, gen: torch.Generator):
        return m(frames, gen)

    def eval_fn(step: int) -> dict[str, float]:
        res = evaluate_tokenizer(model.tokenizer, eval_frames, reader=reader)
        video = comparison_video(eval_frames[:4], res["recon"][:4])
        write_media(video, phase_dir / "media" / f"recon_{step:07d}")
        objects = {f"recon_{k}_accuracy": v for k, v in res.get("objects", {}).items()}
        return {"recon_psnr": res["recon_psnr"], "recon_ssim": res["recon_ssim"], **objects}

    return trainer.fit(batch_fn, loss_fn, eval_fn, resume=resume)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    summary = train(cfg, args.data, args.run, resume=not args.no_resume, progress=not args.no_progress)
    ev = summary["eval"]
    print(f"tokenizer: step {summary['step']}, held-out PSNR {ev.get('recon_psnr', float('nan')):.2f} dB, "
          f"SSIM {ev.get('recon_ssim', float('nan')):.4f}, {summary['minutes']:.1f} min"
          f"{status_note(summary)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worldflow.cli.main import add_train_args

    p = sub.add_parser("tokenizer", help="train the causal video tokenizer",
                       description="Train the causal video tokenizer on a collected dataset.")
    add_train_args(p, "run directory (created; resumed if it has checkpoints)")
    p.set_defaults(func=main)
