"""``worldflow train dynamics``: fit the shortcut-forcing dynamics model on tokenized episodes.

The run's trained tokenizer encodes every episode once; the latents are cached in
``<run>/dynamics/latents_<split>_<key>.safetensors`` (keyed by dataset and tokenizer checkpoint) so a
resumed or repeated run skips the encoding. Held-out open-loop rollouts are scored every ``eval_every`` steps.

Action-free datasets (imported videos) train the model's unlabeled-video path: their frames carry no
action, so the model sees the base action embedding alone (Dreamer 4 pretrains on unlabeled video this
way). Several ``--data`` are drawn as one (worldflow.data.mixture); held-out rollouts use the first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from worldflow.config import Config, derive, to_dict, warn_if_window_exceeds_training
from worldflow.data.checks import check_datasets
from worldflow.distributed import device_of
from worldflow.dynamics import DynamicsModel, dynamics_loss
from worldflow.dynamics.model import build_dynamics
from worldflow.errors import InputError
from worldflow.run import action_space_of, latent_bank, latent_mixture, start_phase
from worldflow.train.trainer import Trainer

PHASE = "dynamics"


def train(cfg: Config, data, run: str | Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train the dynamics model on one dataset directory or several (``data``: a path or a list)."""
    from worldflow.eval.rollouts import RolloutEvaluator, reader_of, with_frames
    from worldflow.run import load_tokenizer, record_dataset

    device = device_of(cfg)
    tok, tok_cfg = load_tokenizer(run, device)
    # The tokenizer fixes the latent shape and frame size: the dynamics model must agree with it.
    cfg = derive(cfg, tokenizer=tok_cfg.tokenizer, **{"data.size": tok_cfg.data.size})
    dyn = cfg.dynamics
    if dyn.ema > 0 and cfg.train_dynamics.fsdp:
        raise InputError("dynamics.ema keeps a whole copy of the weights beside them and cannot follow "
                         "FSDP2 shards: train with train_dynamics.fsdp=false (DDP) or dynamics.ema=0")
    roots = check_datasets(data, cfg, {"data.clip_len": cfg.data.clip_len,
                                       **({"dynamics.long_len": dyn.long_len} if dyn.long_every > 0 else {})},
                           run)
    start_phase(run, PHASE, cfg)
    record_dataset(run, roots)
    torch.manual_seed(cfg.train_dynamics.seed)
    space = action_space_of(roots)
    train_bank = latent_mixture(run, roots, cfg, "train", tok, progress)
    held = roots[0]
    held_bank = with_frames(latent_bank(run, held, cfg, "heldout", tok, progress), held, cfg, progress)
    model = build_dynamics(cfg, space).to(device)
    trainer = Trainer(model, cfg.train_dynamics, run, PHASE, to_dict(cfg), progress=progress)
    warn_if_window_exceeds_training("dynamics", dyn.context,
                                    max(cfg.data.clip_len, dyn.long_len if dyn.long_every > 0 else 0))
    context = min(8, dyn.context)
    # score 16 predicted frames, or as many as the longest held-out episode allows
    horizon = max(1, min(16, int(held_bank.lengths.max()) - context))
    evaluator = RolloutEvaluator(tok, held_bank, cfg, device, context=context, horizon=horizon,
                                 reader=reader_of(held))

    def batch_fn(gen: torch.Generator) -> dict[str, torch.Tensor]:
        long = dyn.long_every > 0 and (trainer.step + 1) % dyn.long_every == 0
        length = dyn.long_len if long else cfg.data.clip_len
        b = train_bank.sample(cfg.train_dynamics.batch, length, gen)
        return {k: v.to(device) for k, v in b.items()}

    def loss_fn(m: DynamicsModel, b: dict[str, torch.Tensor], gen: torch.Generator):
        return dynamics_loss(m, b["latents"], b["actions"], b["action_mask"], dyn, gen)

    def eval_fn(step: int) -> dict[str, float]:
        scored = model
        if model.ema is not None:  # score what the checkpoint will sample with: the EMA weights
            scored = copy.deepcopy(model)
            scored.ema.copy_to(scored)
        return evaluator.quick(scored, step, Path(run) / PHASE / "media")

    return trainer.fit(batch_fn, loss_fn, eval_fn, resume=resume)
