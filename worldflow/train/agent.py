"""``worldflow train agent``: phase 2 (behaviour cloning + reward/continue model, dynamics loss kept on)
and phase 3 (RL in imagination: λ-returns, two-hot value, PMPO against the frozen BC prior).

Offline (default) trains from a fixed dataset. ``--online --env ID`` runs the Dreamer-style loop: act in
the real env with the current policy, append the episodes to the dataset, fine-tune tokenizer, dynamics
and agent, repeat (see :func:`online_loop`).

Phases write ``<run>/agent_bc`` and ``<run>/agent``; each checkpoint holds dynamics + heads.
"""

from __future__ import annotations

from typing import Any

import torch

from worldflow.agent.heads import (
    bc_mtp_loss,
    continue_loss,
    frozen_prior,
    lambda_returns,
    pmpo_policy_loss,
    value_loss,
)
from worldflow.agent.model import AgentModel, imagine
from worldflow.agent.twohot import twohot_mean
from worldflow.checkpoint import load_weights
from worldflow.config import Config, derive, to_dict
from worldflow.data.checks import check_datasets
from worldflow.data.clips import ClipBank
from worldflow.data.spaces import values_to_indices
from worldflow.distributed import device_of
from worldflow.dynamics import dynamics_loss, shift_actions
from worldflow.errors import InputError
from worldflow.run import load_agent_model, phase_checkpoint, record_dataset, run_action_space, start_phase
from worldflow.train.trainer import Trainer


def _banks(run, data, cfg: Config, device, progress: bool) -> ClipBank:
    from worldflow.run import latent_mixture, load_tokenizer

    tok, _ = load_tokenizer(run, device)
    return latent_mixture(run, data, cfg, "train", tok, progress)


def _check_actions(run) -> None:
    """The agent acts through the dynamics model's action embedding: it must have been trained with one."""
    if run_action_space(run) is None:
        raise InputError(f"run {run}'s dynamics model was trained on action-free data only, so it cannot "
                         f"respond to actions: train dynamics with action-labelled --data as well (mixing "
                         f"is fine), in a new --run")


def _sample(bank: ClipBank, batch: int, length: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in bank.sample(batch, length, gen).items()}


def arrival_targets(rewards: torch.Tensor, terminated: torch.Tensor, action_mask: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """Phase 2's reward and continue targets for the states h_t of a clip, each seen on arrival.

    A clip's rewards, terminated and action_mask (B, T) are dataset-aligned: entry t belongs to the step
    from frame t to frame t + 1. The state h_t is read at frame t, the frame that *shows* the outcome of
    the step before it, so its reward target is r_{t−1} (``reward`` (B, T), frame 0 none: ``reward_mask``
    False there), and h_{t+1} predicts whether step t ended the episode (``terminated``,
    ``continue_mask`` (B, T − 1), for h_1 … h_{T−1}).
    """
    # the frame alignment of actions (dynamics.actions.shift_actions): step t-1's value at frame t
    reward, reward_mask = shift_actions(rewards, action_mask)
    return {"reward": reward, "reward_mask": reward_mask,
            "terminated": terminated[:, :-1], "continue_mask": action_mask[:, :-1]}


def bc_losses(model: AgentModel, b: dict[str, torch.Tensor], cfg: Config, gen: torch.Generator
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 2 loss on a clip batch: dynamics objective + BC/reward (multi-token) + continue."""
    dyn_loss, terms = dynamics_loss(model.dynamics, b["latents"], b["actions"], b["action_mask"],
                                    cfg.dynamics, gen)
    h = model.context_features(b["latents"], b["actions"], b["action_mask"], gen)
    heads = model.heads
    acts = values_to_indices(heads.spec.space, b["actions"])
    t = arrival_targets(b["rewards"], b["terminated"], b["action_mask"])
    mtp = bc_mtp_loss(heads, h, acts, b["action_mask"], t["reward"], reward_mask=t["reward_mask"])
    cont = continue_loss(heads.continue_logit(h[:, 1:]), t["terminated"], t["continue_mask"])
    raw = {"dynamics": dyn_loss, "bc": mtp.bc, "reward": mtp.reward, "continue": cont}
    loss = sum(phase2_weighted(model, raw, cfg.agent.loss_norm).values())
    logs = {k: v.detach() for k, v in raw.items()}
    return loss, {**logs, "flow": terms["flow"], "bootstrap": terms["bootstrap"]}


def phase2_weighted(model: AgentModel, raw: dict[str, torch.Tensor], norm: bool) -> dict[str, torch.Tensor]:
    """Each phase-2 loss term, divided by its running RMS when ``norm`` (else unchanged).

    Every term then contributes gradients of unit typical scale: the dynamics loss stays on in earnest
    instead of being outweighed by the multi-token BC sum.
    """
    if not norm:
        return dict(raw)
    return {k: v / (model.loss_rms[k](v) + 1e-8) for k, v in raw.items()}


def train_bc(cfg: Config, data, run, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Phase 2: start from the trained dynamics model, add heads, train BC + reward + dynamics."""
    from worldflow.train.dynamics import PHASE as DYN

    device = device_of(cfg)
    roots = check_datasets(data, cfg, {"data.clip_len": cfg.data.clip_len}, run, need_actions=True)
    _check_actions(run)
    start_phase(run, "agent_bc", cfg)
    record_dataset(run, roots)
    bank = _banks(run, roots, cfg, device, progress)
    model = AgentModel(cfg, run_action_space(run)).to(device)
    load_weights(model.dynamics, phase_checkpoint(run, DYN))
    trainer = Trainer(model, cfg.train_bc, run, "agent_bc", to_dict(cfg), progress=progress)
    batch_fn = lambda gen: _sample(bank, cfg.train_bc.batch, cfg.data.clip_len, gen, device)
    return trainer.fit(batch_fn, lambda m, b, gen: bc_losses(m, b, cfg, gen), resume=resume)


def rl_losses(model: AgentModel, prior, im, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 3 loss on imagined trajectories: two-hot value loss on λ-returns + PMPO policy loss."""
    heads, a = model.heads, cfg.agent
    h = im.h
    value_logits = heads.value_logits(h)  # (B, H+1, bins)
    values = twohot_mean(value_logits, heads.bins).detach()  # = heads.value(h), without a second forward
    returns = lambda_returns(im.rewards, im.continues, values, a.gamma, a.lam)
    # states after a predicted termination do not count: weight = P(still alive at t)
    alive = torch.cumprod(torch.cat([torch.ones_like(im.continues[:, :1]), im.continues[:, :-1]], 1), 1)
    v_loss = value_loss(value_logits[:, :-1], returns, heads.bins, weights=alive)
    adv = returns - values[:, :-1]
    keep = alive > 0.5
    p_loss = pmpo_policy_loss(heads, prior, h[:, :-1][keep], im.actions[keep], adv[keep],
                              a.pmpo_alpha, a.pmpo_beta)
    loss = v_loss + p_loss
    return loss, {"value": v_loss.detach(), "policy": p_loss.detach(),
                  "imagined_return": returns[:, 0].mean(), "imagined_reward": im.rewards.sum(1).mean(),
                  "adv_pos_frac": (adv[keep] > 0).float().mean()}


def train_imagination(cfg: Config, data, run, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Phase 3: the world model is frozen; policy and value heads train on imagined rollouts."""
    if cfg.agent.imag_reuse < 1:
        raise InputError(f"agent.imag_reuse must be >= 1, got {cfg.agent.imag_reuse}")
    device = device_of(cfg)
    roots = check_datasets(data, cfg, {}, run, need_actions=True)
    bc_model, bc_cfg, _ = load_agent_model(run, "agent_bc", device)
    start_phase(run, "agent", cfg)
    bank = _banks(run, roots, cfg, device, progress)
    model = AgentModel(bc_cfg, run_action_space(run)).to(device)
    model.load_state_dict(bc_model.state_dict())
    model.requires_grad_(False)
    for p in model.heads.rl_parameters():
        p.requires_grad_(True)
    prior = frozen_prior(bc_model.heads)
    trainer = Trainer(model, cfg.train_agent, run, "agent", to_dict(bc_cfg), progress=progress)
    context = max(1, min(cfg.data.clip_len, bc_cfg.dynamics.context - 1))

    reuse, steps = cfg.agent.imag_reuse, cfg.agent.imag_steps
    held: dict[str, Any] = {}

    def batch_fn(gen: torch.Generator):
        # one imagined batch serves `reuse` consecutive updates (a resume at a step that is not a multiple
        # of it imagines afresh, so keep ckpt_every a multiple of imag_reuse for exact resumes)
        if "im" not in held or trainer.step % reuse == 0:
            ctx = _sample(bank, cfg.agent.imag_batch, context, gen, device)
            # imagination is most of phase 3's time; under bf16 it runs ~1.4x faster on CPU with the same
            # imagined physics on Catch (docs/benchmarks.md); the returned tensors are float32
            with trainer.autocast():
                held["im"] = imagine(model, ctx, cfg.agent.horizon, steps, gen)
        return held["im"]

    return trainer.fit(batch_fn, lambda m, im, gen: rl_losses(m, prior, im, cfg), resume=resume)


def train_offline(cfg: Config, data, run, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    bc = train_bc(cfg, data, run, resume, progress)
    rl = train_imagination(cfg, data, run, resume, progress)
    return {"bc": bc, "agent": rl}


def online_loop(cfg: Config, data, run, env_id: str, progress: bool = True) -> list[dict[str, Any]]:
    """Dreamer-style loop: (act in the real env -> grow dataset -> fine-tune world model -> train agent).

    Each iteration raises every phase's step budget by the configured amount and resumes from its latest
    checkpoint, so the models keep learning on the growing dataset. The real return of every collection
    (iteration i plays the policy trained by iteration i - 1; iteration 0 the offline one) and of a final
    evaluation of the last policy (``episodes_per_iter`` episodes, not added to the data) is written, with
    the real env steps of the data that policy was trained on, to ``<run>/online.json`` and plotted in
    ``<run>/online_return.png`` as it goes. Returns the per-iteration training summaries.
    """
    from worldflow.data.episodes import load_manifest
    from worldflow.data.mixture import as_roots
    from worldflow.eval.returns import collect_with_policy, policy_returns
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    roots = as_roots(data)
    if len(roots) != 1:
        raise InputError(f"--online grows one dataset with the new episodes; got {len(roots)} --data")
    data = roots[0]
    on = cfg.online
    extra = {"train_tokenizer": on.tokenizer_steps, "train_dynamics": on.dynamics_steps,
             "train_bc": on.bc_steps, "train_agent": on.agent_steps}
    env_steps = sum(int(e["length"]) for e in load_manifest(data)["episodes"])  # the offline data's
    history, curve = [], []
    for it in range(on.iterations):
        seed = cfg.collect.seed + 10_000 * (it + 1)
        res = collect_with_policy(run, env_id, data, on.episodes_per_iter, seed=seed, progress=progress)
        curve.append(_online_point(it, "collect", res, env_steps))  # a policy trained on env_steps steps
        _write_online(run, curve)
        env_steps += sum(res["lengths"])
        # iteration it trains every phase to its preset budget plus (it + 1) rounds of fine-tuning steps
        it_cfg = derive(cfg, **{f"{phase}.steps": getattr(cfg, phase).steps + (it + 1) * n
                                for phase, n in extra.items()},
                        **{f"{phase}.max_minutes": 0.0 for phase in extra})
        train_tokenizer.train(it_cfg, data, run, progress=progress)
        train_dynamics.train(it_cfg, data, run, progress=progress)
        history.append(train_offline(it_cfg, data, run, progress=progress))
    # the last iteration's policy, on seeds no collection used
    res = policy_returns(run, env_id, on.episodes_per_iter, None, True, cfg.collect.seed + 10_000 * 999,
                         progress)
    curve.append(_online_point(on.iterations, "final eval", res, env_steps))
    _write_online(run, curve)
    return history


def _online_point(iteration: int, kind: str, res: dict[str, Any], env_steps: int) -> dict[str, Any]:
    """One point of the online loop's return curve (an entry of ``online.json``)."""
    return {"iteration": iteration, "kind": kind, "env_steps": env_steps, "return_mean": res["mean"],
            "return_std": res["std"], "returns": res["returns"], "phase": res.get("phase")}


def _write_online(run, curve: list[dict[str, Any]]) -> None:
    """``online.json`` (atomic) and ``online_return.png``: real return against the dataset's real steps."""
    import json
    from pathlib import Path

    from worldflow.eval.visual import plot_curves
    from worldflow.io import atomic_write_text

    atomic_write_text(Path(run) / "online.json", json.dumps(curve, indent=1) + "\n")
    plot_curves(Path(run) / "online_return.png", {"real return (sampled policy)": {
        p["env_steps"]: p["return_mean"] for p in curve}}, "real env steps trained on", "mean return",
        "online loop", logx=False)
