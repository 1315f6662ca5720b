"""EMA weights (worldflow.nn.ema): the average's maths, and that checkpoints and exact resume carry it.
The dynamics model's use of it (bootstrap targets, sampling) is tested in test_dynamics.py."""

import pytest
import torch

from worldflow.config import TrainConfig
from worldflow.nn.ema import EMAWeights
from worldflow.train.trainer import Trainer


class _WithEMA(torch.nn.Module):
    """A toy model that keeps an EMA of itself and updates it after each optimiser step, as DynamicsModel."""

    def __init__(self, decay=0.9):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.ema = EMAWeights(self, decay)

    def forward(self, x):
        return self.net(x)

    def after_step(self):
        self.ema.update(self)


def test_ema_update_matches_transcription_and_copies_back():
    m = _WithEMA(decay=0.75)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert set(m.ema.params()) == set(start) and all(torch.equal(m.ema.params()[n], start[n]) for n in start)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.after_step()
    for n, p in m.named_parameters():  # θ̄ = 0.75·θ̄0 + 0.25·θ
        torch.testing.assert_close(m.ema.params()[n], 0.75 * start[n] + 0.25 * p.detach())
    m.ema.copy_to(m)
    assert all(torch.equal(p, m.ema.params()[n]) for n, p in m.named_parameters())
    with pytest.raises(ValueError, match="decay must be in"):
        EMAWeights(m.net, 1.0)


def test_trainer_updates_the_ema_and_resume_is_exact(tmp_path):
    """The average lives in buffers: a run killed after a checkpoint resumes to the same weights and EMA."""
    cfg = TrainConfig(steps=8, batch=8, lr=1e-2, warmup=1, log_every=1, eval_every=0, ckpt_every=3)

    def batch(gen):
        x = torch.randn(8, 4, generator=gen)
        return x, x.sum(-1, keepdim=True).sin()

    def loss(model, b, gen):
        x, y = b
        out = ((model(x) - y) ** 2).mean()
        return out, {"mse": out.detach()}

    def run(path, crash_at=None):
        t = Trainer(_WithEMA(), cfg, path, "toy", {}, progress=False)

        def batch_fn(gen):
            if t.step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            return batch(gen)

        t.fit(batch_fn, loss)
        return t.model

    full = run(tmp_path / "a")
    assert not torch.equal(full.ema.params()["net.0.weight"], full.net[0].weight)  # it moved, lagging
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=5)
    resumed = run(tmp_path / "b")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n  # parameters and EMA buffers alike


def test_a_dynamics_checkpoint_samples_with_its_ema_weights(tmp_path):
    """load_dynamics (eval, rollout) puts the averaged weights in place of the trained ones."""
    import gymnasium as gym

    from worldflow.checkpoint import save_checkpoint
    from worldflow.config import load_config, to_dict
    from worldflow.dynamics.model import build_dynamics
    from worldflow.run import checkpoints_dir, load_dynamics

    cfg = load_config("tiny", ["dynamics.ema=0.5"])
    model = build_dynamics(cfg, gym.spaces.Discrete(3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # trained weights now differ from the average (still the initial weights)
    save_checkpoint(checkpoints_dir(tmp_path, "dynamics"), 1, model, to_dict(cfg))
    loaded, _ = load_dynamics(tmp_path, gym.spaces.Discrete(3))
    for n, p in loaded.named_parameters():
        assert torch.equal(p, model.ema.params()[n]), n
        assert not torch.equal(p, dict(model.named_parameters())[n])
