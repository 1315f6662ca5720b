"""A small, shared training loop: AdamW, warm-up + cosine schedule, clipping, bf16 autocast, NaN guard,
atomic checkpoints with exact resume, progress bar and JSONL/TensorBoard logs.

Each phase (tokenizer, dynamics, agent) supplies a model, a ``batch_fn(gen) -> batch`` that draws its
randomness only from the given ``torch.Generator`` (so resume is exact), a ``loss_fn(model, batch, gen)
-> (loss, terms)`` and an optional ``eval_fn(step) -> metrics``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from worldflow.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from worldflow.config import TrainConfig
from worldflow.runlog import RunLogger


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/Inf; the last good checkpoint is kept untouched."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and embeddings of size 1-D excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / max(1, cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def check_finite(step: int, terms: dict[str, torch.Tensor | float]) -> None:
    for k, v in terms.items():
        val = float(v.detach()) if torch.is_tensor(v) else float(v)
        if not math.isfinite(val):
            raise NonFiniteLossError(f"loss term '{k}' is {val} at step {step}; "
                                     "training stopped, the last good checkpoint is kept")


class Trainer:
    """Runs ``cfg.steps`` optimisation steps of one phase, resumable from ``<run>/<phase>/checkpoints``."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, phase: str,
                 config_dict: dict[str, Any], progress: bool = True):
        self.model, self.cfg, self.phase = model, cfg, phase
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / phase / "checkpoints"
        self.config_dict = config_dict
        self.opt = make_optimizer(model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.progress = progress

    def resume(self) -> bool:
        """Restore the latest checkpoint if there is one; True when resumed."""
        d = latest_checkpoint(self.ckpt_root)
        if d is None:
            return False
        r = load_checkpoint(d, self.model, self.opt)
        self.step = r.step
        self.gen.set_state(r.extra["gen"])
        return True

    def save(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.config_dict, self.opt,
                               extra={"gen": self.gen.get_state()})

    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        dev = next(self.model.parameters()).device.type
        return torch.autocast(device_type=dev, dtype=torch.bfloat16)

    def train_step(self, batch: Any, loss_fn: Callable) -> dict[str, float]:
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        with self._autocast():
            loss, terms = loss_fn(self.model, batch, self.gen)
        check_finite(self.step, {"loss": loss, **terms})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else None
        self.opt.step()
        self.step += 1
        out = {"loss": float(loss.detach()), "lr": self.opt.param_groups[0]["lr"]}
        out.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
        if gnorm is not None:
            out["grad_norm"] = float(gnorm)
        return out

    def fit(self, batch_fn: Callable[[torch.Generator], Any], loss_fn: Callable,
            eval_fn: Callable[[int], dict[str, float]] | None = None, resume: bool = True) -> dict[str, Any]:
        """Train until cfg.steps (or cfg.max_minutes); returns a summary with the last logged metrics."""
        if resume:
            self.resume()
        log = RunLogger(self.run_dir, self.phase, total=self.cfg.steps, initial=self.step,
                        progress=self.progress)
        t0, last, last_eval = time.time(), {}, {}
        stopped_by_time = False
        try:
            while self.step < self.cfg.steps:
                metrics = self.train_step(batch_fn(self.gen), loss_fn)
                log.advance()
                if self.step % self.cfg.log_every == 0 or self.step == 1:
                    log.log(self.step, **metrics)
                    last = metrics
                if eval_fn is not None and self.cfg.eval_every > 0 and self.step % self.cfg.eval_every == 0:
                    last_eval = eval_fn(self.step)
                    log.log(self.step, **{f"eval/{k}": v for k, v in last_eval.items()})
                if self.cfg.ckpt_every > 0 and self.step % self.cfg.ckpt_every == 0:
                    self.save()
                if self.cfg.max_minutes > 0 and time.time() - t0 > 60 * self.cfg.max_minutes:
                    stopped_by_time = True
                    log.write(f"[{self.phase}] time budget of {self.cfg.max_minutes} min reached "
                              f"at step {self.step}")
                    break
            self.save()
            if eval_fn is not None and (not last_eval or self.step % max(1, self.cfg.eval_every) != 0):
                last_eval = eval_fn(self.step)
                log.log(self.step, **{f"eval/{k}": v for k, v in last_eval.items()})
        finally:
            log.close()
        return {"step": self.step, "train": last, "eval": last_eval, "minutes": (time.time() - t0) / 60,
                "stopped_by_time": stopped_by_time}
