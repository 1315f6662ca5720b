"""The world model as one object (tokenizer + dynamics + agent heads) and batched imagined rollouts.

Agent features: the dynamics model's agent-token outputs (B, T, A, W) flattened to h (B, T, A·W).
A state h_t is read off the *commit pass* of frame t (the frame fed at the context level τ_ctx, as every
context frame is), so the heads see the same kind of input in behaviour cloning, in imagination and when
acting in the real env. Time alignment follows worldflow.agent.heads: the policy at h_t picks a_t,
which enters the tokens of frame t+1; reward and continue of that transition are read off h_{t+1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn

from worldflow import flow, rng
from worldflow.agent.heads import AgentHeads
from worldflow.config import Config
from worldflow.data.spaces import indices_to_values
from worldflow.distributed import rows_of
from worldflow.dynamics import RolloutStream, shift_actions
from worldflow.tokenizer.model import RunningRMS

PHASE2_TERMS = ("dynamics", "bc", "reward", "continue")


def features(agent_out: Tensor) -> Tensor:
    """Agent-token outputs (B, T, A, W) -> agent features h (B, T, A·W)."""
    return agent_out.flatten(-2)


def feature_dim(cfg: Config) -> int:
    return cfg.dynamics.agent_tokens * cfg.dynamics.transformer.width


class AgentModel(nn.Module):
    """Dynamics model + agent heads, trained and checkpointed together in the agent phases."""

    def __init__(self, cfg: Config, action_space: gym.Space):
        super().__init__()
        from worldflow.dynamics.model import build_dynamics

        self.dynamics = build_dynamics(cfg, action_space)
        self.heads = AgentHeads(feature_dim(cfg), action_space, cfg.agent, num_tasks=cfg.dynamics.num_tasks)
        # Running RMS of each phase-2 loss term (buffers only: checkpointed so a resume is exact)
        self.loss_rms = nn.ModuleDict({k: RunningRMS(cfg.agent.loss_norm_decay) for k in PHASE2_TERMS})

    def context_features(self, latents: Tensor, actions: Any, action_mask: Tensor | None,
                         generator: torch.Generator | None = None) -> Tensor:
        """Features h (B, T, F) of clean latents (B, T, N, D) fed as context (level τ_ctx, as at inference).

        actions are dataset-aligned (action t taken at frame t); they are shifted so frame t's tokens carry
        a_{t-1} and h_t never sees a_t.
        """
        cfg = self.dynamics.cfg
        b, t = latents.shape[:2]
        if cfg.context_noise:
            tau_val = flow.snap_tau(cfg.context_signal, cfg.k_max)
            rows = rows_of(b)  # noise drawn for the global batch and cut, as in dynamics_loss
            shape = (rows.total, *latents.shape[1:])
            noise = rows.take(rng.randn(shape, generator, latents.device, latents.dtype))
            z = flow.corrupt(latents, noise, torch.full((b, t), tau_val, device=latents.device))
        else:
            tau_val, z = 1.0 - 1.0 / cfg.k_max, latents
        tau = torch.full((b, t), tau_val, device=latents.device)
        d = torch.full((b, t), 1.0 / cfg.k_max, device=latents.device)
        prev, prev_mask = shift_actions(actions, action_mask)
        _, agent = self.dynamics(z, tau, d, prev, prev_mask)
        return features(agent)


@dataclass
class Imagined:
    """One batch of imagined trajectories (everything detached from the world model).

    h (B, H+1, F) states h_0..h_H; actions (B, H, *E) policy action tensors a_0..a_{H-1};
    rewards, continues (B, H): reward and continue probability of transition t -> t+1 (read off h_{t+1});
    latents (B, H, N, D) the generated frames.
    """

    h: Tensor
    actions: Tensor
    rewards: Tensor
    continues: Tensor
    latents: Tensor


@torch.no_grad()
def imagine(model: AgentModel, context: dict[str, Tensor], horizon: int, steps: int,
            generator: torch.Generator | None = None, sample: bool = True) -> Imagined:
    """Roll the frozen world model forward from dataset contexts with actions from the policy head.

    context: a clip batch with ``latents`` (B, C, N, D), dataset-aligned ``actions`` (B, C, ...) and
    ``action_mask`` (B, C). The last context frame is state h_0. K = ``steps`` denoising steps per frame.
    """
    dyn, heads = model.dynamics, model.heads
    lat = context["latents"]
    b = lat.shape[0]
    stream = RolloutStream(dyn, b, generator=generator)
    prev, prev_mask = shift_actions(context["actions"], context["action_mask"])
    h = [features(stream.observe(lat, prev, prev_mask))[:, -1]]
    acts, frames = [], []
    for _ in range(horizon):
        dist = heads.policy(h[-1])
        a = dist.sample(generator) if sample else dist.mode()
        z, agent = stream.imagine(steps, indices_to_values(heads.spec.space, a)[:, None])
        h.append(features(agent)[:, -1])
        acts.append(a)
        frames.append(z)
    hs = torch.stack(h, dim=1).float()  # float32 even when imagined under bf16 autocast
    nxt = hs[:, 1:]
    return Imagined(h=hs, actions=torch.stack(acts, dim=1), rewards=heads.reward(nxt).float(),
                    continues=heads.continue_prob(nxt).float(), latents=torch.cat(frames, dim=1).float())
