"""Agent maths (Dreamer 4 agent): two-hot, policy distributions, heads, BC-MTP, λ-returns, value loss, PMPO.

Reference values come from independent loop transcriptions of the equations in docs/agent.md.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributions as D

from worldflow.agent.distributions import policy_distribution
from worldflow.agent.heads import (
    AgentHeads,
    advantages,
    bc_mtp_loss,
    continue_loss,
    frozen_prior,
    lambda_returns,
    pmpo_loss,
    pmpo_policy_loss,
    value_loss,
)
from worldflow.agent.twohot import make_bins, symexp, symlog, twohot_encode, twohot_loss, twohot_mean
from worldflow.config import AgentConfig, derive
from worldflow.data.spaces import check_action

CFG = AgentConfig(hidden=16, head_layers=2, mtp=2, bins=21)

SPACES = {
    "discrete": gym.spaces.Discrete(3, start=1),
    "multidiscrete": gym.spaces.MultiDiscrete(np.array([[2, 3], [4, 2]]), start=np.array([[0, 1], [-2, 0]])),
    "multibinary": gym.spaces.MultiBinary((2, 2)),
    "box": gym.spaces.Box(low=np.array([-1, 0], np.float32), high=np.array([1, 5], np.float32)),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


# ---------------------------------------------------------------------------------------------------
# two-hot


def test_symlog_symexp_inverse_and_bins():
    x = torch.tensor([-1e6, -3.0, -0.5, 0.0, 0.5, 3.0, 1e6])
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-5, atol=1e-6)
    bins = make_bins(21, 20.0)
    assert torch.equal(bins, -bins.flip(0)) and bins[10] == 0
    assert bins[0] == -20 and bins[-1] == 20
    assert torch.isfinite(symexp(bins)).all()  # symexp(20) ≈ 4.85e8 fits float32


def encode_loop(y: float, bins: list[float]) -> list[float]:
    """Textbook two-hot in symlog space: clip, find the interval, split the mass linearly."""
    u = math.copysign(math.log1p(abs(y)), y)
    u = min(max(u, bins[0]), bins[-1])
    w = [0.0] * len(bins)
    for k in range(len(bins) - 1):
        if bins[k] <= u <= bins[k + 1]:
            frac = (u - bins[k]) / (bins[k + 1] - bins[k])
            w[k], w[k + 1] = 1 - frac, frac
            return w
    raise AssertionError


def test_twohot_encode_matches_loop_and_reproduces_symlog():
    bins = make_bins(21, 20.0)
    y = torch.tensor([-1e12, -5e3, -1.0, -0.3, 0.0, 0.7, 1.0, 42.0, 1e12])
    enc = twohot_encode(y, bins)
    for i, yi in enumerate(y.tolist()):
        torch.testing.assert_close(enc[i], torch.tensor(encode_loop(yi, bins.tolist())), atol=1e-6, rtol=0)
    assert torch.allclose(enc.sum(-1), torch.ones(len(y)))
    assert ((enc > 0).sum(-1) <= 2).all()
    inside = y.abs() < 1e8
    torch.testing.assert_close((enc * bins).sum(-1)[inside], symlog(y)[inside], atol=1e-5, rtol=1e-6)
    assert enc[0, 0] == 1 and enc[-1, -1] == 1  # clipped outside the range


def test_twohot_encode_mean_round_trip():
    bins = make_bins(41, 20.0)
    y = torch.tensor([[-1e5, -2.5, -1.0, 0.0], [0.1, 1.0, 333.0, 4e7]])
    logits = twohot_encode(y, bins).log()  # the target itself as a distribution (-inf off support)
    torch.testing.assert_close(twohot_mean(logits, bins), y, rtol=2e-5, atol=1e-6)
    assert twohot_mean(torch.zeros(3, 41), bins).eq(0).all()  # uniform -> exactly 0


def test_twohot_loss_matches_transcription():
    bins = make_bins(11, 5.0)
    logits, y = randn(4, 11), torch.tensor([-30.0, 0.0, 0.4, 1e4])
    loss = twohot_loss(logits, y, bins)
    for i in range(4):
        w = encode_loop(y[i].item(), bins.tolist())
        z = logits[i].tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        ref = -sum(w[k] * (z[k] - lse) for k in range(11))
        assert loss[i].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# policy distributions


@pytest.mark.parametrize("name", list(SPACES))
def test_policy_round_trip(name):
    space = SPACES[name]
    spec = policy_distribution(space)
    dist = spec(randn(5, spec.param_dim))
    a = dist.sample(gen(1))
    assert torch.equal(a, dist.sample(gen(1)))  # generator-aware
    env_batch = spec.to_env(a)
    for i in range(5):
        single = spec.to_env(a[i])
        assert space.contains(single), (space, single)
        assert space.contains(env_batch[i])
    back = spec.to_tensor(env_batch, batched=True)
    lp = dist.log_prob(back)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    torch.testing.assert_close(lp, dist.log_prob(a), rtol=1e-4, atol=1e-4)
    for i in range(5):
        assert space.contains(spec.to_env(dist.mode()[i]))
    assert torch.isfinite(dist.entropy()).all()


@pytest.mark.parametrize("name", list(SPACES))
def test_kl_zero_to_self_positive_otherwise(name):
    spec = policy_distribution(SPACES[name])
    p, q = spec(randn(6, spec.param_dim, seed=0)), spec(randn(6, spec.param_dim, seed=1))
    torch.testing.assert_close(p.kl(p), torch.zeros(6), atol=1e-6, rtol=0)
    assert (p.kl(q) > 1e-4).all()


def test_distributions_match_torch_reference():
    g = SPACES["discrete"]
    params = randn(4, 3)
    a = torch.tensor([0, 2, 1, 1])
    ref = D.Categorical(logits=params)
    dist = policy_distribution(g)(params)
    torch.testing.assert_close(dist.log_prob(a), ref.log_prob(a))
    torch.testing.assert_close(dist.entropy(), ref.entropy())
    q = randn(4, 3, seed=3)
    ref_kl = D.kl_divergence(ref, D.Categorical(logits=q))
    torch.testing.assert_close(dist.kl(policy_distribution(g)(q)), ref_kl)

    md = gym.spaces.MultiDiscrete([2, 4])
    params = randn(3, 6)
    act = torch.tensor([[1, 3], [0, 0], [1, 2]])
    dist = policy_distribution(md)(params)
    c0, c1 = D.Categorical(logits=params[:, :2]), D.Categorical(logits=params[:, 2:])
    torch.testing.assert_close(dist.log_prob(act), c0.log_prob(act[:, 0]) + c1.log_prob(act[:, 1]))
    torch.testing.assert_close(dist.entropy(), c0.entropy() + c1.entropy())

    mb = gym.spaces.MultiBinary(3)
    params, act = randn(2, 3), torch.tensor([[1, 0, 1], [0, 0, 1]])
    ref = D.Bernoulli(logits=params)
    dist = policy_distribution(mb)(params)
    torch.testing.assert_close(dist.log_prob(act), ref.log_prob(act.float()).sum(-1))
    torch.testing.assert_close(dist.entropy(), ref.entropy().sum(-1))
    q = randn(2, 3, seed=5)
    torch.testing.assert_close(
        dist.kl(policy_distribution(mb)(q)), D.kl_divergence(ref, D.Bernoulli(logits=q)).sum(-1)
    )


def test_tanh_normal_log_prob_entropy_and_bounds():
    space = SPACES["box"]
    spec = policy_distribution(space)
    params = randn(3, 4)
    dist = spec(params)
    low, high = torch.tensor(space.low), torch.tensor(space.high)
    ref = D.TransformedDistribution(
        D.Normal(dist.mean, dist.std),
        [D.TanhTransform(), D.AffineTransform((high + low) / 2, (high - low) / 2)],
    )
    a = torch.tensor([[0.3, 1.0], [-0.9, 4.5], [0.0, 2.5]])
    torch.testing.assert_close(dist.log_prob(a), ref.log_prob(a).sum(-1), rtol=1e-4, atol=1e-4)
    # finite exactly on the bounds and for saturated samples
    for edge in (low, high):
        assert torch.isfinite(dist.log_prob(edge.expand(3, 2))).all()
    sat = spec(torch.tensor([[30.0, -30.0, 0.0, 0.0]]))
    s = sat.sample(gen())
    assert space.contains(spec.to_env(s[0])) and torch.isfinite(sat.log_prob(s)).all()
    # entropy estimate ≈ −E[log p] (1-D check on many samples)
    one = policy_distribution(gym.spaces.Box(-2.0, 2.0, (1,)))(torch.tensor([[0.4, -0.5]]))
    samples = torch.stack([one.sample(gen(i)) for i in range(2000)])
    mc = -one.log_prob(samples).mean()
    assert one.entropy(samples=2000, generator=gen(9)).item() == pytest.approx(mc.item(), abs=0.05)


# ---------------------------------------------------------------------------------------------------
# action checks


@pytest.mark.parametrize(
    "name, action, problem",
    [
        ("discrete", 0, "out of range"),
        ("discrete", 4, "out of range"),
        ("discrete", 1.0, "wrong type"),
        ("discrete", [1], "wrong shape"),
        ("discrete", "1", "wrong type"),
        ("multidiscrete", np.array([1, 1]), "wrong shape"),
        ("multidiscrete", np.array([[0, 1], [2, 0]]), "out of range"),
        ("multibinary", np.array([[0, 2], [1, 1]]), "out of range"),
        ("multibinary", np.zeros(4, dtype=np.int8), "wrong shape"),
        ("box", np.array([0.0, 6.0], dtype=np.float32), "out of bounds"),
        ("box", np.array([0.0, np.nan]), "not finite"),
        ("box", np.zeros(3, dtype=np.float32), "wrong shape"),
        ("box", ["a", "b"], "wrong type"),
    ],
)
def test_bad_actions_raise_clear_errors(name, action, problem):
    space = SPACES[name]
    with pytest.raises(ValueError) as e:
        check_action(space, action)
    msg = str(e.value)
    assert problem in msg and str(space) in msg and "got" in msg
    with pytest.raises(ValueError, match=problem):
        policy_distribution(space).to_tensor(action)


def test_batched_checks_and_unsupported_spaces():
    spec = policy_distribution(SPACES["discrete"])
    assert spec.to_tensor(np.array([1, 3]), batched=True).tolist() == [0, 2]  # start removed
    with pytest.raises(ValueError, match=r"expected \(B,\)"):
        spec.to_tensor(np.array([[1, 3]]), batched=True)
    with pytest.raises(ValueError, match="unsupported action space"):
        policy_distribution(gym.spaces.Dict({"a": gym.spaces.Discrete(2)}))
    with pytest.raises(ValueError, match="finite low/high"):
        policy_distribution(gym.spaces.Box(-np.inf, np.inf, (2,)))


# ---------------------------------------------------------------------------------------------------
# heads and behaviour cloning


def make_heads(space, seed=0, num_tasks=1):
    torch.manual_seed(seed)
    heads = AgentHeads(8, space, CFG, num_tasks)
    for p in heads.parameters():  # leave the zero init so outputs depend on the input
        p.data.normal_(0, 0.3, generator=gen(seed))
    return heads


def test_heads_shapes_slices_and_zero_init():
    heads = AgentHeads(8, SPACES["box"], CFG, num_tasks=2)
    h = randn(2, 3, 8)
    assert heads.reward(h).eq(0).all() and heads.value(h).eq(0).all()
    assert torch.allclose(heads.continue_prob(h), torch.full((2, 3), 0.5))
    heads = make_heads(SPACES["box"], num_tasks=2)
    full = heads.policy_params(h, None)
    assert full.shape == (2, 3, CFG.mtp + 1, 4)
    for n in range(CFG.mtp + 1):
        torch.testing.assert_close(heads.policy_params(h, n), full[..., n, :])
        torch.testing.assert_close(heads.reward_logits(h, n), heads.reward_logits(h, None)[..., n, :])
    task = torch.ones(2, 3, dtype=torch.long)
    assert not torch.allclose(heads.value_logits(h, task), heads.value_logits(h))


def bc_loop(heads, h, actions, amask, rewards, rmask, L):
    """Σ_n mean over valid (b, t) with t+n < T; one head call per pair."""
    B, T = amask.shape
    bc = rew = 0.0
    for n in range(L + 1):
        nll, ce = [], []
        for b in range(B):
            for t in range(T - n):
                if amask[b, t + n]:
                    nll.append(-heads.policy(h[b, t], n).log_prob(actions[b, t + n]).item())
                if rmask[b, t + n]:
                    logits = heads.reward_logits(h[b, t], n)
                    ce.append(twohot_loss(logits, rewards[b, t + n], heads.bins).item())
        bc += sum(nll) / len(nll) if nll else 0.0
        rew += sum(ce) / len(ce) if ce else 0.0
    return bc, rew


@pytest.mark.parametrize("name", ["discrete", "box"])
def test_bc_mtp_loss_matches_loop(name):
    space = SPACES[name]
    heads = make_heads(space)
    B, T = 2, 4
    h = randn(B, T, 8)
    spec = heads.spec
    space.seed(0)
    actions = spec.to_tensor([space.sample() for _ in range(B * T)], batched=True)
    actions = actions.reshape(B, T, *spec.event_shape)
    amask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    rmask = torch.tensor([[False, True, True, True], [True, True, False, True]])
    rewards = randn(B, T, seed=2) * 3
    out = bc_mtp_loss(heads, h, actions, amask, rewards, reward_mask=rmask)
    bc, rew = bc_loop(heads, h, actions, amask, rewards, rmask, CFG.mtp)
    assert out.bc.item() == pytest.approx(bc, rel=1e-5)
    assert out.reward.item() == pytest.approx(rew, rel=1e-5)
    assert out.loss.item() == pytest.approx(bc + rew, rel=1e-5)


def test_bc_mtp_loss_ignores_targets_beyond_the_window_and_masked_actions():
    heads = make_heads(SPACES["box"])
    B, T, extra = 2, 3, 2
    h = randn(B, T + extra, 8)
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 5.0])
    actions = low + torch.rand(B, T + extra, 2, generator=gen(1)) * (high - low)
    rewards = randn(B, T + extra, seed=2)
    mask = torch.ones(B, T + extra, dtype=torch.bool)
    mask[:, T:] = False
    ref = bc_mtp_loss(heads, h[:, :T], actions[:, :T], mask[:, :T], rewards[:, :T]).loss
    # positions ≥ T masked out: garbage (NaN) targets and different features there change nothing
    actions2, rewards2, h2 = actions.clone(), rewards.clone(), h.clone()
    actions2[:, T:], rewards2[:, T:], h2[:, T:] = float("nan"), 1e6, 7.0
    h2.requires_grad_(True)
    out = bc_mtp_loss(heads, h2, actions2, mask, rewards2, reward_mask=mask).loss
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    out.backward()
    assert torch.isfinite(h2.grad).all() and h2.grad[:, T:].eq(0).all()
    # a short window: terms with n ≥ T have no pairs and contribute 0 (no NaN)
    short = bc_mtp_loss(heads, h[:, :1], actions[:, :1], mask[:, :1], rewards[:, :1])
    assert torch.isfinite(short.loss)


def test_continue_loss_is_bce_against_one_minus_terminated():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    term = torch.tensor([False, True, False, True])
    mask = torch.tensor([True, True, True, False])
    ref = []
    for z, d, m in zip(logits.tolist(), term.tolist(), mask.tolist()):
        if m:
            c, p = 1.0 - float(d), 1 / (1 + math.exp(-z))
            ref.append(-(c * math.log(p) + (1 - c) * math.log(1 - p)))
    assert continue_loss(logits, term, mask).item() == pytest.approx(sum(ref) / len(ref), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# imagination RL


def returns_loop(r, c, v, gamma, lam):
    """R_t = r_t + γ c_t ((1 − λ) v_{t+1} + λ R_{t+1}), R_H = v_H, for one row of python floats."""
    H = len(r)
    R = [0.0] * (H + 1)
    R[H] = v[H]
    for t in range(H - 1, -1, -1):
        R[t] = r[t] + gamma * c[t] * ((1 - lam) * v[t + 1] + lam * R[t + 1])
    return R[:H]


def test_lambda_returns_match_loop_and_index_convention():
    B, H, gamma, lam = 3, 5, 0.9, 0.7
    r, v = randn(B, H, seed=1), randn(B, H + 1, seed=2)
    c = (torch.rand(B, H, generator=gen(3)) > 0.2).float()
    R = lambda_returns(r, c, v, gamma, lam)
    for b in range(B):
        ref = returns_loop(r[b].tolist(), c[b].tolist(), v[b].tolist(), gamma, lam)
        torch.testing.assert_close(R[b], torch.tensor(ref), rtol=1e-6, atol=1e-6)
    # H = 1: R_0 = r_0 + γ c_0 v_1 for any λ; c_t = 0 cuts everything after the transition t -> t+1
    one = lambda_returns(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[9.0, 4.0]]), 0.9, 0.3)
    assert one.item() == pytest.approx(1.0 + 0.9 * 0.5 * 4.0)
    cut = lambda_returns(r, torch.zeros(B, H), v, gamma, lam)
    torch.testing.assert_close(cut, r)
    # λ = 0: one-step TD targets; λ = 1: discounted Monte-Carlo return bootstrapped with v_H
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 0.0), r + gamma * c * v[:, 1:])
    mc = v[:, H]
    for t in reversed(range(H)):
        mc = r[:, t] + gamma * c[:, t] * mc
    torch.testing.assert_close(lambda_returns(r, c, v, gamma, 1.0)[:, 0], mc)


def test_value_loss_two_hot_on_stop_gradient_returns():
    bins = make_bins(21, 20.0)
    logits = randn(2, 3, 21).requires_grad_(True)
    R = (randn(2, 3, seed=4) * 10).requires_grad_(True)
    w = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 0.2]]).requires_grad_(True)
    loss = value_loss(logits, R * 2, bins, w)
    ce = twohot_loss(logits, R * 2, bins)
    assert loss.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-6)
    loss.backward()
    assert R.grad is None and w.grad is None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(value_loss(logits, R, bins), twohot_loss(logits, R, bins).mean())


def pmpo_loop(logp, adv, kl, alpha, beta):
    """Dreamer 4's PMPO objective as written: D⁺ = {A ≥ 0}, D⁻ = {A < 0}, KL averaged over all N."""
    pos = [lp for lp, a in zip(logp, adv) if a >= 0]
    neg = [lp for lp, a in zip(logp, adv) if a < 0]
    loss = 0.0
    if neg:
        loss += (1 - alpha) / len(neg) * sum(neg)
    if pos:
        loss -= alpha / len(pos) * sum(pos)
    return loss + beta / len(kl) * sum(kl)


@pytest.mark.parametrize(
    "adv",
    [
        [0.5, -1.0, 2.0, -0.1, 0.0, 3.0],
        [1.0, 2.0, 0.5, 0.1, 9.0, 1.0],  # D⁻ empty
        [-1.0, -2.0, -0.5, -0.1, -9.0, -1.0],  # D⁺ empty
        [0.0] * 6,  # A = 0 is in D⁺ (the paper's ≥), D⁻ empty
    ],
)
def test_pmpo_loss_matches_transcription(adv):
    logp, kl = -randn(6).abs(), randn(6, seed=1).abs()
    for alpha, beta in [(0.5, 0.3), (0.8, 0.1)]:
        got = pmpo_loss(logp, torch.tensor(adv), kl, alpha, beta)
        ref = pmpo_loop(logp.tolist(), adv, kl.tolist(), alpha, beta)
        assert torch.isfinite(got) and got.item() == pytest.approx(ref, rel=1e-6, abs=1e-7)
    # signs only: rescaling the advantages changes nothing
    a = torch.tensor(adv)
    if 0.0 in adv:  # a zero advantage is positive: moving it to a small negative value changes the loss
        moved = torch.where(a == 0, torch.tensor(-1e-3), a)
        assert pmpo_loss(logp, moved, kl).item() != pytest.approx(pmpo_loss(logp, a, kl).item())
    assert pmpo_loss(logp, a * 100, kl).item() == pytest.approx(pmpo_loss(logp, a, kl).item())


def test_pmpo_policy_loss_gradients_only_into_the_policy():
    space = SPACES["discrete"]
    heads = make_heads(space)
    frozen = frozen_prior(heads)
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(frozen.policy_params(randn(2, 8)), heads.policy_params(randn(2, 8)))
    prior = make_heads(space, seed=1)  # deliberately trainable: pmpo_policy_loss must detach it itself
    h = randn(6, 8).requires_grad_(True)
    actions = torch.tensor([0, 1, 2, 0, 1, 2])
    R = randn(6, seed=3).requires_grad_(True)
    v = torch.cat([heads.value(h), torch.zeros(1)]).unsqueeze(0)
    adv = advantages(R.unsqueeze(0), v)[0]
    assert not adv.requires_grad
    loss = pmpo_policy_loss(heads, prior, h, actions, adv, CFG.pmpo_alpha, CFG.pmpo_beta)
    loss.backward()
    assert all(p.grad is None for p in prior.parameters())  # prior detached
    assert R.grad is None  # advantages enter by sign only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.policy_head.parameters())
    assert all(p.grad is None for p in heads.value_head.parameters())
    rl = {id(p) for p in heads.rl_parameters()}
    assert rl == {id(p) for p in [*heads.policy_head.parameters(), *heads.value_head.parameters()]}
    # positive advantage -> a gradient step raises ln π(a|s); negative lowers it
    heads2 = make_heads(space)
    opt = torch.optim.SGD(heads2.policy_head.parameters(), lr=0.1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    before = heads2.policy(h.detach()).log_prob(actions).detach()
    opt.zero_grad()
    pmpo_policy_loss(heads2, prior, h.detach(), actions, adv, beta=0.0).backward()
    opt.step()
    after = heads2.policy(h.detach()).log_prob(actions).detach()
    assert (after - before)[adv > 0].sum() > 0 > (after - before)[adv < 0].sum()


def test_pmpo_kl_is_policy_to_prior_not_the_reverse():
    """The β term is KL[π ‖ π_prior] (Dreamer 4), checked against torch's categorical KL on heads whose two
    directions differ; with every advantage negative the loss is (1 − α)·mean ln π + β·mean KL exactly."""
    space = SPACES["discrete"]
    heads, prior = make_heads(space, seed=0), make_heads(space, seed=1)
    h, actions = randn(6, 8, seed=5), torch.tensor([0, 1, 2, 0, 1, 2])
    pi = torch.distributions.Categorical(logits=heads.policy_params(h).float())
    pr = torch.distributions.Categorical(logits=prior.policy_params(h).float())
    forward = torch.distributions.kl_divergence(pi, pr)
    reverse = torch.distributions.kl_divergence(pr, pi)
    assert (forward - reverse).abs().max() > 1e-3  # the test can tell the directions apart
    alpha, beta = 0.5, 2.0
    loss = pmpo_policy_loss(heads, prior, h, actions, -torch.ones(6), alpha, beta)
    expect = (1 - alpha) * pi.log_prob(actions).mean() + beta * forward.mean()
    wrong = (1 - alpha) * pi.log_prob(actions).mean() + beta * reverse.mean()
    torch.testing.assert_close(loss, expect)
    assert not torch.allclose(loss, wrong)


# ---------------------------------------------------------------------------------------------------
# phase-2 loss normalisation


def _phase2_batch(cfg, b=2, t=4, seed=0):
    g = gen(seed)
    n, d = cfg.tokenizer.latent_tokens, cfg.tokenizer.latent_dim
    return {"latents": torch.rand(b, t, n, d, generator=g) * 2 - 1,
            "actions": torch.randint(0, 3, (b, t), generator=g),
            "action_mask": torch.ones(b, t, dtype=torch.bool),
            "rewards": torch.randint(-1, 2, (b, t), generator=g).float(),
            "terminated": torch.zeros(b, t, dtype=torch.bool)}


def test_phase2_terms_are_divided_by_their_running_rms():
    """loss = Σ_k L_k / RMS_k with RMS_k = sqrt(EMA(L_k²)) (bias-corrected), so the first step gives one
    per term and the dynamics loss is not drowned by the 9-step BC sum; loss_norm=False gives Σ_k L_k."""
    from worldflow.agent.model import PHASE2_TERMS, AgentModel
    from worldflow.config import load_config
    from worldflow.train.agent import bc_losses

    cfg = load_config("tiny")
    model = AgentModel(cfg, gym.spaces.Discrete(3)).train()
    d = cfg.agent.loss_norm_decay
    loss1, t1 = bc_losses(model, _phase2_batch(cfg, seed=0), cfg, gen(1))
    assert torch.allclose(loss1, torch.tensor(float(len(PHASE2_TERMS))), atol=1e-5)
    loss2, t2 = bc_losses(model, _phase2_batch(cfg, seed=2), cfg, gen(3))
    want = sum(t2[k] / math.sqrt((d * (1 - d) * t1[k] ** 2 + (1 - d) * t2[k] ** 2) / (1 - d * d))
               for k in PHASE2_TERMS)
    assert torch.allclose(loss2, want, rtol=1e-4)
    assert {f"loss_rms.{k}.mean_sq" for k in PHASE2_TERMS} <= set(model.state_dict())  # checkpointed
    cfg = derive(cfg, **{"agent.loss_norm": False})
    loss3, t3 = bc_losses(model, _phase2_batch(cfg, seed=4), cfg, gen(5))
    assert torch.allclose(loss3, sum(t3[k] for k in PHASE2_TERMS), rtol=1e-5)


def test_imagine_aligns_heads_with_states_and_returns_float32_under_bf16():
    """imagine(): rewards/continues are the heads at h_1..h_H (reward on arrival), actions are the policy's
    at h_0..h_{H−1}; under bf16 autocast (phase 3 with train_agent.bf16) every tensor comes back float32
    and the imagined rollout stays close to the float32 one."""
    from worldflow.agent.model import AgentModel, imagine
    from worldflow.config import load_config

    cfg = load_config("tiny")
    model = AgentModel(cfg, gym.spaces.Discrete(3)).eval()
    for p in model.heads.parameters():  # non-zero heads, so the alignment check means something
        torch.nn.init.normal_(p, std=0.3)
    ctx = _phase2_batch(cfg, b=3, t=3)
    im = imagine(model, ctx, horizon=4, steps=2, generator=gen(7))
    assert im.h.shape[:2] == (3, 5) and im.actions.shape == (3, 4) and im.latents.shape[:2] == (3, 4)
    assert torch.allclose(im.rewards, model.heads.reward(im.h[:, 1:]), atol=1e-6)
    assert torch.allclose(im.continues, model.heads.continue_prob(im.h[:, 1:]), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo = imagine(model, ctx, horizon=4, steps=2, generator=gen(7), sample=False)
    ref = imagine(model, ctx, horizon=4, steps=2, generator=gen(7), sample=False)
    for name in ("h", "rewards", "continues", "latents"):
        assert getattr(lo, name).dtype == torch.float32, name
    assert (lo.latents - ref.latents).abs().mean() < 0.05 * ref.latents.abs().mean()


def test_phase2_targets_line_up_with_the_frames_that_show_them():
    """A whole Catch episode as a dataset clip (frame t with the step t -> t+1; the final frame has no
    step, action_mask False): h_t's reward target is nonzero exactly on the frames that show the ball in
    the paddle row, positive where it was caught, and the continue target is 'terminated' for the final
    frame only. Taking r_t instead of r_{t-1}, or terminated shifted, fails here."""
    from worldflow.envs.catch import PADDLE_ROW, read_objects

    from worldflow.train.agent import arrival_targets

    env = gym.make("worldflow/Catch-v0", size=64, num_balls=3)
    obs, _ = env.reset(seed=0)  # always moving left, this seed misses two balls and catches one
    frames, rewards, terms = [obs], [], []
    done = False
    while not done:
        obs, r, term, trunc, _ = env.step(0)
        frames, rewards, terms = frames + [obs], rewards + [r], terms + [term]
        done = term or trunc
    n = len(frames)  # T + 1 frames, T steps; pad the final frame's step as the dataset does
    t = arrival_targets(torch.tensor([rewards + [0.0]]), torch.tensor([terms + [False]]),
                        torch.tensor([[True] * (n - 1) + [False]]))
    ball_in_row = read_objects(np.stack(frames))["ball"][:, PADDLE_ROW].any(-1)  # (T + 1,)
    reward = t["reward"][0].numpy()
    assert (reward != 0).tolist() == ball_in_row.tolist() and ball_in_row.sum() == 3
    assert (reward > 0).any() and (reward < 0).any()  # both outcomes occur in this episode
    assert not t["reward_mask"][0, 0] and t["reward_mask"][0, 1:].all()
    # h_{t+1} predicts the end of step t: the final frame's state (index n - 1) is the only terminal one
    assert t["terminated"][0].tolist() == [False] * (n - 2) + [True] and t["continue_mask"][0].all()


def test_imagined_action_a_t_drives_frame_t_plus_1():
    """imagine(): the action the policy picks at state h_t conditions the *next* frame. Changing only the
    third action leaves the first two imagined frames bit-identical and changes the third."""
    from worldflow.agent.model import AgentModel, imagine
    from worldflow.config import load_config

    cfg = load_config("tiny")
    model = AgentModel(cfg, gym.spaces.Discrete(3)).eval()
    ctx = _phase2_batch(cfg, b=2, t=3)

    class Scripted:  # a policy that plays a fixed action sequence, drawing no random numbers
        def __init__(self, seq):
            self.seq = iter(seq)

        def __call__(self, h, *args, **kw):
            a = torch.full((h.shape[0],), next(self.seq), dtype=torch.long)
            return type("D", (), {"sample": lambda self, g=None: a, "mode": lambda self: a})()

    runs = []
    for seq in ([0, 0, 0, 0], [0, 0, 2, 0]):
        model.heads.policy = Scripted(seq)
        runs.append(imagine(model, ctx, horizon=4, steps=2, generator=gen(3)))
    a, b = runs
    assert a.actions[:, 2].tolist() == [0, 0] and b.actions[:, 2].tolist() == [2, 2]
    assert torch.equal(a.latents[:, :2], b.latents[:, :2])  # frames 1 and 2: before the change
    assert not torch.allclose(a.latents[:, 2], b.latents[:, 2])  # frame 3 is the one a_2 leads to
