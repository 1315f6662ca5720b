"""Run directories: where a run's config, checkpoints, logs and media live, and how phases find each other.

::

    <run>/config.json                      resolved config of the latest command (each phase also keeps
    <run>/<phase>/config.json              its own copy, and every checkpoint's meta.json has it)
    <run>/<phase>/checkpoints/...          see worldflow.checkpoint
    <run>/<phase>/metrics.jsonl, tb/       logs
    <run>/<phase>/media/                   reconstructions, rollout videos, plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from worldflow.checkpoint import CheckpointError, latest_checkpoint, read_meta
from worldflow.config import Config, from_dict, load_config, save_config


def resolve_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, list(args.overrides))


def start_phase(run: str | Path, phase: str, cfg: Config) -> Path:
    """Create ``<run>/<phase>`` and save the resolved config there and at the run root."""
    d = Path(run) / phase
    (d / "media").mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(run) / "config.json")
    save_config(cfg, d / "config.json")
    return d


def phase_checkpoint(run: str | Path, phase: str) -> Path:
    """Latest checkpoint directory of a phase, or a clear error saying which command makes it."""
    d = latest_checkpoint(Path(run) / phase / "checkpoints")
    if d is None:
        raise CheckpointError(f"run {run} has no {phase} checkpoint: run `worldflow train {phase} "
                              f"--run {run} ...` first")
    return d


def phase_config(run: str | Path, phase: str) -> Config:
    """The config a phase's latest checkpoint was trained with."""
    return from_dict(read_meta(phase_checkpoint(run, phase))["config"])


def device_of(cfg: Config) -> torch.device:
    """The configured device (CPU when CUDA is absent); under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    from worldflow.distributed import device_for

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return device_for(cfg.device)
