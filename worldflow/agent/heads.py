"""Agent heads and their losses (Dreamer 4): policy, reward, value, continue; BC with multi-token
prediction, λ-returns, value loss and PMPO. Equations, index conventions and the tests that check them
are listed in docs/agent.md.

Heads read features ``h (..., in_dim)`` — e.g. the dynamics model's agent-token outputs averaged over
agent tokens, or flattened — so they are independent of the world model.

Time alignment (one convention everywhere, "reward on arrival", as Dreamer 3):

- the policy at ``h_t`` chooses ``a_t``; ``h_t`` must not have seen ``a_t`` (the world model may feed
  ``a_t`` into frame t+1's tokens, never earlier, or behaviour cloning would copy its input);
- the reward and continue heads at ``h_{t+1}`` predict the reward ``r_t`` and continue flag
  ``c_t = 1 − terminated_t`` of the transition from state t to t+1 (the first state that has seen ``a_t``).

So in imagination, with states ``h_0..h_H``: ``rewards[:, t] = reward(h_{t+1})``, ``continues[:, t] =
continue(h_{t+1})``, ``values[:, t] = value(h_t)``. From an episode on disk (``rewards[t]`` belongs to
``actions[t]``), the per-frame reward targets are the rewards shifted by one: frame t's target is
``rewards[t − 1]`` and frame 0 has none (mask it).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import gymnasium as gym
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflow.agent.distributions import ActionDist, policy_distribution
from worldflow.agent.twohot import make_bins, twohot_loss, twohot_mean
from worldflow.config import AgentConfig
from worldflow.nn import RMSNorm

__all__ = [
    "MLP",
    "AgentHeads",
    "frozen_prior",
    "MTPLoss",
    "bc_mtp_loss",
    "continue_loss",
    "lambda_returns",
    "advantages",
    "value_loss",
    "pmpo_loss",
    "pmpo_policy_loss",
]


# ---------------------------------------------------------------------------------------------------
# Heads


class MLP(nn.Module):
    """``layers`` × (Linear → RMSNorm → SiLU), then a zero-initialised Linear to ``out_dim``.

    Zero output init (Dreamer 3) makes every head start neutral: uniform policy logits (Box: mean 0),
    two-hot logits uniform → reward and value exactly 0 (the bins are antisymmetric), continue p = 0.5.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            d = in_dim if i == 0 else hidden
            blocks += [nn.Linear(d, hidden, bias=False), RMSNorm(hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden if layers else in_dim, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        return self.out(self.trunk(x))

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Only output units [start, stop): x (..., in_dim) -> (..., stop − start); skips the other rows."""
        return F.linear(self.trunk(x), self.out.weight[start:stop], self.out.bias[start:stop])


class AgentHeads(nn.Module):
    """Policy, reward, value and continue heads on features h (..., in_dim).

    Multi-token prediction (MTP): the policy and reward heads each have one shared trunk whose output
    layer holds L+1 slices; slice n predicts a_{t+n} (resp. the reward target at t+n) from h_t, for
    n = 0..L (L = cfg.mtp). Slice 0 is the policy / reward model used for acting and in imagination;
    slices n ≥ 1 are auxiliary BC targets that shape the shared trunk.

    ``num_tasks > 1`` adds a learned task embedding (zero-init) to h, selected by ``task`` (long, h's
    batch shape); heads then stay task-conditioned even when the backbone is frozen. The two-hot
    ``bins`` (symlog-space positions, see worldflow.agent.twohot) are a non-persistent buffer rebuilt
    from cfg.
    """

    def __init__(self, in_dim: int, action_space: gym.Space, cfg: AgentConfig, num_tasks: int = 1):
        super().__init__()
        self.cfg = cfg
        self.spec = policy_distribution(action_space, cfg.min_std, cfg.max_std)
        self.L = cfg.mtp
        self.num_bins = cfg.bins
        self.register_buffer("bins", make_bins(cfg.bins, cfg.bins_limit), persistent=False)
        self.task_embed = nn.Embedding(num_tasks, in_dim) if num_tasks > 1 else None
        if self.task_embed is not None:
            nn.init.zeros_(self.task_embed.weight)
        mk = lambda out: MLP(in_dim, cfg.hidden, out, cfg.head_layers)
        self.policy_head = mk((self.L + 1) * self.spec.param_dim)
        self.reward_head = mk((self.L + 1) * cfg.bins)
        self.value_head = mk(cfg.bins)
        self.continue_head = mk(1)

    def condition(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        """h (..., in_dim) plus the task embedding (task (...) long; None = task 0)."""
        if self.task_embed is None:
            return h
        if task is None:
            task = torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device)
        return h + self.task_embed(task)

    @staticmethod
    def _slices(mlp: MLP, h: Tensor, size: int, n: int | None) -> Tensor:
        if n is None:
            out = mlp(h)
            return out.reshape(*out.shape[:-1], -1, size)
        return mlp.forward_rows(h, n * size, (n + 1) * size)

    def policy_params(self, h: Tensor, n: int | None = 0, task: Tensor | None = None) -> Tensor:
        """h (..., in) -> (..., param_dim) for slice n, or all slices (..., L+1, param_dim) if n is None."""
        return self._slices(self.policy_head, self.condition(h, task), self.spec.param_dim, n)

    def policy(self, h: Tensor, n: int = 0, task: Tensor | None = None) -> ActionDist:
        """π_n(· | h_t): the distribution over a_{t+n}; n = 0 is the acting policy."""
        return self.spec(self.policy_params(h, n, task))

    def reward_logits(self, h: Tensor, n: int | None = 0, task: Tensor | None = None) -> Tensor:
        """h (..., in) -> two-hot logits (..., bins) for slice n, or (..., L+1, bins) if n is None."""
        return self._slices(self.reward_head, self.condition(h, task), self.num_bins, n)

    def reward(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        """Decoded reward prediction (...) of slice 0."""
        return twohot_mean(self.reward_logits(h, 0, task), self.bins)

    def value_logits(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        """h (..., in) -> two-hot logits (..., bins)."""
        return self.value_head(self.condition(h, task))

    def value(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        """Decoded value (...)."""
        return twohot_mean(self.value_logits(h, task), self.bins)

    def continue_logit(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        """Bernoulli logit (...) of c = 1 − terminated."""
        return self.continue_head(self.condition(h, task)).squeeze(-1)

    def continue_prob(self, h: Tensor, task: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.continue_logit(h, task))

    def rl_parameters(self) -> list[nn.Parameter]:
        """What phase 3 trains by default (Dreamer 4 phase 3): the policy and value heads."""
        return [*self.policy_head.parameters(), *self.value_head.parameters()]


def frozen_prior(heads: AgentHeads) -> AgentHeads:
    """A frozen copy of the (BC-trained) heads, to serve as π_prior in PMPO."""
    prior = copy.deepcopy(heads).eval()
    prior.requires_grad_(False)
    return prior


# ---------------------------------------------------------------------------------------------------
# Phase 2: behaviour cloning and reward model with multi-token prediction


class MTPLoss(NamedTuple):
    loss: Tensor  # bc + reward, scalar
    bc: Tensor  # Σ_n masked mean of −log π_n(a_{t+n} | h_t)
    reward: Tensor  # Σ_n masked mean of two-hot CE for r_{t+n}


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask (same shape); 0 (not NaN) when nothing is valid."""
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp_min(1)


def bc_mtp_loss(
    heads: AgentHeads,
    h: Tensor,
    actions: Tensor,
    action_mask: Tensor,
    rewards: Tensor,
    L: int | None = None,
    reward_mask: Tensor | None = None,
    task: Tensor | None = None,
) -> MTPLoss:
    """Behaviour cloning + reward model with multi-token prediction.

    L_BC  = Σ_{n=0..L} mean_{(b,t): t+n < T, m^a_{b,t+n}} [ −log π_n(a_{b,t+n} | h_{b,t}) ]
    L_rew = Σ_{n=0..L} mean_{(b,t): t+n < T, m^r_{b,t+n}} [ CE(twohot(r_{b,t+n}), softmax(ρ_n(h_{b,t}))) ]

    h (B, T, in); actions (B, T, *E) as action tensors (see worldflow.agent.distributions; values at masked
    positions are ignored, may be anything, even NaN); action_mask (B, T) bool, False = action missing;
    rewards (B, T) = reward targets aligned with h (see the module docstring); reward_mask (B, T) bool,
    default all valid. L defaults to heads.L. A term with no valid pair contributes 0.
    Pairs with t+n ≥ T never enter: their targets lie outside the window.
    """
    L = heads.L if L is None else L
    if not 0 <= L <= heads.L:
        raise ValueError(f"L={L} must be in [0, {heads.L}] (the heads were built with cfg.mtp={heads.L})")
    T = h.shape[1]
    action_mask = action_mask.bool()
    reward_mask = torch.ones_like(action_mask) if reward_mask is None else reward_mask.bool()
    # sanitise masked targets first: a NaN or out-of-range placeholder must not reach log_prob (its
    # gradient would be NaN·0 = NaN even behind torch.where)
    event_dims = actions.dim() - 2
    m = action_mask.reshape(*action_mask.shape, *([1] * event_dims))
    actions = torch.where(m, actions, heads.spec.null_action(h.device).to(actions.dtype))
    rewards = torch.where(reward_mask, rewards, torch.zeros_like(rewards))
    policy_params = heads.policy_params(h, None, task)  # (B, T, L+1, P)
    reward_logits = heads.reward_logits(h, None, task)  # (B, T, L+1, bins)
    bc = h.new_zeros(())
    rew = h.new_zeros(())
    for n in range(min(L, T - 1) + 1):
        # h_t for t < T−n is paired with the target at t+n
        dist = heads.spec(policy_params[:, : T - n, n])
        nll = -dist.log_prob(actions[:, n:])
        bc = bc + _masked_mean(nll, action_mask[:, n:])
        ce = twohot_loss(reward_logits[:, : T - n, n], rewards[:, n:], heads.bins)
        rew = rew + _masked_mean(ce, reward_mask[:, n:])
    return MTPLoss(bc + rew, bc, rew)


def continue_loss(logits: Tensor, terminated: Tensor, mask: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of the continue head against c = 1 − terminated.

    L = mean_{valid} [ −c·log σ(ℓ) − (1 − c)·log(1 − σ(ℓ)) ].  logits, terminated (...) ; mask (...) bool.
    """
    target = 1.0 - terminated.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return _masked_mean(bce, torch.ones_like(bce, dtype=torch.bool) if mask is None else mask.bool())


# ---------------------------------------------------------------------------------------------------
# Phase 3: imagination RL


def lambda_returns(rewards: Tensor, continues: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """λ-returns R (B, H), computed backwards:

        R_t = r_t + γ c_t ((1 − λ) v_{t+1} + λ R_{t+1}),   t = H−1 … 0,   with R_H = v_H.

    rewards (B, H), continues (B, H): r_t and c_t belong to the transition from state t to t+1 (read off
    h_{t+1}, see the module docstring). values (B, H+1): v_t = value(h_t) for states 0..H; v_H bootstraps.
    Gradients flow through whatever the inputs carry; value_loss stops them at R.
    """
    B, H = rewards.shape
    if continues.shape != (B, H) or values.shape != (B, H + 1):
        raise ValueError(
            f"expected rewards/continues (B, H) and values (B, H+1), got "
            f"{tuple(rewards.shape)}, {tuple(continues.shape)}, {tuple(values.shape)}"
        )
    out = []
    ret = values[:, H]
    for t in reversed(range(H)):
        ret = rewards[:, t] + gamma * continues[:, t] * ((1 - lam) * values[:, t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], dim=1)


def advantages(returns: Tensor, values: Tensor) -> Tensor:
    """A_t = sg(R_t − v_t) for t = 0..H−1.  returns (B, H), values (B, H+1) -> (B, H). Not normalised:
    PMPO uses only the sign."""
    return (returns - values[:, : returns.shape[1]]).detach()


def value_loss(logits: Tensor, returns: Tensor, bins: Tensor, weights: Tensor | None = None) -> Tensor:
    """Two-hot value loss on stop-gradient returns:

        L_V = Σ w_t · CE(twohot(sg(R_t)), softmax(logits_t)) / Σ w_t     (w ≡ 1 by default)

    logits (..., bins), returns (...), weights (...) e.g. the cumulative product of continues, treated as
    constants. No gradient flows into ``returns`` or ``weights``.
    """
    ce = twohot_loss(logits, returns.detach(), bins)
    if weights is None:
        return ce.mean()
    w = weights.detach().float()
    return (w * ce).sum() / w.sum().clamp_min(1e-8)


def pmpo_loss(logp: Tensor, advantages: Tensor, kl: Tensor, alpha: float = 0.5, beta: float = 0.3) -> Tensor:
    """PMPO policy loss (Dreamer 4), exactly:

        L = (1 − α)/|D⁻| Σ_{D⁻} ln π(a|s) − α/|D⁺| Σ_{D⁺} ln π(a|s) + β/N Σ_{i=1..N} KL[π ‖ π_prior]_i

    with D⁺ = {i : A_i ≥ 0} and D⁻ = {i : A_i < 0}, the paper's split: a sample with A_i = 0 counts as
    positive. An empty set contributes 0. Advantages are used through their sign only (not normalised,
    no gradient). logp, advantages, kl: (N,) -> scalar.
    ``kl`` must be computed against a detached prior (see :func:`pmpo_policy_loss`).
    """
    a = advantages.detach()
    pos, neg = a >= 0, a < 0
    zero = torch.zeros_like(logp)
    neg_term = torch.where(neg, logp, zero).sum() / neg.sum().clamp_min(1)
    pos_term = torch.where(pos, logp, zero).sum() / pos.sum().clamp_min(1)
    return (1 - alpha) * neg_term - alpha * pos_term + beta * kl.mean()


def pmpo_policy_loss(
    heads: AgentHeads,
    prior: AgentHeads,
    h: Tensor,
    actions: Tensor,
    advantages: Tensor,
    alpha: float = 0.5,
    beta: float = 0.3,
    task: Tensor | None = None,
) -> Tensor:
    """PMPO on imagined states: h (N, in) states, actions (N, *E) the actions taken there, advantages
    (N,). ln π and KL[π ‖ π_prior] use slice n = 0; the prior's distribution is built without gradient.
    Pass only the states that should count (e.g. drop those after a predicted termination)."""
    dist = heads.policy(h, 0, task)
    with torch.no_grad():
        prior_dist = prior.policy(h.detach(), 0, task).detach()
    return pmpo_loss(dist.log_prob(actions), advantages, dist.kl(prior_dist), alpha, beta)
