"""``worldflow train tokenizer``: fit the causal video tokenizer on episode clips.

Held-out PSNR/SSIM are logged every ``eval_every`` steps, with a reconstruction video
(ground truth | reconstruction | difference) of held-out clips written to ``<run>/tokenizer/media``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worldflow.config import Config, to_dict, warn_if_window_exceeds_training
from worldflow.data.checks import check_datasets
from worldflow.data.clips import load_clips
from worldflow.data.mixture import load_mixture
from worldflow.distributed import device_of
from worldflow.eval.reconstruction import evaluate_tokenizer
from worldflow.eval.visual import comparison_video, write_media
from worldflow.run import record_dataset, start_phase
from worldflow.tokenizer.model import TokenizerTraining
from worldflow.train.trainer import Trainer

PHASE = "tokenizer"


def train(cfg: Config, data, run: str | Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer on one dataset directory or several (``data``: a path or a list; drawn as
    ``data.mix`` says, worldflow.data.mixture); held-out metrics come from the first. Returns the trainer
    summary with the final held-out metrics."""
    from worldflow.eval.rollouts import reader_of

    clips = {"tokenizer.clip_len": cfg.tokenizer.clip_len, "data.clip_len": cfg.data.clip_len}
    roots = check_datasets(data, cfg, clips, run)  # before anything is written to the run
    phase_dir = start_phase(run, PHASE, cfg)
    record_dataset(run, roots)
    torch.manual_seed(cfg.train_tokenizer.seed)
    device = device_of(cfg)
    train_bank = load_mixture(roots, cfg.data, split="train", progress=progress)
    held = load_clips(roots[0], cfg.data, split="heldout", progress=progress)
    clip_len = cfg.tokenizer.clip_len
    warn_if_window_exceeds_training("tokenizer", cfg.tokenizer.context, clip_len)
    eval_frames = held.fixed_clips(n=32, clip_len=cfg.data.clip_len).to(device)
    reader = reader_of(roots[0])
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
