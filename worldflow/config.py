"""Typed configuration: dataclasses are the source of truth, YAML presets and ``key=value`` overrides.

A preset (``configs/tiny.yaml``) is a nested mapping whose keys must match the dataclass fields;
overrides are dotted paths (``tokenizer.width=64``). Unknown keys and values of the wrong type raise
:class:`ConfigError` naming the offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from worldflow.errors import WorldflowError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(WorldflowError, ValueError):
    """A configuration key is unknown, or its value has the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    """Episode datasets on disk and clip sampling."""

    size: int = 64  # frame height = width in pixels
    clip_len: int = 16  # frames per training clip
    holdout_fraction: float = 0.1  # share of episodes held out (by episode, deterministic)
    on_corrupt: Literal["error", "skip"] = "error"  # what a broken video file does
    num_workers: int = 0  # worker processes decoding streamed clips (0 = in the main process)
    memory_mb: float = 4096.0  # a split whose decoded frames exceed this many MiB is streamed from disk
    mix: tuple[float, ...] = ()  # sampling share of each --data dataset, in order; () weighs them by size
    allow_action_free: bool = True  # train on action-free datasets (imported videos) too; false: an error


@dataclass(frozen=True)
class CollectConfig:
    env: str = "worldflow/Catch-v0"  # gymnasium env id episodes are collected from
    episodes: int = 100  # episodes of the main behaviour policy
    policy: Literal["random", "expert", "epsilon-expert"] = "epsilon-expert"  # behaviour policy
    epsilon: float = 0.3  # random-action rate of the epsilon-expert policy
    random_episodes: int = 0  # extra episodes of a random policy appended after the main ones
    action_repeat: int = 1  # repeat each action K env steps
    max_steps: int = 1000  # per episode, safety cap
    seed: int = 0  # episode k is reset with seed + k


@dataclass(frozen=True)
class TransformerConfig:
    """Shared space/time transformer (tokenizer and dynamics)."""

    width: int = 128  # model width (channels per token)
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads (query)
    kv_heads: int = 4  # grouped-query attention when < heads
    mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * width * 2/3
    temporal_every: int = 4  # a causal temporal layer every N-th layer (others spatial only)
    softcap: float = 50.0  # attention logit soft-cap (0 disables)
    qk_norm: bool = True  # RMS-normalise queries and keys per head before the dot product
    rope_base: float = 10000.0  # RoPE base frequency
    dropout: float = 0.0  # residual dropout
    backend: Literal["auto", "sdpa", "math", "xformers"] = "auto"  # attention kernel


@dataclass(frozen=True)
class TokenizerConfig:
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(temporal_every=1))
    patch: int = 8  # patch size in pixels (frames must divide by it)
    latent_tokens: int = 16  # N_l latent tokens per frame; "patch" layout: P, or 0 for "one per patch"
    # "learned": N_l learned latent tokens read the patches by attention (Dreamer 4). "patch": each patch's
    # encoder output is its latent (a ViT autoencoder; not in Dreamer 4), which learns in far fewer steps
    # on camera footage (docs/tokenizer.md "Latent layout").
    latent_layout: Literal["learned", "patch"] = "learned"
    latent_dim: int = 16  # D_b bottleneck channels (tanh)
    mask_max: float = 0.9  # masked autoencoding: p ~ U(0, mask_max) per frame
    lpips_weight: float = 0.2  # weight of the LPIPS term, used only with lpips_path
    lpips_path: str = ""  # local LPIPS weights; empty = LPIPS off (nothing downloads)
    rms_decay: float = 0.99  # running RMS estimate for loss normalisation
    hard_patch_weight: float = 0.0  # weight of the worst-patches MSE term (0 = off; not in Dreamer 4)
    hard_patch_frac: float = 0.0625  # share of each frame's patches, the worst, that the term averages
    hard_patch_schedule: Literal["constant", "linear"] = "constant"  # linear: the weight falls to 0 ...
    hard_patch_steps: int = 1000  # ... over this many training steps (the linear schedule only)
    clip_len: int = 16  # frames per tokenizer training clip; short clips train faster
    context: int = 16  # temporal attention window in frames (whole-clip and streaming alike)

    def num_latents(self, image_size: int) -> int:
        """N_l for frames of ``image_size``: ``latent_tokens``, except that the patch layout's 0 means one
        latent per patch, (image_size / patch)^2, so a preset needs no edit for another frame size."""
        if self.latent_layout == "patch" and self.latent_tokens == 0:
            return (image_size // self.patch) ** 2
        return self.latent_tokens


@dataclass(frozen=True)
class DynamicsConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    registers: int = 2  # register tokens per frame
    pack: int = 1  # tokenizer latents packed into one spatial token
    agent_tokens: int = 1  # agent tokens per frame (world tokens never attend to them)
    num_tasks: int = 1  # task embeddings for the agent tokens
    objective: Literal["shortcut", "flow_x", "flow_v"] = "shortcut"  # training objective
    k_max: int = 64  # K_max, a power of two: the finest step is d_min = 1/K_max
    bootstrap_fraction: float = 0.25  # share of rows trained with a bootstrapped shortcut target (d > d_min)
    ramp_weight: bool = True  # loss weight 0.9 tau + 0.1 (Dreamer 4's ramp)
    context_signal: float = 0.9  # signal level tau of context frames at inference
    context_noise: bool = True  # corrupt context frames at inference (ablation switch)
    context: int = 16  # C: temporal attention window / rollout context in frames
    single_frame_fraction: float = 0.3  # share of items trained as single frames without temporal context
    # share of sequence rows whose first j ~ U{1..T-1} frames carry the rollout's context label
    # (context_signal, d_min), as the sampler conditions (worldflow.flow.context_prefix; not in Dreamer 4)
    context_rows: float = 0.0
    long_every: int = 0  # every N-th batch uses clips of long_len frames (0 = never)
    long_len: int = 32  # frames per clip of the long batches (long_every)
    steps: int = 4  # default sampling steps K at inference
    sampler: Literal["euler", "heun"] = "euler"  # sampler at inference (heun: 2K - 1 calls per frame)
    # EMA decay of the weights (0 = off; e.g. 0.999). With it the dynamics checkpoint samples with the
    # average (worldflow eval / rollout); the agent phases fine-tune and use the trained weights
    ema: float = 0.0
    ema_targets: bool = False  # the shortcut bootstrap targets come from the EMA weights (needs ema > 0)


@dataclass(frozen=True)
class AgentConfig:
    """Agent heads and losses (Dreamer 4 agent training; docs/agent.md)."""

    hidden: int = 256  # hidden width of each head MLP
    head_layers: int = 2  # hidden layers per head MLP (Linear -> RMSNorm -> SiLU)
    mtp: int = 8  # multi-token prediction length L
    bins: int = 255  # two-hot bins (symexp spaced)
    bins_limit: float = 20.0  # bins span symlog values [-limit, limit], i.e. |y| <= symexp(20) ~ 4.85e8
    min_std: float = 0.1  # Box policies: bounds of the pre-tanh Normal std (Dreamer 3)
    max_std: float = 1.0  # upper bound of that std
    gamma: float = 0.997  # discount
    lam: float = 0.95  # lambda of the lambda-returns
    pmpo_alpha: float = 0.5  # PMPO weight of the positive-advantage set against the negative one
    pmpo_beta: float = 0.3  # PMPO weight of the KL to the behaviour-cloned prior
    horizon: int = 16  # imagination rollout length
    imag_batch: int = 32  # imagined rollouts per phase-3 batch
    # Sampling steps K of imagined rollouts in phase 3. Not 1: on Catch, one-step samples of a respawning
    # ball are a faint average over the 8 columns, and K = 1 imagination lost every ball after the first
    # (0.04 imagined reward per 16-step rollout against 0.89 with K = 4); K = 4 costs 5 passes a frame, not 2.
    imag_steps: int = 4
    # Phase-3 updates per imagined batch. Imagination is nearly all of a phase-3 step's time; each update
    # recomputes values and λ-returns with the current heads, so reuse also lets the value head catch up.
    imag_reuse: int = 1
    # Phase 2: divide each loss term (dynamics, BC, reward, continue) by its running RMS, as the tokenizer
    # does. Without it the 9-step BC sum (~8) outweighs the dynamics loss (~0.01) ~600:1 and fine-tuning
    # the shared transformer erases the world model (on Catch: ball tracked 81% -> 2% after one step).
    loss_norm: bool = True
    loss_norm_decay: float = 0.99  # decay of those running RMS estimates


@dataclass(frozen=True)
class OnlineConfig:
    """Dreamer-style online loop: act in the real env, grow the dataset, retrain, repeat."""

    iterations: int = 3  # act / collect / retrain rounds
    episodes_per_iter: int = 10  # real-env episodes collected with the current policy each iteration
    tokenizer_steps: int = 200  # fine-tuning steps per iteration for each phase
    dynamics_steps: int = 300  # dynamics fine-tuning steps per iteration
    bc_steps: int = 100  # behaviour-cloning steps per iteration
    agent_steps: int = 200  # imagination RL steps per iteration


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one training phase."""

    steps: int = 1000  # optimiser steps (defines the result; see max_minutes)
    batch: int = 8  # clips per step (global, over all processes)
    lr: float = 3e-4  # peak learning rate (after warm-up, cosine to 10% at the last step)
    head_lr_scale: float = 1.0  # parameters under ``heads.`` (new agent heads) peak at head_lr_scale * lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    warmup: int = 100  # linear warm-up steps
    grad_clip: float = 1.0  # global gradient-norm clip (0 = none)
    # bf16 autocast: "auto" uses it only where the device runs bf16 natively (worldflow.precision);
    # true/false force it (true where it is emulated warns: ~8x slower on an AVX2 CPU)
    bf16: bool | Literal["auto"] = "auto"
    log_every: int = 10  # steps between log lines
    eval_every: int = 200  # steps between held-out evaluations (0 = none)
    ckpt_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept per phase, older ones pruned (0 = keep all)
    # Safety cap on wall time (0 = none). A phase's result is defined by ``steps``; a phase this cap stops
    # is reported as capped (run summary, demo printout, summary.json "capped"), never as completed.
    max_minutes: float = 0.0
    seed: int = 0  # seed of the phase's generator (batches, noise, masks)
    # multi-process runs under torchrun (docs/distributed.md); single-process runs ignore fsdp
    fsdp: bool = False  # shard params/grads/optimizer state per transformer block (FSDP2) instead of DDP
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved as ``config.json`` in every run directory."""

    preset: str = "default"  # preset this config was built from
    device: str = "cpu"  # torch device: cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    train_tokenizer: TrainConfig = field(default_factory=TrainConfig)
    train_dynamics: TrainConfig = field(default_factory=TrainConfig)
    train_bc: TrainConfig = field(default_factory=TrainConfig)  # phase 2: behaviour cloning + reward
    train_agent: TrainConfig = field(default_factory=TrainConfig)  # phase 3: RL in imagination
    online: OnlineConfig = field(default_factory=lambda: OnlineConfig())


# ---------------------------------------------------------------------------------------------------
# Loading, merging, overriding


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"config key '{key}': expected one of {list(allowed)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected str, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def merge(obj: Any, data: dict[str, Any], prefix: str = "") -> Any:
    """A copy of the (frozen) dataclass ``obj`` with a nested mapping applied; ``obj`` is unchanged."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k in _RENAMED.get(type(obj).__name__, {}):
            raise ConfigError(f"config key '{key}' {_RENAMED[type(obj).__name__][k]}")
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        changes[k] = merge(cur, v, key + ".") if dataclasses.is_dataclass(cur) else _coerce(v, hints[k], key)
    return dataclasses.replace(obj, **changes)


# Keys that earlier 0.x releases had: dataclass name -> key -> what became of it (ends the error line).
_RENAMED = {
    "DataConfig": {"cross_episode": "was removed: it was read by nothing (training clips never cross "
                                    "episodes; worldflow.data.dataset.ClipDataset(cross_episode=True) can)"},
    "TrainConfig": {"head_lr": "was replaced by head_lr_scale (the heads' peak lr is head_lr_scale * lr)"},
    "AgentConfig": {"train_backbone": "was removed: it did nothing (imagination runs without gradients, so "
                                      "no gradient reached the transformer); phase 3 trains the policy "
                                      "and value heads, with the world model frozen"},
}


def apply_override(cfg: Config, override: str) -> Config:
    """``cfg`` with one ``dotted.key=value`` override; the value is parsed as YAML (so 3, 0.1, true, [1, 2]).

    A string field keeps the raw text when YAML would read it as something else (``name=123``).
    """
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value")
    path, raw = override.split("=", 1)
    parts = path.strip().split(".")
    if _field_type(cfg, parts) is str:
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"override '{override}': {raw!r} is not a YAML value ({first}); quote a "
                              f"string, write lists as [1, 2]") from None
    return merge(cfg, _nest({path.strip(): value}))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths -> a nested mapping: ``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *head, last = path.split(".")
        cur = nested
        for p in head:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return nested


def _field_type(obj: Any, parts: list[str]) -> Any:
    """Type of the field at a dotted path, or None if the path does not name a field."""
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return _hints(type(obj))[p]
        obj = getattr(obj, p)
    return None


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if not q.exists():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name_or_path}' (known: {', '.join(known)})")
    return q


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a frozen Config from defaults, an optional preset (name or YAML path), then overrides."""
    cfg = Config()
    if preset is not None:
        path = preset_path(preset)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        cfg = merge(cfg, {"preset": path.stem, **data})
    for o in overrides or []:
        cfg = apply_override(cfg, o)
    return cfg


def derive(cfg: Any, **changes: Any) -> Any:
    """A copy of a frozen config with dotted-path fields replaced: ``derive(cfg, **{"data.size": 32})``.

    Configs are never mutated after loading; code that needs another value derives a new config.
    """
    return _replace_nested(cfg, _nest(changes))


def _replace_nested(obj: Any, nested: dict[str, Any]) -> Any:
    return dataclasses.replace(obj, **{k: _replace_nested(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in nested.items()})


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf of two config dicts (``to_dict`` form) that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, plain JSON types


def from_dict(data: dict[str, Any]) -> Config:
    """The Config a saved ``config.json`` describes (older run directories' sentinels translated)."""
    return merge(Config(), _upgrade(data))


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Translate a config.json written by worldflow 0.x before the sentinels were removed.

    There ``tokenizer.clip_len`` 0 meant data.clip_len, ``agent.imag_steps`` 0 meant dynamics.steps and a
    phase's ``head_lr`` 0 meant its lr (else an absolute lr, now ``head_lr_scale`` = head_lr / lr).
    """
    data = json.loads(json.dumps(data))  # a deep copy of plain JSON
    data.get("data", {}).pop("cross_episode", None)
    tok, agent = data.get("tokenizer", {}), data.get("agent", {})
    agent.pop("train_backbone", None)  # removed: it had no effect (see _RENAMED)
    if tok.get("clip_len") == 0:
        tok["clip_len"] = data.get("data", {}).get("clip_len", DataConfig.clip_len)
    if agent.get("imag_steps") == 0:
        agent["imag_steps"] = data.get("dynamics", {}).get("steps", DynamicsConfig.steps)
    for phase in ("train_tokenizer", "train_dynamics", "train_bc", "train_agent"):
        tc = data.get(phase, {})
        if "head_lr" in tc:
            head_lr, lr = tc.pop("head_lr"), tc.get("lr", TrainConfig.lr)
            tc["head_lr_scale"] = head_lr / lr if head_lr > 0 else 1.0
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    from worldflow.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True))


def read_config(path: str | Path) -> Config:
    with open(path) as f:
        return from_dict(json.load(f))


def warn_if_window_exceeds_training(section: str, window: int, trained: int) -> None:
    """Warn when a temporal attention window (``<section>.context``) is longer than the longest training clip.

    Such a model attends at inference over distances between frames that training never showed. Measured
    on Catch: the tokenizer streamed through a 16-frame window after 2-frame training lost the ball in 4 of
    5 frames; the dynamics model trained on 8-frame clips kept the ball falling right in 85% of imagined
    steps while its sequence was under ~12 frames, and in 45% beyond (window 8: 88% throughout).
    """
    if window > trained:
        warnings.warn(f"{section}.context={window} exceeds the {trained}-frame training clips: set "
                      f"{section}.context <= {trained} or train on longer clips", stacklevel=3)
