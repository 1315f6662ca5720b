"""The dynamics transformer (Dreamer 4): latents + actions + agent tokens → x̂ (x-prediction).

Tokens of one frame, in this order (``DynamicsModel.layout``)::

    [ S_z spatial | S_r registers | 1 (τ, d) | 1 action | A agent ]

- spatial: Linear of the tokenizer latents, ``pack`` latents (concatenated channels) per token;
- registers: learned, the same for every frame;
- (τ, d): embedding of τ's index on the K_max grid ‖ embedding of log2(1/d), projected to the width;
- action: :class:`ActionEncoder` (base embedding + each action component embedded on its own);
- agent: learned agent embeddings + task embedding; they attend to every token of their frame, and no
  other token attends to them, so the task cannot leak into predicted frames.

**Action alignment** is defined in :mod:`worldflow.dynamics.actions`: :meth:`DynamicsModel.forward` takes
frame-aligned (already shifted) actions; :func:`~worldflow.dynamics.loss.dynamics_loss` and
:func:`~worldflow.dynamics.rollout.rollout` take dataset-aligned ones and shift them.

The flow maths (corruption, (τ, d) sampling, objectives, Euler steps) all live in :mod:`worldflow.flow`.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import Tensor, nn

from worldflow import flow
from worldflow.config import Config, DynamicsConfig
from worldflow.dynamics.actions import ActionEncoder, Actions, init_small
from worldflow.errors import InputError
from worldflow.nn import KVCache, SpaceTimeTransformer
from worldflow.nn.ema import EMAWeights

# ---------------------------------------------------------------------------------------------------
# Model


class DynamicsModel(nn.Module):
    """x-prediction dynamics transformer over (B, T, N_l, D_b) tokenizer latents (Dreamer 4).

    cfg: :class:`DynamicsConfig`; latent_tokens N_l and latent_dim D_b of the tokenizer; action_space: the
    environment's gymnasium space (None: video only).
    """

    def __init__(
        self, cfg: DynamicsConfig, latent_tokens: int, latent_dim: int, action_space: gym.Space | None
    ):
        super().__init__()
        if latent_tokens % cfg.pack:
            raise ValueError(f"latent_tokens {latent_tokens} not divisible by pack {cfg.pack}")
        self.cfg = cfg
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        self.log2_k_max = flow.check_k_max(cfg.k_max)
        width = cfg.transformer.width
        sizes = dict(
            spatial=latent_tokens // cfg.pack,
            registers=cfg.registers,
            noise=1,
            action=1,
            agent=cfg.agent_tokens,
        )
        self.layout: dict[str, slice] = {}
        i = 0
        for name, n in sizes.items():
            self.layout[name] = slice(i, i + n)
            i += n
        self.tokens_per_frame = i

        self.embed_latents = nn.Linear(cfg.pack * latent_dim, width)
        self.registers = nn.Parameter(torch.randn(cfg.registers, width) * 0.02)
        self.tau_embed = nn.Embedding(cfg.k_max, width)  # τ·K_max ∈ {0, …, K_max − 1}
        self.step_embed = nn.Embedding(self.log2_k_max + 1, width)  # log2(1/d) ∈ {0, …, log2 K_max}
        self.noise_proj = nn.Linear(2 * width, width)
        self.action_encoder = ActionEncoder(action_space, width)
        self.agent_embed = nn.Parameter(torch.randn(cfg.agent_tokens, width) * 0.02)
        self.task_embed = nn.Embedding(max(1, cfg.num_tasks), width)
        self.head = nn.Linear(width, cfg.pack * latent_dim)
        self.apply(init_small)
        self.backbone = SpaceTimeTransformer(cfg.transformer)  # initialises itself
        self.register_buffer("spatial_mask", self._spatial_mask(), persistent=False)
        if cfg.ema_targets and cfg.ema <= 0:
            raise InputError("dynamics.ema_targets needs dynamics.ema > 0 (e.g. dynamics.ema=0.999)")
        # last, so it averages every parameter; buffers, so checkpoints and resume carry it
        self.ema = EMAWeights(self, cfg.ema) if cfg.ema > 0 else None

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step: update the EMA weights (if any)."""
        if self.ema is not None:
            self.ema.update(self)

    def _spatial_mask(self) -> Tensor:
        """(S, S) bool, True = query may attend key: agent tokens see all, nothing sees agent tokens."""
        s, agent = self.tokens_per_frame, self.layout["agent"]
        m = torch.ones(s, s, dtype=torch.bool)
        m[:, agent] = False
        m[agent, :] = True
        return m

    def tokens(
        self,
        z: Tensor,
        tau: Tensor,
        d: Tensor,
        actions: Actions = None,
        action_mask: Tensor | None = None,
        task: Tensor | None = None,
    ) -> Tensor:
        """Input tokens (B, T, S, width) of noisy latents z (B, T, N_l, D_b) at levels tau, d (B, T)."""
        b, t, n, dim = z.shape
        cfg = self.cfg
        spatial = self.embed_latents(z.reshape(b, t, n // cfg.pack, cfg.pack * dim))
        registers = self.registers.expand(b, t, -1, -1)
        tau_i = flow.tau_index(tau, cfg.k_max).clamp(0, cfg.k_max - 1)
        step_i = flow.step_index(d).clamp(0, self.log2_k_max)
        noise = self.noise_proj(torch.cat([self.tau_embed(tau_i), self.step_embed(step_i)], dim=-1))
        action = self.action_encoder(actions, action_mask, (b, t))
        task = torch.zeros(b, dtype=torch.long, device=z.device) if task is None else task
        agent = self.agent_embed + self.task_embed(task)[:, None, None, :]  # (B, 1, A, W)
        agent = agent.expand(b, t, -1, -1)
        return torch.cat([spatial, registers, noise[:, :, None], action[:, :, None], agent], dim=2)

    def forward(
        self,
        z: Tensor,
        tau: Tensor,
        d: Tensor,
        actions: Actions = None,
        action_mask: Tensor | None = None,
        task: Tensor | None = None,
        cache: KVCache | None = None,
        t0: int | None = None,
        commit: bool | int = True,
        outputs: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predict clean latents.

        z: noisy latents (B, T, N_l, D_b); tau, d: (B, T) on the grid; actions: **frame-aligned** leaves
        (B, T, ...) (the action that led to each frame, see :func:`shift_actions`) or None; action_mask
        (B, T) bool; task (B,) long or None (task 0). cache / t0 / commit: streaming, as in
        :meth:`SpaceTimeTransformer.forward`; the temporal window is always ``cfg.context``.
        outputs: return only the last ``outputs`` frames (T' = outputs; None: T' = T), skipping the work
        nothing reads (:meth:`SpaceTimeTransformer.forward`).
        Returns x̂ (B, T', N_l, D_b) (read as velocity under objective flow_v) and the agent-token outputs
        (B, T', A, width).
        """
        b, t, n, dim = z.shape
        x = self.tokens(z, tau, d, actions, action_mask, task)
        h = self.backbone(x, self.spatial_mask, self.cfg.context, cache, t0, commit, outputs)
        out = self.head(h[:, :, self.layout["spatial"]]).reshape(b, h.shape[1], n, dim)
        return out, h[:, :, self.layout["agent"]]

    def new_cache(self, batch: int) -> KVCache:
        """A bounded KV cache holding the last ``cfg.context − 1`` frames (constant memory)."""
        return self.backbone.new_cache(batch, self.cfg.context)


def build_dynamics(cfg: Config, action_space: gym.Space) -> DynamicsModel:
    return DynamicsModel(cfg.dynamics, latent_tokens=cfg.tokenizer.num_latents(cfg.data.size),
                         latent_dim=cfg.tokenizer.latent_dim, action_space=action_space)
