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

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from worldflow import flow
from worldflow.data.spaces import env_values
from worldflow.errors import InputError
from worldflow.gym_env.context import Clip, ContextBank
from worldflow.gym_env.imagined import ImaginedBatch, RowNoiseStream
from worldflow.nn import KVCache
from worldflow.run import Run

__all__ = ["ENV_ID", "WorldModelEnv", "WorldModelVectorEnv", "register"]

ENV_ID = "worldflow/WorldModel-v0"
METADATA = {"render_modes": ["rgb_array"], "render_fps": 15}


# ---------------------------------------------------------------------------------------------------
# Shared set-up of both envs


class _Setup:
    """Arguments common to both envs, resolved against the run: models, spaces, context bank, windows."""

    def __init__(self, run, steps, horizon, context, device, render_mode, phase, sample_contexts_from,
                 batched: bool):
        if sample_contexts_from not in ("train", "heldout"):
            raise InputError(f"sample_contexts_from: 'train' or 'heldout', not {sample_contexts_from!r}")
        if render_mode is not None and render_mode not in METADATA["render_modes"]:
            raise InputError(f"render_mode must be None or one of {METADATA['render_modes']}, "
                             f"got {render_mode!r}")
        if horizon is not None and horizon < 1:
            raise InputError(f"horizon must be >= 1 step or None, got {horizon}")
        self.wm = Run(run).world_model(phase, device)
        dyn = self.wm.cfg.dynamics
        flow.check_steps(steps, dyn.k_max)
        self.steps, self.horizon, self.device = steps, horizon, torch.device(device)
        self.context = max(1, dyn.context - 1) if context is None else int(context)
        if self.context < 1:
            raise InputError(f"context must be >= 1 frame, got {context}")
        self.decoder_window = min(self.wm.tokenizer.cfg.context, self.context + 1)
        # A batched env restarts sub-envs by copying cache rows, so every context must leave both caches
        # full (see the module docstring); a single env starts a fresh stream and takes any context.
        self.min_context = max(dyn.context - 1, self.decoder_window - 1) if batched else 1
        if self.context < self.min_context:
            raise InputError(f"the vector env needs context >= {self.min_context} frames (model context "
                             f"{dyn.context} - 1) so that restarting a sub-env keeps the batched caches "
                             f"consistent; got {self.context}")
        self.bank = ContextBank.load(run, sample_contexts_from, self.context, self.wm.tokenizer, self.wm.cfg)
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
            raise InputError(f"context_latents has {len(clip)} frames, this env needs >= {self.min_context}")
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
        uncertainty: also denoise each frame's noise with 2K steps and report the mean squared latent
            difference as info['step_disagreement'] (a hallucination signal; about 3x the step time).

    Observations are uint8 (size, size, 3) frames like the real env's; actions live in the run's action
    space. ``reset(options={'context_latents': (C, N, D), 'context_actions': (C, *E) (dataset-aligned,
    optional), 'context_action_mask': (C,)})`` starts from a given context. info: 'continue_prob' per step
    (and 'step_disagreement' with ``uncertainty``); 'context_episode', 'context_start' at reset (-1 for a
    given context).
    """

    metadata = METADATA

    def __init__(self, run: str | Path, steps: int = 4, horizon: int | None = None,
                 context: int | None = None, device: str = "cpu", render_mode: str | None = "rgb_array",
                 phase: str | None = None, sample_contexts_from: str = "train", uncertainty: bool = False):
        self._setup = _Setup(run, steps, horizon, context, device, render_mode, phase, sample_contexts_from,
                             batched=False)
        k_max = self._setup.wm.cfg.dynamics.k_max
        if uncertainty and 2 * steps > k_max:
            raise InputError(f"uncertainty compares K = {steps} with 2K = {2 * steps} steps, finer than the "
                             f"model's k_max {k_max}: use steps <= {k_max // 2}")
        self._check_steps = 2 * steps if uncertainty else None
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
        self._world.stream.check_steps = self._check_steps
        self._elapsed = 0
        return self._frame.copy(), _info(clip)

    def step(self, action: Any):
        if self._world is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        a = env_values(self.action_space, action, batched=False)
        frames, reward, cont = self._world.step(a[None])
        self._frame = frames[0].numpy()
        self._elapsed += 1
        p = float(cont[0])
        truncated = self._setup.horizon is not None and self._elapsed >= self._setup.horizon
        info = {"continue_prob": p}
        if self._check_steps:
            info["step_disagreement"] = float(self._world.stream.last_disagreement[0])
        return self._frame.copy(), float(reward[0]), p < 0.5, truncated, info

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
            raise InputError(f"num_envs must be >= 1, got {num_envs}")
        if horizon is not None and max_episode_steps is not None and horizon != max_episode_steps:
            raise InputError("horizon and max_episode_steps are aliases: pass one")
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
                raise InputError(f"got {len(seeds)} seeds for {self.num_envs} sub-envs")
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
                raise InputError(f"options['reset_mask'] must be a ({self.num_envs},) bool array with a True")
            if not self._started:
                raise InputError("reset without a reset_mask first (the batched stream does not exist yet)")
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
        acts = env_values(self.single_action_space, actions, batched=True)
        if acts.shape[0] != self.num_envs:
            raise InputError(f"got actions for {acts.shape[0]} sub-envs, expected {self.num_envs}")
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
