"""Policy distributions built from a gymnasium action space, and their converters to and from env actions.

``spec = policy_distribution(space)`` returns an :class:`ActionSpec` that knows how many parameters its
head must output (``spec.param_dim``) and turns head outputs ``params (*batch, param_dim)`` into an
:class:`ActionDist` via ``spec(params)``:

============== ================================ ============================== =====================
space          distribution                     action tensor (per element)    env action
============== ================================ ============================== =====================
Discrete(n)    Categorical                      long (), index in [0, n)       int (index + start)
MultiDiscrete  independent Categoricals per     long (*shape), index per dim   int array (+ start)
               dim, log_prob / entropy / KL
               summed over dims
MultiBinary    independent Bernoullis (summed)  long (*shape) in {0, 1}        int8 array
Box (bounded)  tanh-squashed Normal rescaled    float32 (*shape) in [low,high] array of space.dtype
               to [low, high]
============== ================================ ============================== =====================

Action tensors are *indices* for the integer spaces (``start`` is removed), which is what an embedding
lookup needs; :meth:`ActionSpec.to_env` adds it back. A tensor may carry any number of leading batch dims.

Box: ``a = c + s·tanh(u)``, ``u ~ N(μ, σ)``, ``c = (high + low)/2``, ``s = (high − low)/2``; the head outputs
``[μ, ρ]`` and ``σ = σ_min + (σ_max − σ_min)·sigmoid(ρ + 2)`` (Dreamer 3's bounded std; the +2 starts σ
near σ_max). log-prob uses the change of variables ``log p(a) = Σ_d [log N(u_d; μ_d, σ_d) − log(1 −
tanh²u_d) − log s_d]`` with ``u = atanh(clip((a − c)/s, −1 + ε, 1 − ε))``: the clip keeps it finite for
actions on (or, after float rounding, just past) the bounds. Entropy has no closed form: ``entropy()``
is the Monte-Carlo estimate ``H[N] + E[log(1 − tanh²u)] + Σ log s`` (reparameterised, differentiable).
KL(π‖π') is the KL of the underlying Normals, which is exact: both distributions push the Normal through
the same bijection ``u ↦ c + s·tanh(u)`` and KL is invariant under a shared bijection. ``mode()`` is
``c + s·tanh(μ)`` (the deterministic action; the true mode of the squashed density can differ slightly).
Box spaces must have finite bounds with high > low and a float dtype (wrap others with gymnasium's
RescaleAction/ClipAction).

Sampling accepts a ``torch.Generator`` for reproducible rollouts.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worldflow import rng
from worldflow.data.spaces import action_to_tensor, check_action, check_space, event_shape, tensor_to_action
from worldflow.errors import InputError

__all__ = [
    "ActionDist",
    "Categoricals",
    "Bernoullis",
    "TanhNormal",
    "ActionSpec",
    "policy_distribution",
]

PAD_LOGIT = -1e9  # finite "impossible class" logit: −inf would make 0·(−inf) = NaN in entropy/KL grads
TANH_EPS = 1e-6  # clip of (a − c)/s away from ±1 (float32 resolves 1 − 1e-6; atanh(1 − 1e-6) ≈ 7.25)
LOG_2PI = math.log(2 * math.pi)


def _sum_event(x: Tensor, event_ndim: int) -> Tensor:
    """Sum the trailing ``event_ndim`` dims of x."""
    return x.sum(tuple(range(-event_ndim, 0))) if event_ndim else x


# ---------------------------------------------------------------------------------------------------
# Distributions


class ActionDist:
    """Common interface. ``B`` = batch dims, ``E`` = event dims of one action.

    sample(generator) -> (*B, *E) action tensor (no grad); log_prob(a (*B, *E)) -> (*B);
    entropy() -> (*B); mode() -> (*B, *E); kl(other) -> (*B) = KL(self ‖ other); detach() -> same
    distribution with parameters cut from the graph (use it for a frozen prior).
    """

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, action: Tensor) -> Tensor:
        raise NotImplementedError

    def entropy(self) -> Tensor:
        raise NotImplementedError

    def mode(self) -> Tensor:
        raise NotImplementedError

    def kl(self, other: ActionDist) -> Tensor:
        raise NotImplementedError

    def detach(self) -> ActionDist:
        raise NotImplementedError


class Categoricals(ActionDist):
    """Independent categoricals: logits (*B, *E, n) -> actions long (*B, *E); E = () for Discrete.

    Dimensions with fewer than n classes pad their logits with :data:`PAD_LOGIT`.
    """

    def __init__(self, logits: Tensor, event_ndim: int = 0):
        self.logp = F.log_softmax(logits.float(), dim=-1)  # normalised log-probabilities
        self.event_ndim = event_ndim

    @property
    def probs(self) -> Tensor:
        return self.logp.exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        probs = self.probs.detach()
        flat = rng.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator)
        return flat.reshape(probs.shape[:-1])

    def log_prob(self, action: Tensor) -> Tensor:
        lp = self.logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        return _sum_event(lp, self.event_ndim)

    def entropy(self) -> Tensor:
        return _sum_event(-(self.probs * self.logp).sum(-1), self.event_ndim)

    def mode(self) -> Tensor:
        return self.logp.argmax(-1)

    def kl(self, other: ActionDist) -> Tensor:
        assert isinstance(other, Categoricals)
        return _sum_event((self.probs * (self.logp - other.logp)).sum(-1), self.event_ndim)

    def detach(self) -> Categoricals:
        return Categoricals(self.logp.detach(), self.event_ndim)  # log_softmax of logp is logp


class Bernoullis(ActionDist):
    """Independent Bernoullis: logits (*B, *E) -> actions long (*B, *E) in {0, 1}."""

    def __init__(self, logits: Tensor, event_ndim: int):
        self.logits = logits.float()
        self.event_ndim = event_ndim

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(self.logits.detach())
        u = rng.rand(p.shape, generator, p.device)
        return (u < p).long()

    def log_prob(self, action: Tensor) -> Tensor:
        a = action.float()
        lp = a * F.logsigmoid(self.logits) + (1 - a) * F.logsigmoid(-self.logits)
        return _sum_event(lp, self.event_ndim)

    def entropy(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        h = -(p * F.logsigmoid(self.logits) + (1 - p) * F.logsigmoid(-self.logits))
        return _sum_event(h, self.event_ndim)

    def mode(self) -> Tensor:
        return (self.logits > 0).long()

    def kl(self, other: ActionDist) -> Tensor:
        assert isinstance(other, Bernoullis)
        p, l1, l2 = torch.sigmoid(self.logits), self.logits, other.logits
        kl = p * (F.logsigmoid(l1) - F.logsigmoid(l2)) + (1 - p) * (F.logsigmoid(-l1) - F.logsigmoid(-l2))
        return _sum_event(kl, self.event_ndim)

    def detach(self) -> Bernoullis:
        return Bernoullis(self.logits.detach(), self.event_ndim)


class TanhNormal(ActionDist):
    """a = c + s·tanh(u), u ~ N(mean, std).  mean, std: (*B, *E); low, high: (*E) finite, high > low."""

    def __init__(self, mean: Tensor, std: Tensor, low: Tensor, high: Tensor):
        self.mean, self.std = mean.float(), std.float()
        self.low, self.high = low, high
        self.center = ((high + low) / 2).to(self.mean)
        self.scale = ((high - low) / 2).to(self.mean)
        self.event_ndim = low.dim()

    def _squash(self, u: Tensor) -> Tensor:
        return self.center + self.scale * torch.tanh(u)

    def rsample_pre(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised pre-tanh sample u = mean + std·ε, (*B, *E)."""
        eps = rng.randn(self.mean.shape, generator, self.mean.device)
        return self.mean + self.std * eps

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self._squash(self.rsample_pre(generator))

    @staticmethod
    def _log_det(u: Tensor) -> Tensor:
        """log(1 − tanh²u) = 2·(log 2 − u − softplus(−2u)), stable for large |u|."""
        return 2 * (math.log(2.0) - u - F.softplus(-2 * u))

    def log_prob(self, action: Tensor) -> Tensor:
        x = ((action.float() - self.center) / self.scale).clamp(-1 + TANH_EPS, 1 - TANH_EPS)
        u = torch.atanh(x)
        z = (u - self.mean) / self.std
        log_n = -0.5 * z.pow(2) - self.std.log() - 0.5 * LOG_2PI
        return _sum_event(log_n - self._log_det(u) - self.scale.log(), self.event_ndim)

    def entropy(self, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """MC estimate from ``samples`` reparameterised draws: H[N] + E[log(1 − tanh²u)] + Σ log s."""
        h_normal = 0.5 + 0.5 * LOG_2PI + self.std.log()
        log_det = torch.stack([self._log_det(self.rsample_pre(generator)) for _ in range(samples)]).mean(0)
        return _sum_event(h_normal + log_det + self.scale.log(), self.event_ndim)

    def mode(self) -> Tensor:
        return self._squash(self.mean)

    def kl(self, other: ActionDist) -> Tensor:
        """KL of the underlying Normals (exact: shared bijection)."""
        assert isinstance(other, TanhNormal)
        var_ratio = (self.std / other.std).pow(2)
        t = ((self.mean - other.mean) / other.std).pow(2)
        return _sum_event(0.5 * (var_ratio + t - 1 - var_ratio.log()), self.event_ndim)

    def detach(self) -> TanhNormal:
        return TanhNormal(self.mean.detach(), self.std.detach(), self.low, self.high)


# ---------------------------------------------------------------------------------------------------
# Specs: parameter layout per space


class ActionSpec:
    """Parameter layout and converters for one action space: ``spec(params (*B, param_dim))`` -> dist."""

    def __init__(self, space: gym.Space, param_dim: int):
        self.space = space
        self.param_dim = param_dim
        self.event_shape = event_shape(space)

    def __call__(self, params: Tensor) -> ActionDist:
        if params.shape[-1] != self.param_dim:
            raise ValueError(f"{self.space}: expected {self.param_dim} params, got {tuple(params.shape)}")
        return self._build(params)

    def _build(self, params: Tensor) -> ActionDist:
        raise NotImplementedError

    def null_action(self, device: torch.device | str | None = None) -> Tensor:
        """A valid placeholder action tensor (*E): stands in for missing actions before log_prob."""
        dtype = torch.float32 if isinstance(self.space, gym.spaces.Box) else torch.long
        return torch.zeros(self.event_shape, dtype=dtype, device=device)

    def check(self, action: Any, batched: bool = False) -> np.ndarray:
        return check_action(self.space, action, batched)

    def to_tensor(self, action: Any, batched: bool = False, device: Any = None) -> Tensor:
        return action_to_tensor(self.space, action, batched, device)

    def to_env(self, action: Tensor) -> Any:
        return tensor_to_action(self.space, action)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.space}, param_dim={self.param_dim})"


class CategoricalSpec(ActionSpec):
    """Discrete(n): n logits."""

    def __init__(self, space: gym.spaces.Discrete):
        super().__init__(space, int(space.n))

    def _build(self, params: Tensor) -> ActionDist:
        return Categoricals(params, event_ndim=0)


class MultiCategoricalSpec(ActionSpec):
    """MultiDiscrete(nvec): Σ nvec logits, split per dim and padded to max(nvec) classes."""

    def __init__(self, space: gym.spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec).reshape(-1).astype(np.int64)
        super().__init__(space, int(nvec.sum()))
        self.sizes = nvec.tolist()
        self.max_n = int(nvec.max())
        # scatter index: flat param j of dim i goes to padded slot i*max_n + (j − offset_i)
        index = [i * self.max_n + c for i, n in enumerate(self.sizes) for c in range(n)]
        self._index = torch.tensor(index, dtype=torch.long)

    def _build(self, params: Tensor) -> ActionDist:
        batch = params.shape[:-1]
        padded = params.new_full((*batch, len(self.sizes) * self.max_n), PAD_LOGIT)
        padded = padded.index_copy(-1, self._index.to(params.device), params)
        logits = padded.reshape(*batch, *self.event_shape, self.max_n)
        return Categoricals(logits, event_ndim=len(self.event_shape))


class BernoulliSpec(ActionSpec):
    """MultiBinary(shape): one logit per element."""

    def __init__(self, space: gym.spaces.MultiBinary):
        super().__init__(space, int(np.prod(space.shape)))

    def _build(self, params: Tensor) -> ActionDist:
        logits = params.reshape(*params.shape[:-1], *self.event_shape)
        return Bernoullis(logits, event_ndim=len(self.event_shape))


class TanhNormalSpec(ActionSpec):
    """Box(low, high, shape): 2·prod(shape) params, [mean | raw std]."""

    def __init__(self, space: gym.spaces.Box, min_std: float = 0.1, max_std: float = 1.0):
        if not np.issubdtype(space.dtype, np.floating):
            raise InputError(f"unsupported action space {space}: a Box policy needs a float dtype")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise InputError(
                f"unsupported action space {space}: the bounded Gaussian needs finite low/high "
                "(wrap the env with gymnasium.wrappers.RescaleAction or ClipAction)"
            )
        if not np.all(space.high > space.low):
            raise InputError(f"unsupported action space {space}: needs high > low in every dim")
        if not 0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got {min_std}, {max_std}")
        self.dim = int(np.prod(space.shape))
        super().__init__(space, 2 * self.dim)
        self.min_std, self.max_std = min_std, max_std
        self.low = torch.as_tensor(space.low, dtype=torch.float32)
        self.high = torch.as_tensor(space.high, dtype=torch.float32)

    def _build(self, params: Tensor) -> ActionDist:
        mean, raw = params.float().split(self.dim, dim=-1)
        std = self.min_std + (self.max_std - self.min_std) * torch.sigmoid(raw + 2.0)
        shape = (*params.shape[:-1], *self.event_shape)
        low, high = self.low.to(params.device), self.high.to(params.device)
        return TanhNormal(mean.reshape(shape), std.reshape(shape), low, high)

    def null_action(self, device: torch.device | str | None = None) -> Tensor:
        return ((self.low + self.high) / 2).to(device)


def policy_distribution(space: gym.Space, min_std: float = 0.1, max_std: float = 1.0) -> ActionSpec:
    """The :class:`ActionSpec` for a gymnasium action space (see the module docstring for the table).

    ``min_std`` / ``max_std`` bound the pre-tanh std of Box policies (ignored otherwise).
    """
    check_space(space)
    if isinstance(space, gym.spaces.Discrete):
        return CategoricalSpec(space)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return MultiCategoricalSpec(space)
    if isinstance(space, gym.spaces.MultiBinary):
        return BernoulliSpec(space)
    return TanhNormalSpec(space, min_std, max_std)
