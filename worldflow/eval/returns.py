"""Acting in the real environment with a policy trained inside the world model.

The agent perceives through the world model: each real frame is encoded by the tokenizer (streaming)
and fed to the dynamics model as a context frame together with the previous action; the policy head
reads the agent-token features of that frame. N episodes run in lockstep as one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from worldflow.agent.model import AgentModel, features
from worldflow.data.spaces import indices_to_values
from worldflow.dynamics import RolloutStream
from worldflow.errors import InputError
from worldflow.run import Run, load_agent_model
from worldflow.tokenizer.model import CausalTokenizer


class WorldModelAgent:
    """Batched policy over real pixel observations (B, H, W, 3) uint8, perceiving through the world model."""

    def __init__(self, tok: CausalTokenizer, model: AgentModel, batch: int, sample: bool = True,
                 seed: int = 0):
        self.tok, self.model, self.batch, self.sample = tok, model, batch, sample
        self.device = next(model.parameters()).device
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.enc_cache = self.tok.new_encode_cache(self.batch)
        self.stream = RolloutStream(self.model.dynamics, self.batch, generator=self.gen)
        self.prev: torch.Tensor | None = None

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs uint8 (B, H, W, 3) -> env actions (B, ...) (numpy, in the env's action space)."""
        frames = torch.as_tensor(np.ascontiguousarray(obs), device=self.device)
        z = self.tok.encode(frames[:, None], cache=self.enc_cache)
        heads = self.model.heads
        if self.prev is None:  # the first frame of an episode has no incoming action
            agent = self.stream.observe(z)
        else:
            agent = self.stream.observe(z, indices_to_values(heads.spec.space, self.prev)[:, None])
        dist = heads.policy(features(agent)[:, -1])
        a = dist.sample(self.gen) if self.sample else dist.mode()
        self.prev = a
        return np.asarray(heads.spec.to_env(a.cpu()))


def run_episodes(env_id: str, size: int, episodes: int, act_fn: Callable[[np.ndarray], Any], seed: int,
                 progress: bool = True, max_steps: int = 10_000, record: bool = False) -> dict[str, Any]:
    """Run ``episodes`` real-env episodes in lockstep (env i reset with seed + i);
    ``act_fn(obs (B,H,W,3)) -> actions (B, ...)``.

    Returns mean/std return, per-episode returns and lengths, and (record=True) ``records``, one
    :class:`~worldflow.envs.EpisodeRecord` per episode.
    """
    from worldflow.envs.loop import play_episodes
    from worldflow.envs.wrappers import make_env

    envs = [make_env(env_id, size=size) for _ in range(episodes)]
    bar = tqdm(total=episodes, desc=f"{env_id} episodes", disable=not progress, leave=False)
    try:
        played = play_episodes(envs, act_fn, [seed + i for i in range(episodes)], max_steps, record=record,
                               on_end=lambda i: bar.update(1))
    finally:
        bar.close()
        for e in envs:
            e.close()
    out = played.summary()
    if record:
        out["records"] = played.records
    return out


def policy_returns(run, env_id: str, episodes: int, phase: str | None, sample: bool, seed: int,
                   progress: bool = True, record: bool = False, checkpoint: str | Path | None = None
                   ) -> dict[str, Any]:
    """Real-env returns of a run's policy (phase 'agent' or 'agent_bc'; ``checkpoint``: one checkpoint
    directory of that phase instead of its latest)."""
    from worldflow.distributed import device_of
    r = Run(run)
    model, cfg, ph = load_agent_model(run, phase, checkpoint=checkpoint)
    device = device_of(cfg)
    model.to(device)
    tok, _ = r.tokenizer(device)
    agent = WorldModelAgent(tok, model, episodes, sample=sample, seed=seed)
    res = run_episodes(env_id, cfg.data.size, episodes, agent.act, seed, progress, record=record)
    res["phase"] = ph
    return res


def baseline_returns(env_id: str, size: int, episodes: int, kind: str, seed: int) -> dict[str, Any] | None:
    """Returns of a scripted policy (random | expert | epsilon-expert); None when the env has no expert."""
    from worldflow.envs.loop import per_env, play_episodes
    from worldflow.envs.policies import make_policy
    from worldflow.envs.wrappers import make_env

    env = make_env(env_id, size=size)
    try:
        policy = make_policy(kind, env, seed=seed)  # the expert reads its env's state, so one env, in turn
    except InputError:  # no scripted expert for this env (envs.policies: expert_action or EXTERNAL_EXPERTS)
        env.close()
        return None
    try:
        returns = [play_episodes([env], per_env([policy]), [seed + i], 10_000).returns[0]
                   for i in range(episodes)]
    finally:
        env.close()
    r = np.asarray(returns)
    return {"mean": float(r.mean()), "std": float(r.std()), "returns": r.tolist()}


def collect_with_policy(run, env_id: str, data, episodes: int, seed: int, progress: bool = True
                        ) -> dict[str, Any]:
    """Online loop: play ``episodes`` with the run's current policy (sampling) and append them to the
    dataset; returns their summary (mean/std return, per-episode returns and lengths, phase)."""
    from worldflow.data.episodes import DatasetWriter, load_manifest
    from worldflow.data.spaces import space_from_dict

    m = load_manifest(data)
    res = policy_returns(run, env_id, episodes, None, True, seed, progress, record=True)
    writer = DatasetWriter(Path(data), m["env_id"], space_from_dict(m["action_space"]))
    for i, rec in enumerate(res.pop("records")):
        writer.add_record(rec, policy="agent", seed=seed + i)
    return res
