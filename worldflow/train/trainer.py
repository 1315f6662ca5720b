"""A small, shared training loop: AdamW, warm-up + cosine schedule, clipping, bf16 autocast, NaN guard,
atomic checkpoints with exact resume, progress bar and JSONL/TensorBoard logs.

Each phase (tokenizer, dynamics, agent) supplies a model, a ``batch_fn(gen) -> batch`` that draws its
randomness only from the given ``torch.Generator`` (so resume is exact), a ``loss_fn(model, batch, gen)
-> (loss, terms)`` and an optional ``eval_fn(step) -> metrics``.

Launched with ``torchrun`` the same loop runs data-parallel (DDP, or FSDP2 with ``fsdp=true``); the
process-group logic is in :mod:`worldflow.distributed` and docs/distributed.md explains the switches.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from worldflow import distributed, precision
from worldflow.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_dirs,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from worldflow.config import TrainConfig, config_diff
from worldflow.errors import WorldflowError
from worldflow.io import run_lock
from worldflow.run import checkpoints_dir
from worldflow.train.runlog import RunLogger

# trainer phase -> the config section that holds its TrainConfig (named in warnings and capped-phase notes)
SECTIONS = {"tokenizer": "train_tokenizer", "dynamics": "train_dynamics", "agent_bc": "train_bc",
            "agent": "train_agent"}


class NonFiniteLossError(WorldflowError, FloatingPointError):
    """A loss term became NaN/Inf; the last good checkpoint is kept untouched."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and embeddings of size 1-D excluded).

    Each group carries ``lr_scale``: parameters under ``heads.`` (agent heads freshly added to a pretrained
    backbone) peak at ``cfg.head_lr_scale * cfg.lr``, the rest at ``cfg.lr``; the schedule scales both.
    """
    head_scale = cfg.head_lr_scale
    groups = []
    for is_head in (False, True):
        params = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.startswith("heads.") == is_head]
        scale = head_scale if is_head else 1.0
        for decay in (True, False):
            ps = [p for p in params if (p.ndim >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr_scale": scale})
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


def status_note(summary: dict[str, Any]) -> str:
    """', fp32' or ', bf16, CAPPED by max_minutes at step 101 of 1500': what a phase's printout appends."""
    note = f", {summary['precision']}"
    if summary.get("capped"):
        note += (f", CAPPED by max_minutes at step {summary['step']} of {summary['planned_steps']} "
                 "(schedule incomplete)")
    return note


class _Step(torch.nn.Module):
    """One training step's forward as a module: draw the global batch, keep this process's rows, compute
    the loss on them. DDP / FSDP2 wrap this module (not the model), so whatever a phase's ``loss_fn`` does
    with the model — call submodules, run several passes, use a method other than ``forward`` — happens
    inside one wrapped forward; the model itself is registered unwrapped as ``self.model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.batch_fn: Callable[[torch.Generator], Any] | None = None
        self.loss_fn: Callable | None = None
        self.autocast: Callable[[], Any] = nullcontext

    def forward(self, gen: torch.Generator):
        batch = self.batch_fn(gen)
        rows_ctx = nullcontext()
        if distributed.is_distributed():
            rows = distributed.split_rows(distributed.batch_size(batch))
            batch = distributed.take_rows(batch, rows)
            rows_ctx = distributed.batch_rows(rows)
        with rows_ctx, self.autocast():
            return self.loss_fn(self.model, batch, gen)


class _NoLog:
    """The logger of ranks other than 0: they write nothing."""

    def log(self, step: int, **scalars: Any) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def write(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Runs ``cfg.steps`` optimisation steps of one phase, resumable from ``<run>/<phase>/checkpoints``.

    Under ``torchrun`` (see :mod:`worldflow.distributed`, docs/distributed.md) the same code trains with
    several processes: the model is wrapped in DDP (or sharded with FSDP2 when ``cfg.fsdp``), every process
    draws the global batch from the shared generator and trains on its slice of the rows, logged scalars
    are averaged over processes, and only rank 0 writes checkpoints, logs and media. ``self.model`` is
    always the unwrapped module, and checkpoints hold its full state dict.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, phase: str,
                 config_dict: dict[str, Any], progress: bool = True):
        self.model, self.cfg, self.phase = model, cfg, phase
        self.run_dir = Path(run_dir)
        self.ckpt_root = checkpoints_dir(self.run_dir, phase)
        self.config_dict = config_dict
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        distributed.init(device)
        if cfg.activation_checkpointing:
            distributed.checkpoint_blocks(model)
        self._step_module = _Step(model)
        self._step_module.autocast = self.autocast
        self._wrapped = distributed.wrap(self._step_module, fsdp=cfg.fsdp)
        self.opt = make_optimizer(model, cfg)  # after wrapping: FSDP2 replaces the parameters
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.section = SECTIONS.get(phase, f"train_{phase}")
        # resolved once per phase: "auto" -> bf16 only where the device runs it natively
        self.bf16 = precision.use_bf16(cfg.bf16, device, self.section)
        self.step = 0
        self.progress = progress

    def resume(self) -> bool:
        """Restore the newest checkpoint that loads; True when resumed, False when there is none.

        A checkpoint that does not load (truncated, corrupt) is named in a warning and the next older one
        is tried. One whose tensors do not fit the model stops the resume with the config keys that
        differ from the checkpoint's, since every older one was made by the same config. Every process
        reads the same checkpoint (the run directory must be visible to all of them).
        """
        dirs = checkpoint_dirs(self.ckpt_root)
        failures = []
        for d in dirs:
            try:
                self._load(d)
            except CheckpointMismatchError as e:
                raise self._config_changed(d, e) from e
            except CheckpointError as e:
                failures.append(f"{d.name}: {e}")
                warnings.warn(f"[{self.phase}] checkpoint {d} does not load, trying an older one: {e}",
                              stacklevel=2)
                continue
            if failures:
                warnings.warn(f"[{self.phase}] resumed from {d.name} (step {self.step}), the newest "
                              "checkpoint that loads", stacklevel=2)
            return True
        if dirs:
            raise CheckpointError(f"no checkpoint of phase {self.phase} in {self.ckpt_root} loads "
                                  f"({'; '.join(failures)}): start over with --no-resume or a new --run")
        return False

    def _config_changed(self, d: Path, err: CheckpointMismatchError) -> CheckpointError:
        diff = [line for line in config_diff(read_meta(d).get("config", {}), self.config_dict)
                if not line.startswith(("train_", "online."))]  # optimisation keys shape no tensor
        if not diff:
            return err
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        return CheckpointMismatchError(
            f"checkpoint {d} was trained with another config ({'; '.join(diff[:4])}{more}), so its weights "
            f"do not fit this model: resume with the config it was trained with, or start the phase over "
            f"with --no-resume, or use a new --run (--debug lists the tensors)")

    def _load(self, d: Path) -> None:
        if distributed.is_sharded(self.model):  # full state dicts in, each rank keeps its shard
            r = load_checkpoint(d, self.model, self.opt, load_weights_fn=distributed.load_full_model_state,
                                load_optimizer_fn=lambda opt, sd: distributed.load_full_optimizer_state(
                                    self.model, opt, sd))
        else:
            r = load_checkpoint(d, self.model, self.opt)
        self.step = r.step
        self.gen.set_state(r.extra["gen"])

    def save(self) -> Path:
        """Write a checkpoint of the unwrapped model (rank 0 only; the others wait until it is in place)."""
        weights: torch.nn.Module | dict = self.model
        opt_state: torch.optim.Optimizer | dict = self.opt
        if distributed.is_sharded(self.model):  # gathering the shards is collective
            weights = distributed.full_model_state(self.model)
            opt_state = distributed.full_optimizer_state(self.model, self.opt)
        path = self.ckpt_root / f"step_{self.step:08d}"
        if distributed.is_main():
            path = save_checkpoint(self.ckpt_root, self.step, weights, self.config_dict, opt_state,
                                   extra={"gen": self.gen.get_state()}, keep=self.cfg.keep_checkpoints)
        distributed.barrier()
        return path

    def autocast(self):
        """bf16 autocast on the model's device when the resolved precision is bf16 (``cfg.bf16`` true, or
        "auto" on hardware with native bf16), else a no-op context. The loss runs under it; a phase may also
        generate its batch under it (phase 3 imagines its rollouts this way)."""
        if not self.bf16:
            return nullcontext()
        dev = next(self.model.parameters()).device.type
        return torch.autocast(device_type=dev, dtype=torch.bfloat16)

    def train_step(self) -> dict[str, float]:
        """One optimisation step on a batch from ``batch_fn`` (set by :meth:`fit`); returns the scalars to
        log, averaged over processes."""
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg) * g.get("lr_scale", 1.0)
        loss, terms = self._wrapped(self.gen)
        out = {"loss": loss.detach(), **terms}
        out = distributed.mean_scalars({k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                        for k, v in out.items()})
        check_finite(self.step, out)  # on the averages: a NaN on any rank stops every rank
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gnorm = distributed.clip_grad_norm(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else None
        self.opt.step()
        after_step = getattr(self.model, "after_step", None)  # e.g. DynamicsModel's EMA update
        if callable(after_step):
            after_step()
        self.step += 1
        out = {"loss": out.pop("loss"), "lr": self.opt.param_groups[0]["lr"], **out}
        if gnorm is not None:
            out["grad_norm"] = gnorm
        return out

    def _evaluate(self, eval_fn: Callable[[int], dict[str, float]]) -> dict[str, float]:
        """Run ``eval_fn`` on rank 0 (the model is whole there) — or, with FSDP2 shards, on every rank with
        the root's parameters gathered (media are still written by rank 0 only)."""
        if distributed.is_sharded(self.model):
            with distributed.gathered(self._wrapped):
                res = eval_fn(self.step)
        else:
            res = eval_fn(self.step) if distributed.is_main() else {}
        distributed.barrier()
        return res

    def fit(self, batch_fn: Callable[[torch.Generator], Any], loss_fn: Callable,
            eval_fn: Callable[[int], dict[str, float]] | None = None, resume: bool = True) -> dict[str, Any]:
        """Train until cfg.steps; returns a summary with the last logged metrics.

        Summary keys: step, planned_steps (cfg.steps), train, eval, minutes, precision ("bf16" | "fp32"),
        capped (True when the ``max_minutes`` safety cap stopped the phase before ``planned_steps``; the
        schedule then did not complete and the result is not the preset's) and stopped_by_time (the same
        flag, older name). The run directory is locked while it runs (worldflow.io.run_lock): a second
        process training into it stops with RunLockedError.
        """
        with run_lock(self.run_dir, f"training {self.phase}") if distributed.is_main() else nullcontext():
            return self._fit(batch_fn, loss_fn, eval_fn, resume)

    def _fit(self, batch_fn: Callable[[torch.Generator], Any], loss_fn: Callable,
             eval_fn: Callable[[int], dict[str, float]] | None, resume: bool) -> dict[str, Any]:
        if resume:
            self.resume()
        self._step_module.batch_fn, self._step_module.loss_fn = batch_fn, loss_fn
        main = distributed.is_main()
        log = RunLogger(self.run_dir, self.phase, total=self.cfg.steps, initial=self.step,
                        progress=self.progress) if main else _NoLog()
        t0, last, last_eval, evaluated_at = time.time(), {}, {}, -1
        stopped_by_time = False
        prec = precision.name(self.bf16)
        if self.step < self.cfg.steps:
            log.write(f"[{self.phase}] precision {prec} ({self.section}.bf16={str(self.cfg.bf16).lower()}), "
                      f"steps {self.step}/{self.cfg.steps}")
        try:
            while self.step < self.cfg.steps:
                metrics = self.train_step()
                log.advance()
                if self.step % self.cfg.log_every == 0 or self.step == 1:
                    log.log(self.step, **metrics)
                    last = metrics
                if eval_fn is not None and self.cfg.eval_every > 0 and self.step % self.cfg.eval_every == 0:
                    last_eval, evaluated_at = self._evaluate(eval_fn), self.step
                    log.log(self.step, **{f"eval/{k}": v for k, v in last_eval.items()})
                if self.cfg.ckpt_every > 0 and self.step % self.cfg.ckpt_every == 0:
                    self.save()
                # decided together: a rank that stopped alone would leave the others waiting forever
                if self.cfg.max_minutes > 0 and distributed.any_rank(
                        time.time() - t0 > 60 * self.cfg.max_minutes):
                    stopped_by_time = self.step < self.cfg.steps
                    if stopped_by_time:
                        log.write(f"[{self.phase}] CAPPED: the {self.cfg.max_minutes} min safety cap "
                                  f"({self.section}.max_minutes) stopped training at step {self.step} of "
                                  f"{self.cfg.steps}; the schedule did not complete")
                    break
            self.save()
            if eval_fn is not None and evaluated_at != self.step:
                last_eval = self._evaluate(eval_fn)
                log.log(self.step, **{f"eval/{k}": v for k, v in last_eval.items()})
        finally:
            log.close()
        last_eval = distributed.broadcast_object(last_eval)
        return {"step": self.step, "planned_steps": self.cfg.steps, "train": last, "eval": last_eval,
                "minutes": (time.time() - t0) / 60, "precision": prec, "capped": stopped_by_time,
                "stopped_by_time": stopped_by_time}
