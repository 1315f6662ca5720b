"""worldflow.rng: seeded draws on any device, and the rule that every ``generator=`` draw goes through it.

The CUDA tests (skipped without a GPU) run the trainer's setup: a CPU ``torch.Generator`` feeding models
and batches that live on CUDA.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from worldflow import flow, rng

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "worldflow", ROOT / "envs"]
HELPERS = ROOT / "worldflow" / "rng.py"

# torch.<name>(..., generator=...) draws, and Tensor / nn.init methods that draw in place
TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "multinomial", "normal", "bernoulli", "poisson",
               "rand_like", "randn_like", "randint_like"}
METHOD_DRAWS = {"multinomial", "normal_", "uniform_", "bernoulli", "bernoulli_", "exponential_", "random_",
                "geometric_", "log_normal_", "cauchy_"}
RNG_MODULES = {"rng", "worldflow.rng"}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# The static rule: no generator draw outside worldflow/rng.py


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _torch_names(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names bound to the torch module, and local names of functions imported from it."""
    modules, funcs = {"torch"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            funcs |= {a.asname or a.name: a.name for a in node.names}
    return modules, funcs


def _is_draw(call: ast.Call, modules: set[str], funcs: dict[str, str]) -> bool:
    f = call.func
    if isinstance(f, ast.Name):
        return funcs.get(f.id) in TORCH_DRAWS
    if not isinstance(f, ast.Attribute) or _dotted(f.value) in RNG_MODULES:
        return False
    return (f.attr in TORCH_DRAWS and _dotted(f.value) in modules) or f.attr in METHOD_DRAWS


def generator_draws(source: str, name: str = "<string>") -> list[str]:
    """``name:line`` of each torch random draw given ``generator=`` (or ``**kwargs``, which may hide one)."""
    tree = ast.parse(source)
    modules, funcs = _torch_names(tree)
    lines = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and _is_draw(node, modules, funcs)
                   and any(k.arg in ("generator", None) for k in node.keywords))
    return [f"{name}:{n}" for n in lines]


def test_checker_catches_bypasses():
    src = """
import torch
import torch as th
from torch import randn as rn
from worldflow import rng
a = torch.randn(3, generator=g)
b = x.normal_(0, 1, generator=g)
c = torch.rand((), **kw)
d = th.randperm(4, generator=g)
e = rn(2, generator=g)
f = torch.nn.init.uniform_(w, generator=g)
ok1 = rng.randn((3,), generator=g)
ok2 = RandomSampler(ds, generator=g)
ok3 = torch.randn(3)
ok4 = RolloutStream(model, 2, generator=g)
"""
    assert generator_draws(src) == [f"<string>:{i}" for i in (6, 7, 8, 9, 10, 11)]


def test_every_generator_draw_goes_through_rng():
    files = [p for d in SCANNED for p in sorted(d.rglob("*.py")) if p != HELPERS]
    assert len(files) > 10
    hits = [h for p in files for h in generator_draws(p.read_text(), str(p.relative_to(ROOT)))]
    assert not hits, f"draw with worldflow.rng instead (a CPU generator cannot fill CUDA tensors): {hits}"


# ---------------------------------------------------------------------------------------------------
# The helpers on the CPU: the plain torch call's numbers


def test_cpu_draws_equal_the_plain_torch_calls():
    torch.testing.assert_close(rng.randn((3, 4), gen(1), "cpu"), torch.randn(3, 4, generator=gen(1)),
                               rtol=0, atol=0)
    assert torch.equal(rng.randn((5,), gen(2), "cpu", torch.bfloat16),
                       torch.randn(5, generator=gen(2), dtype=torch.bfloat16))
    assert torch.equal(rng.rand((2, 3), gen(3)), torch.rand(2, 3, generator=gen(3)))
    assert torch.equal(rng.randint(7, (10,), gen(4)), torch.randint(7, (10,), generator=gen(4)))
    assert torch.equal(rng.randint(9, (10,), gen(4), low=2), torch.randint(2, 9, (10,), generator=gen(4)))
    assert torch.equal(rng.randperm(8, gen(5)), torch.randperm(8, generator=gen(5)))
    probs = torch.rand(4, 6, generator=gen(6))
    assert torch.equal(rng.multinomial(probs, 2, gen(7)), torch.multinomial(probs, 2, generator=gen(7)))
    assert torch.equal(rng.multinomial(probs, 9, gen(7), replacement=True),
                       torch.multinomial(probs, 9, True, generator=gen(7)))


def test_shapes_dtypes_and_devices():
    assert rng.rand((), gen()).shape == () and rng.rand((), gen()).dtype == torch.float32
    assert rng.randn((2, 3), gen(), dtype=torch.float64).dtype == torch.float64
    x = rng.randint(5, (4, 2), gen())
    assert x.shape == (4, 2) and x.dtype == torch.int64 and 0 <= int(x.min()) and int(x.max()) < 5
    assert sorted(rng.randperm(6, gen()).tolist()) == list(range(6))
    assert rng.randn((3,)).device.type == "cpu"  # no generator, no device: torch's default device
    # drawn where the CPU generator lives, then moved: the result is on the target device
    assert rng.randn((2, 3), gen(), "meta").device.type == "meta"
    assert rng.rand((2,), gen(), torch.device("meta")).device.type == "meta"
    assert rng.randperm(4, gen(), "meta").device.type == "meta"


def test_multinomial_honours_the_probabilities():
    probs = torch.zeros(5, 4)
    probs[torch.arange(5), torch.tensor([3, 0, 2, 1, 3])] = 1.0
    for seed in range(5):
        assert rng.multinomial(probs, 1, gen(seed))[:, 0].tolist() == [3, 0, 2, 1, 3]
    out = rng.multinomial(torch.tensor([0.0, 2.0, 0.0]), 6, gen(), replacement=True)  # 1-D, unnormalised
    assert out.shape == (6,) and out.tolist() == [1] * 6
    freq = torch.bincount(rng.multinomial(torch.tensor([0.2, 0.8]), 4000, gen(1), True), minlength=2) / 4000
    assert math.isclose(float(freq[1]), 0.8, abs_tol=0.03)


def test_same_seed_same_numbers_and_generator_advances():
    g = gen(11)
    a, b = rng.randn((4,), g), rng.randn((4,), g)
    assert not torch.equal(a, b)
    assert torch.equal(torch.cat([a, b]), torch.randn(8, generator=gen(11)))


# ---------------------------------------------------------------------------------------------------
# CUDA: a CPU generator feeding CUDA tensors (skipped without a GPU)


@cuda
def test_cuda_draws_from_a_cpu_generator_equal_the_cpu_draws():
    dev = torch.device("cuda")
    for draw in (lambda g, d: rng.randn((3, 4), g, d), lambda g, d: rng.rand((5,), g, d),
                 lambda g, d: rng.randint(7, (6,), g, d), lambda g, d: rng.randperm(9, g, d)):
        on_gpu, on_cpu = draw(gen(3), dev), draw(gen(3), "cpu")
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), on_cpu)
    probs = torch.rand(4, 6, generator=gen(6))
    got = rng.multinomial(probs.to(dev), 2, gen(7))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), rng.multinomial(probs, 2, gen(7)))
    tau, d = flow.sample_tau_d(16, 5, 8, 0.5, gen(8), dev)
    want = flow.sample_tau_d(16, 5, 8, 0.5, gen(8), "cpu")
    assert tau.device.type == d.device.type == "cuda"
    assert torch.equal(tau.cpu(), want[0]) and torch.equal(d.cpu(), want[1])


@cuda
@pytest.mark.parametrize("space", [gym.spaces.Discrete(5), gym.spaces.MultiDiscrete([3, 4]),
                                   gym.spaces.MultiBinary(4), gym.spaces.Box(-1.0, 2.0, (3,))],
                         ids=["discrete", "multidiscrete", "multibinary", "box"])
def test_policy_distributions_sample_on_cuda_with_a_cpu_generator(space):
    from worldflow.agent.distributions import TanhNormal, policy_distribution

    spec = policy_distribution(space)
    params = torch.randn(6, spec.param_dim, generator=gen(1))
    on_gpu, on_cpu = spec(params.cuda()), spec(params)
    a = on_gpu.sample(gen(2))
    assert a.device.type == "cuda" and a.shape == on_cpu.sample(gen(2)).shape
    assert torch.isfinite(on_gpu.log_prob(a)).all()
    if isinstance(on_gpu, TanhNormal):  # same ε on both devices; the arithmetic may round differently
        torch.testing.assert_close(a.cpu(), on_cpu.sample(gen(2)), rtol=1e-4, atol=1e-5)
        assert on_gpu.entropy(2, gen(3)).device.type == "cuda"
    else:
        assert torch.equal(a.cpu(), on_cpu.sample(gen(2)))


def _agent_batch(cfg, b: int, t: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    g = gen(0)
    n, d = cfg.tokenizer.latent_tokens, cfg.tokenizer.latent_dim
    batch = {"latents": torch.rand(b, t, n, d, generator=g) * 2 - 1,
             "actions": torch.randint(0, 3, (b, t), generator=g),
             "action_mask": torch.ones(b, t, dtype=torch.bool),
             "rewards": torch.randint(-1, 2, (b, t), generator=g).float(),
             "terminated": torch.zeros(b, t, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}


@cuda
def test_context_features_bc_losses_and_imagination_on_cuda():
    from worldflow.agent.model import AgentModel, imagine
    from worldflow.config import load_config
    from worldflow.train.agent import bc_losses

    cfg = load_config("tiny")
    assert cfg.dynamics.context_noise  # the noisy-context draw is the one under test
    torch.manual_seed(0)
    cpu_model = AgentModel(cfg, gym.spaces.Discrete(3)).eval()
    gpu_model = AgentModel(cfg, gym.spaces.Discrete(3)).cuda().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    ctx_cpu, ctx_gpu = _agent_batch(cfg, 3, 4, "cpu"), _agent_batch(cfg, 3, 4, "cuda")
    h_gpu = gpu_model.context_features(ctx_gpu["latents"], ctx_gpu["actions"], ctx_gpu["action_mask"], gen(4))
    h_cpu = cpu_model.context_features(ctx_cpu["latents"], ctx_cpu["actions"], ctx_cpu["action_mask"], gen(4))
    assert h_gpu.device.type == "cuda"
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-3, atol=1e-3)  # same noise, same features
    loss, terms = bc_losses(gpu_model.train(), ctx_gpu, cfg, gen(5))
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    loss.backward()
    im = imagine(gpu_model.eval(), ctx_gpu, horizon=3, steps=2, generator=gen(6))
    assert im.h.device.type == im.actions.device.type == im.latents.device.type == "cuda"
    assert torch.isfinite(im.h).all() and im.actions.shape == (3, 3)


@cuda
def test_tiny_pipeline_on_cuda(tiny_data, tiny_cfg, tmp_path):
    """Tokenizer, dynamics, BC and imagination phases of the tiny preset with device=cuda: the trainer's
    generator stays on the CPU while models and batches live on the GPU."""
    from worldflow.train import agent as train_agent
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    cfg = lambda: tiny_cfg("device=cuda")  # noqa: E731
    assert cfg().device == "cuda"
    run = tmp_path / "cuda"
    summaries = {"tokenizer": train_tokenizer.train(cfg(), tiny_data, run, progress=False),
                 "dynamics": train_dynamics.train(cfg(), tiny_data, run, progress=False),
                 **train_agent.train_offline(cfg(), tiny_data, run, progress=False)}
    for phase in ("tokenizer", "dynamics", "agent_bc", "agent"):
        assert (run / phase / "checkpoints" / "latest.json").exists(), phase
    for name, summary in summaries.items():
        assert summary["step"] > 0, name
        losses = [v for k, v in summary["train"].items() if k.startswith("loss") and isinstance(v, float)]
        assert losses and all(math.isfinite(v) for v in losses), (name, summary["train"])
