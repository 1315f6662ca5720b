"""A run directory and everything trained in it: :class:`Run`.

::

    <run>/config.json                      resolved config of the latest command (each phase also keeps
    <run>/dataset.json                     the dataset the run was trained on (path, env id, action space)
    <run>/<phase>/config.json              its own copy, and every checkpoint's meta.json has it)
    <run>/<phase>/checkpoints/...          see worldflow.checkpoint
    <run>/<phase>/metrics.jsonl, tb/       logs
    <run>/<phase>/media/                   reconstructions, rollout videos, plots

Phases: ``tokenizer``, ``dynamics``, ``agent_bc`` (behaviour cloning), ``agent`` (RL in imagination).
The training phases write them; the functions here (and :class:`Run`, which bundles them for one
directory) read them back.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from worldflow.agent.heads import AgentHeads
from worldflow.agent.model import AgentModel
from worldflow.checkpoint import CheckpointError, latest_checkpoint, load_weights, read_meta
from worldflow.config import Config, from_dict, read_config, save_config
from worldflow.data.clips import ClipBank, load_clips
from worldflow.dynamics.model import DynamicsModel, build_dynamics
from worldflow.errors import InputError
from worldflow.state import StateFileError, load_state, save_state
from worldflow.tokenizer.model import CausalTokenizer, TokenizerTraining

TOKENIZER, DYNAMICS, AGENT_BC, AGENT = "tokenizer", "dynamics", "agent_bc", "agent"  # phase directories
AGENT_PHASES = (AGENT, AGENT_BC)  # imagination-trained first, then behaviour cloning only


def start_phase(run: str | Path, phase: str, cfg: Config) -> Path:
    """Create ``<run>/<phase>`` and save the resolved config there and at the run root."""
    d = Path(run) / phase
    (d / "media").mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(run) / "config.json")
    save_config(cfg, d / "config.json")
    return d


def checkpoints_dir(run: str | Path, phase: str) -> Path:
    """``<run>/<phase>/checkpoints``: where a phase's checkpoints live (worldflow.checkpoint)."""
    return Path(run) / phase / "checkpoints"


def phase_checkpoint(run: str | Path, phase: str) -> Path:
    """Latest checkpoint directory of a phase, or a clear error saying which command makes it."""
    d = latest_checkpoint(checkpoints_dir(run, phase))
    if d is None:
        raise CheckpointError(f"run {run} has no {phase} checkpoint: run `worldflow train {phase} "
                              f"--run {run} ...` first")
    return d


def phase_config(run: str | Path, phase: str) -> Config:
    """The config a phase's latest checkpoint was trained with."""
    return from_dict(read_meta(phase_checkpoint(run, phase))["config"])


def record_dataset(run: str | Path, data) -> None:
    """Remember the dataset(s) a run was trained on (env id, action space), for envs built from the run.

    ``data`` is one dataset directory or the several of ``--data A --data B``. ``dataset.json`` keeps
    ``data`` (the first labelled dataset, else the first: where envs built from the run take their
    starting frames), its ``env_id``, the shared ``action_space`` (null: action-free), ``frame_size`` and
    ``datasets`` (every path, in order). Phases call ``worldflow.data.checks.check_datasets`` first: a run
    keeps one action space."""
    from worldflow.data.episodes import load_manifest
    from worldflow.data.mixture import as_roots
    from worldflow.io import atomic_write_text

    roots = as_roots(data)
    manifests = [load_manifest(r) for r in roots]
    main = next((k for k, m in enumerate(manifests) if m["action_space"] is not None), 0)
    m = manifests[main]
    info = {"data": str(roots[main].resolve()), "env_id": m.get("env_id"), "action_space": m["action_space"],
            "frame_size": m.get("frame_size"), "datasets": [str(r.resolve()) for r in roots]}
    atomic_write_text(Path(run) / "dataset.json", json.dumps(info, indent=2))


def run_dataset(run: str | Path) -> dict[str, Any]:
    """The run's ``dataset.json``: the dataset path, env id, action space and frame size it was trained on."""
    p = Path(run) / "dataset.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: {run} is not a trained worldflow run directory")
    return json.loads(p.read_text())


def run_action_space(run: str | Path) -> gym.Space | None:
    """The action space of the dataset the run was trained on (None: action-free video)."""
    from worldflow.data.spaces import space_from_dict

    return space_from_dict(run_dataset(run)["action_space"])


def load_agent_model(run: str | Path, phase: str | None = None, device: torch.device | str = "cpu",
                     checkpoint: str | Path | None = None) -> tuple[AgentModel, Config, str]:
    """The agent model of a run: phase 'agent' (imagination) if present, else 'agent_bc'.
    ``checkpoint``: one checkpoint directory of ``phase`` instead of its latest (needs ``phase``)."""
    if checkpoint is not None and phase is None:
        raise ValueError("load_agent_model(checkpoint=...) needs the phase the checkpoint belongs to")
    phases = [phase] if phase else list(AGENT_PHASES)
    for ph in phases:
        d = Path(checkpoint) if checkpoint is not None else latest_checkpoint(checkpoints_dir(run, ph))
        if d is None:
            continue
        cfg = phase_config(run, ph)
        model = AgentModel(cfg, run_action_space(run))
        load_weights(model, d)
        return model.to(device).eval().requires_grad_(False), cfg, ph
    raise CheckpointError(f"run {run} has no agent checkpoint ({' or '.join(phases)}): "
                          f"run `worldflow train agent --run {run} ...` first")


def load_tokenizer(run: str | Path, device: torch.device | str = "cpu") -> tuple[CausalTokenizer, Config]:
    """The trained tokenizer of a run (eval mode, frozen) and the config it was trained with."""
    cfg = phase_config(run, TOKENIZER)
    wrap = TokenizerTraining(cfg)
    load_weights(wrap, phase_checkpoint(run, TOKENIZER))
    tok = wrap.tokenizer.to(device).eval().requires_grad_(False)
    return tok, cfg


def action_space_of(data) -> gym.Space | None:
    """The action space recorded in a dataset's manifest (None: action-free); for several datasets, the
    one their labelled members share (worldflow.data.mixture.mixture_space checks they do)."""
    from worldflow.data.episodes import load_manifest
    from worldflow.data.mixture import as_roots, labelled_space
    from worldflow.data.spaces import space_from_dict

    return space_from_dict(labelled_space([load_manifest(r)["action_space"] for r in as_roots(data)]))


def load_dynamics(run: str | Path, action_space: gym.Space, device: torch.device | str = "cpu"
                  ) -> tuple[DynamicsModel, Config]:
    """The trained dynamics model of a run (eval mode) and the config it was trained with."""
    cfg = phase_config(run, DYNAMICS)
    model = build_dynamics(cfg, action_space)
    load_weights(model, phase_checkpoint(run, DYNAMICS))
    if model.ema is not None:  # dynamics.ema: sample with the averaged weights
        model.ema.copy_to(model)
    return model.to(device).eval(), cfg


@torch.no_grad()
def encode_frames(tok: CausalTokenizer, frames: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Latents (L, N, D) of one episode's uint8 frames (L, H, W, 3), streamed chunk by chunk."""
    device = next(tok.parameters()).device
    cache = tok.new_encode_cache(1)
    out = []
    for i in range(0, len(frames), chunk):
        x = frames[i : i + chunk].to(device)[None]
        out.append(tok.encode(x, cache=cache)[0].cpu())
    return torch.cat(out)


def latent_mixture(run: str | Path, data, cfg: Config, split: str, tok: CausalTokenizer, progress: bool):
    """:func:`latent_bank` of every ``--data`` dataset, drawn as one (worldflow.data.mixture.mix)."""
    from worldflow.data.mixture import as_roots, mix

    roots = as_roots(data)
    return mix([latent_bank(run, r, cfg, split, tok, progress) for r in roots], roots, cfg.data)


def latent_bank(run: str | Path, data: str | Path, cfg: Config, split: str, tok: CausalTokenizer,
                progress: bool) -> ClipBank:
    """The split's episodes as latents, from the cache when the dataset and tokenizer are unchanged."""
    from worldflow.data.episodes import load_manifest

    ckpt = phase_checkpoint(run, TOKENIZER)
    key = hashlib.sha1(f"{Path(data).resolve()}|{ckpt.resolve()}|{len(load_manifest(data)['episodes'])}"
                       .encode()).hexdigest()[:12]
    # safetensors, never a pickle: run directories get shared, and unpickling one could run its code
    path = Path(run) / DYNAMICS / f"latents_{split}_{key}.safetensors"
    if path.exists():
        try:
            saved = load_state(path)
            return ClipBank(saved["episodes"], saved["ids"])
        except StateFileError as e:  # a cache: rebuild it rather than fail
            warnings.warn(f"rebuilding the latent cache: {e}", stacklevel=2)
    frames = load_clips(data, cfg.data, split=split, progress=progress)  # streamed if it is too large
    bank = frames.map(lambda f: encode_frames(tok, f), "frames", "latents", progress=progress)
    save_state(path, {"episodes": bank.episodes, "ids": bank.ids})  # atomic: every torchrun rank may write
    return bank


@dataclass(frozen=True)
class WorldModel:
    """A run's frozen world model: tokenizer, dynamics model and the agent heads (None: dynamics only).

    ``phase`` names the checkpoint the dynamics model and heads came from (``agent``, ``agent_bc`` or
    ``dynamics``), ``cfg`` is its config and ``action_space`` the training data's.
    """

    tokenizer: CausalTokenizer
    dynamics: DynamicsModel
    heads: AgentHeads | None
    cfg: Config
    phase: str
    action_space: gym.Space

    @property
    def size(self) -> int:
        """Frame height = width in pixels."""
        return self.tokenizer.image_size


class Run:
    """A run directory: ``Run(path).tokenizer()``, ``.dynamics()``, ``.agent()``, ``.dataset()``, ``.config``.

    Loading never changes the directory; each loader returns the module in eval mode with the config its
    checkpoint was trained with. Errors name the phase that is missing and the command that makes it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> Config:
        """The resolved config of the latest command run here (``<run>/config.json``)."""
        p = self.path / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: {self.path} is not a worldflow run directory")
        return read_config(p)

    def phase_config(self, phase: str) -> Config:
        """The config the latest checkpoint of ``phase`` was trained with."""
        return phase_config(self.path, phase)

    def checkpoint(self, phase: str) -> Path:
        """The latest checkpoint directory of ``phase``."""
        return phase_checkpoint(self.path, phase)

    def has(self, phase: str) -> bool:
        """Whether ``phase`` has a checkpoint."""
        return latest_checkpoint(checkpoints_dir(self.path, phase)) is not None

    def dataset(self) -> dict[str, Any]:
        """``dataset.json``: path, env id, action space and frame size of the training data."""
        return run_dataset(self.path)

    def action_space(self) -> gym.Space:
        """The action space of the training data."""
        return run_action_space(self.path)

    def tokenizer(self, device: torch.device | str = "cpu") -> tuple[CausalTokenizer, Config]:
        """The trained tokenizer (frozen) and its config."""
        return load_tokenizer(self.path, device)

    def dynamics(self, device: torch.device | str = "cpu") -> tuple[DynamicsModel, Config]:
        """The trained dynamics model (phase ``dynamics``) and its config."""
        return load_dynamics(self.path, self.action_space(), device)

    def agent(self, phase: str | None = None, device: torch.device | str = "cpu"
              ) -> tuple[AgentModel, Config, str]:
        """The agent model (dynamics + heads) of ``phase``: ``agent`` if trained, else ``agent_bc``."""
        return load_agent_model(self.path, phase, device)

    def world_model(self, phase: str | None = None, device: torch.device | str = "cpu") -> WorldModel:
        """Tokenizer + dynamics + heads, frozen. ``phase``: None (``agent``, else ``agent_bc``, else the
        dynamics model alone, with a warning: no reward or continue heads), or a phase name."""
        tok, _ = self.tokenizer(device)
        space = self.action_space()
        if space is None:
            raise InputError(f"run {self.path} was trained on action-free video only: a world model to act "
                             f"in needs actions; continue its videos with `worldflow rollout --run "
                             f"{self.path} --video FILE`, or train dynamics with action-labelled --data "
                             f"in a new --run")
        if phase is None or phase in AGENT_PHASES:
            try:
                model, cfg, ph = self.agent(phase, device)
                return WorldModel(tok, model.dynamics, model.heads, cfg, ph, space)
            except CheckpointError:
                if phase is not None:
                    raise
            warnings.warn(f"run {self.path} has no agent checkpoint: using the dynamics model alone, so "
                          "rewards are 0 and episodes never terminate (train the agent phase for "
                          "reward/continue heads)", stacklevel=3)
        elif phase != DYNAMICS:
            raise InputError(f"phase must be None, {DYNAMICS!r} or one of {AGENT_PHASES}, got {phase!r}")
        dyn, cfg = self.dynamics(device)
        return WorldModel(tok, dyn.requires_grad_(False), None, cfg, DYNAMICS, space)
