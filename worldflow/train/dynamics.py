"""``worldflow train dynamics``: fit the shortcut-forcing dynamics model on tokenized episodes.

The run's trained tokenizer encodes every episode once; the latents are cached in
``<run>/dynamics/latents_<split>.pt`` (keyed by dataset and tokenizer checkpoint) so a resumed or repeated
run skips the encoding. Held-out open-loop rollouts are scored every ``eval_every`` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from worldflow.checkpoint import load_weights
from worldflow.config import Config, to_dict, warn_if_window_exceeds_training
from worldflow.data.clips import ClipBank
from worldflow.dynamics import DynamicsModel, dynamics_loss
from worldflow.runs import device_of, phase_checkpoint, phase_config, resolve_config, start_phase
from worldflow.train.trainer import Trainer, status_note

PHASE = "dynamics"


def action_space_of(data: str | Path) -> gym.Space:
    from worldflow.data.episodes import load_manifest, space_from_dict

    return space_from_dict(load_manifest(data)["action_space"])


def build_dynamics(cfg: Config, action_space: gym.Space) -> DynamicsModel:
    return DynamicsModel(cfg.dynamics, latent_tokens=cfg.tokenizer.latent_tokens,
                         latent_dim=cfg.tokenizer.latent_dim, action_space=action_space)


def load_dynamics(run: str | Path, action_space: gym.Space, device: torch.device | str = "cpu"
                  ) -> tuple[DynamicsModel, Config]:
    cfg = phase_config(run, PHASE)
    model = build_dynamics(cfg, action_space)
    load_weights(model, phase_checkpoint(run, PHASE))
    return model.to(device).eval(), cfg


@torch.no_grad()
def encode_frames(tok, frames: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Latents (L, N, D) of one episode's uint8 frames (L, H, W, 3), streamed chunk by chunk."""
    device = next(tok.parameters()).device
    cache = tok.new_encode_cache(1)
    out = []
    for i in range(0, len(frames), chunk):
        x = frames[i : i + chunk].to(device)[None]
        out.append(tok.encode(x, cache=cache)[0].cpu())
    return torch.cat(out)


def latent_bank(run: str | Path, data: str | Path, cfg: Config, split: str, tok, progress: bool
                ) -> ClipBank:
    """The split's episodes as latents, from the cache when the dataset and tokenizer are unchanged."""
    from worldflow.data.episodes import load_manifest

    ckpt = phase_checkpoint(run, "tokenizer")
    key = hashlib.sha1(f"{Path(data).resolve()}|{ckpt.resolve()}|{len(load_manifest(data)['episodes'])}"
                       .encode()).hexdigest()[:12]
    path = Path(run) / PHASE / f"latents_{split}_{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return ClipBank(saved["episodes"], saved["ids"])
    frames = ClipBank.load(data, cfg.data, split=split, progress=progress)
    bank = frames.map(lambda f: encode_frames(tok, f), "frames", "latents", progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # unique: every torchrun process may write the cache
    torch.save({"episodes": bank.episodes, "ids": bank.ids}, tmp)
    tmp.replace(path)
    return bank


def train(cfg: Config, data: str | Path, run: str | Path, resume: bool = True, progress: bool = True
          ) -> dict[str, Any]:
    from worldflow.agent.model import record_dataset
    from worldflow.eval.rollouts import RolloutEvaluator, reader_of, with_frames
    from worldflow.train.tokenizer import load_tokenizer

    device = device_of(cfg)
    tok, tok_cfg = load_tokenizer(run, device)
    # The tokenizer fixes the latent shape and frame size: the dynamics model must agree with it.
    cfg.tokenizer, cfg.data.size = tok_cfg.tokenizer, tok_cfg.data.size
    start_phase(run, PHASE, cfg)
    record_dataset(run, data)
    torch.manual_seed(cfg.train_dynamics.seed)
    space = action_space_of(data)
    train_bank = latent_bank(run, data, cfg, "train", tok, progress)
    held_bank = with_frames(latent_bank(run, data, cfg, "heldout", tok, progress), data, cfg, progress)
    model = build_dynamics(cfg, space).to(device)
    trainer = Trainer(model, cfg.train_dynamics, run, PHASE, to_dict(cfg), progress=progress)
    dyn = cfg.dynamics
    warn_if_window_exceeds_training("dynamics", dyn.context,
                                    max(cfg.data.clip_len, dyn.long_len if dyn.long_every > 0 else 0))
    context = min(8, dyn.context)
    # score 16 predicted frames, or as many as the longest held-out episode allows
    horizon = max(1, min(16, int(held_bank.lengths.max()) - context))
    evaluator = RolloutEvaluator(tok, held_bank, cfg, device, context=context, horizon=horizon,
                                 reader=reader_of(data))

    def batch_fn(gen: torch.Generator) -> dict[str, torch.Tensor]:
        long = dyn.long_every > 0 and (trainer.step + 1) % dyn.long_every == 0
        length = dyn.long_len if long else cfg.data.clip_len
        b = train_bank.sample(cfg.train_dynamics.batch, length, gen)
        return {k: v.to(device) for k, v in b.items()}

    def loss_fn(m: DynamicsModel, b: dict[str, torch.Tensor], gen: torch.Generator):
        return dynamics_loss(m, b["latents"], b["actions"], b["action_mask"], dyn, gen)

    def eval_fn(step: int) -> dict[str, float]:
        return evaluator.quick(model, step, Path(run) / PHASE / "media")

    return trainer.fit(batch_fn, loss_fn, eval_fn, resume=resume)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    s = train(cfg, args.data, args.run, resume=not args.no_resume, progress=not args.no_progress)
    ev, nan = s["eval"], float("nan")
    print(f"dynamics: step {s['step']}, {s['minutes']:.1f} min, held-out PSNR (h=1..16, "
          f"K={cfg.dynamics.steps}) {ev.get('psnr', nan):.2f} dB vs copy-last "
          f"{ev.get('psnr_copy_last', nan):.2f} dB{status_note(s)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worldflow.cli.main import add_train_args

    p = sub.add_parser("dynamics", help="train the shortcut-forcing dynamics model",
                       description="Train the dynamics model on latents of the run's trained tokenizer.")
    add_train_args(p, "run directory holding a trained tokenizer")
    p.set_defaults(func=main)
