"""The trained world model as gymnasium environments: imagined episodes behind the standard env APIs.

``WorldModelEnv(run)`` is a ``gymnasium.Env``; ``WorldModelVectorEnv(run, num_envs)`` a
``gymnasium.vector.VectorEnv`` that advances N imagined episodes in one batched forward pass per step. Both
are registered as ``worldflow/WorldModel-v0`` (``gymnasium.make`` / ``gymnasium.make_vec``), so any RL code
written against gymnasium can train inside the world model. See docs/tutorial_vector_env.md.

An imagined episode:

- **reset** draws a context clip of C latent frames (``context``, default: model context − 1) from the run's
  cached dataset latents (``<run>/dynamics/latents_<split>_<key>.pt``) with the env's ``np_random``, or
  takes ``options['context_latents']``. The dynamics model observes it (:meth:`RolloutStream.observe`, with
  the dataset actions made frame-aligned by :func:`shift_actions`); the tokenizer decodes it through a
  streaming decode cache, and the last context frame is the first observation.
- **step(a)** generates the next frame's latents in K = ``steps`` shortcut steps conditioned on a
  (:meth:`RolloutStream.imagine`), decodes it with the decode cache, and reads reward and continue
  probability off the agent features h_{t+1} of that frame; terminated = continue_prob < 0.5.

Memory and time per step are constant however long an episode runs: the dynamics KV cache holds the last
model-context − 1 frames and the decode cache the last ``decoder_window − 1``; the stream keeps no history.

**Decoder window.** The env's decoder attends to ``min(tokenizer context, C + 1)`` frames, not always the
tokenizer's full window: a reset then fills the decode cache exactly, which restarting one sub-env of a
batched cache requires (below). Pass a larger ``context`` to give the decoder more history.

**Seeding.** ``reset(seed=s)`` seeds the context choice (``np_random``) and a ``torch.Generator`` that
draws every diffusion and context-corruption noise, so equal seeds and actions give identical frames.

**Vector env.** One :class:`RowNoiseStream` and one decode cache of batch N. Noise is drawn row by row
from per-sub-env generators, so sub-env i reproduces ``WorldModelEnv`` reset with seed ``s + i`` up to
float summation order. Autoreset is gymnasium's NEXT_STEP mode. To restart sub-env i while the others go
on, its new context runs through a small stream whose absolute frame index is aligned to the batched
stream's (keys are cached already rotated at absolute positions), and its rows are copied into the batched
caches (:meth:`KVCache.copy_rows_from`). That needs every cache row to hold the same frame slots, so the
vector env needs contexts of at least model-context − 1 frames (the default), which leave every cache full.

Runs without an agent phase fall back to the dynamics checkpoint: no reward or continue heads, so reward 0
and never terminated (a warning says so).

**Inference mode.** Episodes start, restart and step under ``torch.inference_mode`` (no autograd or
version-counter bookkeeping: ~12% less time per step on CPU than ``no_grad``), so the streams' KV caches
are inference tensors: read them freely, but drive ``env.stream`` by hand only inside
``torch.inference_mode()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from worldflow import flow, rng
from worldflow.agent.distributions import check_action
from worldflow.agent.model import features
from worldflow.config import Config
from worldflow.dynamics import DynamicsModel, RolloutStream, shift_actions
from worldflow.nn import KVCache
from worldflow.run import AGENT_PHASES, load_agent_model, run_action_space, run_dataset
from worldflow.tokenizer.model import CausalTokenizer

__all__ = [
    "ENV_ID",
    "Clip",
    "ContextBank",
    "ImaginedBatch",
    "RowNoiseStream",
    "WorldModel",
    "WorldModelEnv",
    "WorldModelVectorEnv",
    "load_world_model",
    "register",
]

ENV_ID = "worldflow/WorldModel-v0"
METADATA = {"render_modes": ["rgb_array"], "render_fps": 15}


# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass
class WorldModel:
    """The frozen pieces of a trained run: tokenizer, dynamics model, agent heads (None: dynamics only)."""

    tok: CausalTokenizer
    dynamics: DynamicsModel
    heads: Any  # worldflow.agent.heads.AgentHeads | None
    cfg: Config
    phase: str
    action_space: gym.Space

    @property
    def size(self) -> int:
        return self.tok.image_size


def load_world_model(run: str | Path, phase: str | None = None, device: torch.device | str = "cpu"
                     ) -> WorldModel:
    """Tokenizer + dynamics + heads of a run. ``phase``: None (agent, else agent_bc, else dynamics only,
    with a warning), 'agent', 'agent_bc' or 'dynamics' (no heads)."""
    from worldflow.checkpoint import CheckpointError
    from worldflow.run import load_dynamics, load_tokenizer

    tok, _ = load_tokenizer(run, device)
    space = run_action_space(run)
    if phase is None or phase in AGENT_PHASES:
        try:
            model, cfg, ph = load_agent_model(run, phase, device)
            return WorldModel(tok, model.dynamics, model.heads, cfg, ph, space)
        except CheckpointError:
            if phase is not None:
                raise
        warnings.warn(f"run {run} has no agent checkpoint: using the dynamics model alone, so rewards are 0 "
                      "and episodes never terminate (train the agent phase for reward/continue heads)",
                      stacklevel=3)
    elif phase != "dynamics":
        raise ValueError(f"phase must be None, 'dynamics' or one of {AGENT_PHASES}, got {phase!r}")
    dyn, cfg = load_dynamics(run, space, device)
    return WorldModel(tok, dyn.requires_grad_(False), None, cfg, "dynamics", space)


# ---------------------------------------------------------------------------------------------------
# Context clips


@dataclass
class Clip:
    """A context clip: latents (C, N, D), dataset-aligned actions (C, *E) and action_mask (C,) bool.

    ``episode`` / ``start`` say where it came from in the dataset (-1 for a clip passed in by the user).
    """

    latents: Tensor
    actions: Tensor
    action_mask: Tensor
    episode: int = -1
    start: int = -1

    @classmethod
    def given(cls, space: gym.Space, latents: Any, actions: Any = None, action_mask: Any = None) -> Clip:
        """A user-supplied context; without actions the frames count as unlabeled video (mask False)."""
        lat = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
        if lat.dim() != 3 or lat.shape[0] < 1:
            raise ValueError(f"context_latents must be (C >= 1, N, D), got {tuple(lat.shape)}")
        c = lat.shape[0]
        if actions is None:
            acts, mask = _null_actions(space, c), torch.zeros(c, dtype=torch.bool)
        else:
            acts = _dynamics_actions(space, actions, batched=True)
            mask = torch.ones(c, dtype=torch.bool) if action_mask is None else torch.as_tensor(action_mask)
        if acts.shape[0] != c or mask.shape != (c,):
            raise ValueError(f"context actions / action_mask must have {c} rows like the latents")
        return cls(lat, acts, mask.bool())

    def __len__(self) -> int:
        return self.latents.shape[0]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _null_actions(space: gym.Space, n: int) -> Tensor:
    """(n, *E) placeholder actions (ignored under a False mask)."""
    shape = () if isinstance(space, gym.spaces.Discrete) else tuple(space.shape)
    dtype = torch.float32 if isinstance(space, gym.spaces.Box) else torch.long
    return torch.zeros((n, *shape), dtype=dtype)


def _dynamics_actions(space: gym.Space, action: Any, batched: bool) -> Tensor:
    """Env action(s) -> the values the dynamics model embeds: the env's own values (as in the dataset),
    long for integer spaces, float32 for Box. Validated first: ValueError names the space and the action."""
    arr = check_action(space, action, batched)
    dtype = torch.float32 if isinstance(space, gym.spaces.Box) else torch.long
    return torch.as_tensor(np.array(arr)).to(dtype)  # a copy (ascontiguousarray would make 0-d arrays 1-d)


class ContextBank:
    """A run's encoded dataset episodes, to draw context clips of C frames from.

    Only clips whose last frame has a successor in its episode are drawn (a clip ending on an episode's
    final frame would start the imagined episode in a terminal state). Windows are uniform over all
    valid (episode, start) pairs.
    """

    def __init__(self, episodes: list[dict[str, Tensor]], ids: list[int], context: int):
        self.episodes, self.ids, self.context = episodes, list(ids), context
        lengths = np.array([len(e["latents"]) for e in episodes])
        self.windows = np.maximum(lengths - context, 0)  # starts s with frame s + C inside the episode
        if self.windows.sum() == 0:
            raise ValueError(f"no episode has more than {context} frames (longest: {lengths.max()}): "
                             "use a shorter context")
        self.cum = np.cumsum(self.windows)

    @classmethod
    def load(cls, run: str | Path, split: str, context: int, tok: CausalTokenizer, cfg: Config
             ) -> ContextBank:
        """The split's latents cached by ``train dynamics``; (re)encoded if the dataset is still present."""
        from worldflow.run import latent_bank

        data = run_dataset(run).get("data")
        if data and Path(data).exists():  # validates the cache key against dataset + tokenizer
            bank = latent_bank(run, data, cfg, split, tok, progress=False)
            return cls(bank.episodes, bank.ids, context)
        files = sorted((Path(run) / "dynamics").glob(f"latents_{split}_*.pt"), key=_mtime)
        if not files:
            raise FileNotFoundError(f"run {run} has no cached {split} latents and its dataset {data} is "
                                    "gone: pass options={'context_latents': ...} to reset")
        saved = torch.load(files[-1], weights_only=True)  # the newest: written after the latest tokenizer
        return cls(saved["episodes"], saved["ids"], context)

    def sample(self, rng: np.random.Generator) -> Clip:
        k = int(rng.integers(int(self.cum[-1])))
        e = int(np.searchsorted(self.cum, k, side="right"))
        s = k - int(self.cum[e] - self.windows[e])
        ep, sl = self.episodes[e], slice(s, s + self.context)
        return Clip(ep["latents"][sl].float(), ep["actions"][sl], ep["action_mask"][sl].bool(),
                    self.ids[e], s)


# ---------------------------------------------------------------------------------------------------
# Batched imagination


class RowNoiseStream(RolloutStream):
    """A :class:`RolloutStream` whose noise is drawn row by row, row i from ``generators[i]``.

    Row i then sees exactly the noise a 1-row stream with that generator would, whatever the batch: a
    batched env reproduces single envs. Rows with ``active[i]`` False get zero noise and leave their
    generator untouched (a sub-env about to be restarted must not consume its noise). Only the noise
    source differs from the parent (tests check that a 1-row stream equals it bit for bit).
    """

    def __init__(self, model: DynamicsModel, generators: list[torch.Generator], t0: int = 0):
        super().__init__(model, len(generators))
        self.generators = list(generators)
        self.active: np.ndarray | None = None  # (B,) bool, or None = all rows
        self.t = t0  # absolute index of the first frame (an empty cache may start anywhere)

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, I) of ``shape`` = (B, ...), row i from generator i (zeros for inactive rows)."""
        row = (1, *shape[1:])
        return torch.cat([
            rng.randn(row, g, self.device, dtype) if self.active is None or self.active[i]
            else torch.zeros(row, device=self.device, dtype=dtype)
            for i, g in enumerate(self.generators)
        ])


class ImaginedBatch:
    """B imagined episodes in lockstep: one :class:`RowNoiseStream` and one decode cache of batch B.

    ``start`` begins all rows at frame 0; ``restart`` replaces some rows while the others go on; ``step``
    advances every row by one generated frame. Frames are uint8 (B, H, W, 3). All three run under
    ``torch.inference_mode`` (see the module docstring).
    """

    def __init__(self, wm: WorldModel, generators: list[torch.Generator], steps: int, decoder_window: int):
        self.wm, self.generators, self.steps = wm, list(generators), steps
        self.decoder_window = decoder_window
        self.stream: RowNoiseStream | None = None
        self.decode_cache: KVCache | None = None

    @property
    def batch(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        return self.wm.dynamics.head.weight.device

    def _observe(self, clips: list[Clip], gens: list[torch.Generator], t0: int
                 ) -> tuple[RowNoiseStream, KVCache, Tensor]:
        """A fresh stream + decode cache starting at absolute frame t0 that have taken in ``clips`` (all of
        one length C); returns them and the decoded last context frames (b, H, W, 3) uint8."""
        dev = self.device
        lat = torch.stack([c.latents for c in clips]).to(dev)
        acts, mask = shift_actions(torch.stack([c.actions for c in clips]).to(dev),
                                   torch.stack([c.action_mask for c in clips]).to(dev))
        stream = RowNoiseStream(self.wm.dynamics, gens, t0)
        stream.observe(lat, acts, mask)
        cache = self.wm.tok.decoder.new_cache(len(clips), self.decoder_window)
        cache.next_t = t0  # an empty cache starts at any frame index; aligned with the stream's
        frames = self.wm.tok.decode_uint8(lat, cache)[:, -1]
        return stream, cache, frames

    @torch.inference_mode()
    def start(self, clips: list[Clip]) -> Tensor:
        """Begin every row from its clip (one clip per row, equal lengths) -> first frames (B, H, W, 3)."""
        if len({len(c) for c in clips}) != 1:
            raise ValueError("a batched start needs contexts of one length")
        self.stream, self.decode_cache, frames = self._observe(clips, self.generators, 0)
        return frames.cpu()

    @torch.inference_mode()
    def restart(self, rows: list[int], clips: list[Clip]) -> Tensor:
        """Restart ``rows`` from ``clips`` while the others go on -> their first frames (len(rows), H, W, 3).

        The new contexts run through a small stream that ends on the batched stream's current frame
        index (RoPE keys are cached rotated at absolute positions); its cache rows are then copied in.
        """
        out = torch.empty(len(rows), self.wm.size, self.wm.size, 3, dtype=torch.uint8)
        for c in sorted({len(c) for c in clips}):  # one small stream per context length
            sel = [j for j, clip in enumerate(clips) if len(clip) == c]
            sub = [rows[j] for j in sel]
            stream, cache, frames = self._observe([clips[j] for j in sel], [self.generators[i] for i in sub],
                                                  self.stream.t - c)
            self.stream.cache.copy_rows_from(sub, stream.cache)
            self.decode_cache.copy_rows_from(sub, cache)
            out[sel] = frames.cpu()
        return out

    @torch.inference_mode()
    def step(self, actions: Tensor, active: np.ndarray | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Generate one frame per row given env actions (B, *E) (dynamics values).

        ``active`` (B,) bool or None (all): False marks rows whose result will be discarded (they are
        about to restart); they draw no noise, so their generators stay in step with single envs.
        Returns frames (B, H, W, 3) uint8, reward (B,) and continue probability (B,), float32 on the CPU.
        """
        self.stream.active = active
        try:
            z, agent = self.stream.imagine(self.steps, actions.to(self.device)[:, None])
        finally:
            self.stream.active = None
        frames = self.wm.tok.decode_uint8(z, self.decode_cache)[:, 0]
        heads = self.wm.heads
        if heads is None:  # dynamics only: no reward model, the episode never ends
            return frames.cpu(), torch.zeros(self.batch), torch.ones(self.batch)
        h = features(agent)[:, -1]
        return frames.cpu(), heads.reward(h).float().cpu(), heads.continue_prob(h).float().cpu()


# ---------------------------------------------------------------------------------------------------
# Shared set-up of both envs


class _Setup:
    """Arguments common to both envs, resolved against the run: models, spaces, context bank, windows."""

    def __init__(self, run, steps, horizon, context, device, render_mode, phase, sample_contexts_from,
                 batched: bool):
        if sample_contexts_from not in ("train", "heldout"):
            raise ValueError(f"sample_contexts_from: 'train' or 'heldout', not {sample_contexts_from!r}")
        if render_mode is not None and render_mode not in METADATA["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {METADATA['render_modes']}, "
                             f"got {render_mode!r}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 step or None, got {horizon}")
        self.wm = load_world_model(run, phase, device)
        dyn = self.wm.cfg.dynamics
        flow.check_steps(steps, dyn.k_max)
        self.steps, self.horizon, self.device = steps, horizon, torch.device(device)
        self.context = max(1, dyn.context - 1) if context is None else int(context)
        if self.context < 1:
            raise ValueError(f"context must be >= 1 frame, got {context}")
        self.decoder_window = min(self.wm.tok.cfg.context, self.context + 1)
        # A batched env restarts sub-envs by copying cache rows, so every context must leave both caches
        # full (see the module docstring); a single env starts a fresh stream and takes any context.
        self.min_context = max(dyn.context - 1, self.decoder_window - 1) if batched else 1
        if self.context < self.min_context:
            raise ValueError(f"the vector env needs context >= {self.min_context} frames (model context "
                             f"{dyn.context} - 1) so that restarting a sub-env keeps the batched caches "
                             f"consistent; got {self.context}")
        self.bank = ContextBank.load(run, sample_contexts_from, self.context, self.wm.tok, self.wm.cfg)
        size = self.wm.size
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = self.wm.action_space

    def clip(self, rng: np.random.Generator, options: dict[str, Any] | None, row: int | None = None) -> Clip:
        """The context of one (sub-)env: from ``options`` if they hold ``context_latents``, else drawn.

        For sub-env ``row`` of a vector env, (num_envs, C, N, D) latents (and their actions / mask) are
        indexed by the row; (C, N, D) ones are shared by every sub-env being reset.
        """
        if not options or options.get("context_latents") is None:
            return self.bank.sample(rng)
        per_env = row is not None and np.ndim(options["context_latents"]) == 4

        def pick(key: str) -> Any:
            value = options.get(key)
            return np.asarray(value)[row] if per_env and value is not None else value

        clip = Clip.given(self.action_space, pick("context_latents"), pick("context_actions"),
                          pick("context_action_mask"))
        if len(clip) < self.min_context:
            raise ValueError(f"context_latents has {len(clip)} frames, this env needs >= {self.min_context}")
        return clip


def _info(clip: Clip) -> dict[str, Any]:
    return {"context_episode": clip.episode, "context_start": clip.start}


def _new_generator(device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()  # nondeterministic until reset(seed=...)
    return g


# ---------------------------------------------------------------------------------------------------
# Single env


class WorldModelEnv(gym.Env):
    """One imagined episode at a time inside a trained run's world model (see the module docstring).

    Args:
        run: a trained run directory (tokenizer + dynamics, ideally agent phases for reward/continue).
        steps: K denoising steps per generated frame (power of two <= the model's K_max).
        horizon: max steps per episode (then truncated); None = no limit.
        context: context frames C a reset observes; default model context − 1.
        device: torch device of the models.
        render_mode: 'rgb_array' (render() returns the latest frame) or None.
        phase: checkpoint to use: None (agent, else agent_bc, else dynamics), or a phase name.
        sample_contexts_from: dataset split the context clips come from ('train' | 'heldout').

    Observations are uint8 (size, size, 3) frames like the real env's; actions live in the run's action
    space. ``reset(options={'context_latents': (C, N, D), 'context_actions': (C, *E) (dataset-aligned,
    optional), 'context_action_mask': (C,)})`` starts from a given context. info: 'continue_prob' per step;
    'context_episode', 'context_start' at reset (-1 for a given context).
    """

    metadata = METADATA

    def __init__(self, run: str | Path, steps: int = 4, horizon: int | None = None,
                 context: int | None = None, device: str = "cpu", render_mode: str | None = "rgb_array",
                 phase: str | None = None, sample_contexts_from: str = "train"):
        self._setup = _Setup(run, steps, horizon, context, device, render_mode, phase, sample_contexts_from,
                             batched=False)
        self.observation_space = self._setup.observation_space
        self.action_space = self._setup.action_space
        self.render_mode = render_mode
        self.world_model = self._setup.wm
        self._gen = _new_generator(self._setup.device)
        self._world: ImaginedBatch | None = None
        self._frame: np.ndarray | None = None
        self._elapsed = 0

    @property
    def stream(self) -> RowNoiseStream | None:
        """The current episode's rollout stream (its ``cache`` is the bounded dynamics KV cache)."""
        return None if self._world is None else self._world.stream

    @property
    def decode_cache(self) -> KVCache | None:
        return None if self._world is None else self._world.decode_cache

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._gen.manual_seed(seed)
        clip = self._setup.clip(self.np_random, options)
        s = self._setup
        self._world = ImaginedBatch(s.wm, [self._gen], s.steps, s.decoder_window)
        self._frame = self._world.start([clip])[0].numpy()
        self._elapsed = 0
        return self._frame.copy(), _info(clip)

    def step(self, action: Any):
        if self._world is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        a = _dynamics_actions(self.action_space, action, batched=False)
        frames, reward, cont = self._world.step(a[None])
        self._frame = frames[0].numpy()
        self._elapsed += 1
        p = float(cont[0])
        truncated = self._setup.horizon is not None and self._elapsed >= self._setup.horizon
        return self._frame.copy(), float(reward[0]), p < 0.5, truncated, {"continue_prob": p}

    def render(self) -> np.ndarray | None:
        if self.render_mode is None or self._frame is None:
            return None
        return self._frame.copy()

    def close(self) -> None:
        self._world = None


# ---------------------------------------------------------------------------------------------------
# Vector env


class WorldModelVectorEnv(VectorEnv):
    """N imagined episodes batched into one forward pass per step (see the module docstring).

    Arguments as :class:`WorldModelEnv`, plus ``num_envs``; ``max_episode_steps`` is an alias of
    ``horizon`` (what ``gymnasium.make_vec`` passes). ``context`` must be >= model context − 1 (default).

    - ``reset(seed=s)`` seeds sub-env i with s + i (or ``seed=[s_0, ...]``), so sub-env i reproduces a
      ``WorldModelEnv`` reset with that seed and given the same actions.
    - Autoreset: ``AutoresetMode.NEXT_STEP``. A sub-env that terminated or truncated is reset by the next
      ``step`` call (that call's action is ignored for it, reward 0, not done).
    - ``reset(options={'reset_mask': (N,) bool})`` resets only the masked sub-envs (after a full reset).
      ``options['context_latents']``: (C, N_l, D) for every reset sub-env or (num_envs, C, N_l, D).
    - infos: 'continue_prob' (N,) with mask '_continue_prob' (False where a sub-env was reset);
      'context_episode' / 'context_start' for sub-envs (re)set by that call.
    """

    metadata = {**METADATA, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, run: str | Path, num_envs: int = 1, steps: int = 4, horizon: int | None = None,
                 context: int | None = None, device: str = "cpu", render_mode: str | None = "rgb_array",
                 phase: str | None = None, sample_contexts_from: str = "train",
                 max_episode_steps: int | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if horizon is not None and max_episode_steps is not None and horizon != max_episode_steps:
            raise ValueError("horizon and max_episode_steps are aliases: pass one")
        horizon = horizon if horizon is not None else max_episode_steps
        self._setup = _Setup(run, steps, horizon, context, device, render_mode, phase, sample_contexts_from,
                             batched=True)
        self.num_envs = num_envs
        self.single_observation_space = self._setup.observation_space
        self.single_action_space = self._setup.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = render_mode
        self.world_model = self._setup.wm
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        s = self._setup
        self._gens = [_new_generator(s.device) for _ in range(num_envs)]
        self._world = ImaginedBatch(s.wm, self._gens, s.steps, s.decoder_window)
        size = self.single_observation_space.shape[0]
        self._obs = np.zeros((num_envs, size, size, 3), np.uint8)
        self._elapsed = np.zeros(num_envs, np.int64)
        self._autoreset = np.zeros(num_envs, bool)
        self._started = False

    @property
    def stream(self) -> RowNoiseStream | None:
        return self._world.stream

    @property
    def decode_cache(self) -> KVCache | None:
        return self._world.decode_cache

    def _seed(self, seed: int | list[int | None] | None) -> None:
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
            if seed is not None:
                self._np_random, self._np_random_seed = seeding.np_random(int(seed))
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} sub-envs")
        for i, s in enumerate(seeds):
            if s is not None:  # the same two seedings as WorldModelEnv.reset(seed=s)
                self._rngs[i] = seeding.np_random(s)[0]
                self._gens[i].manual_seed(s)
            elif self._rngs[i] is None:
                self._rngs[i] = seeding.np_random()[0]

    def _clips(self, rows: list[int], options: dict[str, Any] | None) -> list[Clip]:
        return [self._setup.clip(self._rngs[i], options, row=i) for i in rows]

    def _infos(self, rows: list[int], clips: list[Clip], infos: dict[str, Any]) -> dict[str, Any]:
        for i, clip in zip(rows, clips):
            infos = self._add_info(infos, _info(clip), i)
        return infos

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        self._seed(seed)
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is None:
            rows = list(range(self.num_envs))
        else:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != (self.num_envs,) or not mask.any():
                raise ValueError(f"options['reset_mask'] must be a ({self.num_envs},) bool array with a True")
            if not self._started:
                raise ValueError("reset without a reset_mask first (the batched stream does not exist yet)")
            rows = np.flatnonzero(mask).tolist()
        clips = self._clips(rows, options)
        if mask is None:
            self._obs[:] = self._world.start(clips).numpy()
            self._started = True
        else:
            self._obs[rows] = self._world.restart(rows, clips).numpy()
        self._elapsed[rows] = 0
        self._autoreset[rows] = False
        return self._obs.copy(), self._infos(rows, clips, {})

    def step(self, actions: Any):
        if not self._started:
            raise gym.error.ResetNeeded("call reset() before step()")
        acts = _dynamics_actions(self.single_action_space, actions, batched=True)
        if acts.shape[0] != self.num_envs:
            raise ValueError(f"got actions for {acts.shape[0]} sub-envs, expected {self.num_envs}")
        restart = np.flatnonzero(self._autoreset).tolist()
        active = ~self._autoreset
        rewards = np.zeros(self.num_envs, np.float64)
        cont = np.ones(self.num_envs, np.float32)
        if active.any():  # one batched pass; rows about to restart ride along and are overwritten below
            frames, rew, c = self._world.step(acts, active)
            self._obs[active] = frames.numpy()[active]
            rewards[active], cont[active] = rew.numpy()[active], c.numpy()[active]
            self._elapsed[active] += 1
        terminated = active & (cont < 0.5)
        horizon = self._setup.horizon
        truncated = active & (self._elapsed >= horizon) if horizon is not None else np.zeros_like(active)
        infos = {"continue_prob": cont, "_continue_prob": active.copy()}
        if restart:
            clips = self._clips(restart, None)
            self._obs[restart] = self._world.restart(restart, clips).numpy()
            self._elapsed[restart] = 0
            infos = self._infos(restart, clips, infos)
        self._autoreset = terminated | truncated
        return self._obs.copy(), rewards, terminated, truncated, infos

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None or not self._started:
            return None
        return tuple(self._obs.copy())

    def close_extras(self, **kwargs: Any) -> None:
        self._world.stream = self._world.decode_cache = None
        self._started = False


# ---------------------------------------------------------------------------------------------------
# Registration


def register() -> None:
    """Register ``worldflow/WorldModel-v0`` (once). ``import worldflow.envs`` does the same, lazily."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="worldflow.gym_env.env:WorldModelEnv",
                     vector_entry_point="worldflow.gym_env.env:WorldModelVectorEnv")


register()
