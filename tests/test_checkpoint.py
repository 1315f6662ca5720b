"""Checkpoints: atomic writes, strict loading with named mismatches, exact resume of the trainer."""

import os

import pytest
import torch

from worldflow.checkpoint import CheckpointError, latest_checkpoint, load_weights, save_checkpoint
from worldflow.config import TrainConfig
from worldflow.train.trainer import NonFiniteLossError, Trainer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(gen):
    x = torch.randn(16, 4, generator=gen)
    return x, x.sum(-1, keepdim=True).sin()


def _loss(model, batch, gen):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"mse": loss.detach()}


def test_strict_load_names_tensors(tmp_path):
    m = _model()
    d = save_checkpoint(tmp_path, 1, m, {})
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match=r"2\.weight"):
        load_weights(other, d)


def test_interrupted_write_keeps_good_checkpoint(tmp_path, monkeypatch):
    m = _model()
    save_checkpoint(tmp_path, 1, m, {})
    import worldflow.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, m, {})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".step")]


def _run(tmp_path, crash_at=None):
    cfg = TrainConfig(steps=9, batch=16, lr=1e-2, warmup=2, log_every=1, eval_every=0, ckpt_every=3)
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)

    def batch_fn(gen):
        if t.step == crash_at:
            raise KeyboardInterrupt("simulated kill")
        return _batch(gen)

    t.fit(batch_fn, _loss)
    return t


def test_resume_is_exact(tmp_path):
    full = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", crash_at=7)  # killed after the checkpoint at step 6
    resumed = _run(tmp_path / "b")
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, batch=4, warmup=1, log_every=1, eval_every=0, ckpt_every=2)
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)

    def bad_loss(model, batch, gen):
        loss, terms = _loss(model, batch, gen)
        if t.step == 5:
            return loss * float("nan"), {"mse": terms["mse"] * float("nan")}
        return loss, terms

    with pytest.raises(NonFiniteLossError, match="step 5"):
        t.fit(_batch, bad_loss)
    assert latest_checkpoint(tmp_path / "toy" / "checkpoints").name == "step_00000004"


def test_head_lr_applies_to_heads_only(tmp_path):
    """train.head_lr_scale scales the peak lr of parameters under ``heads.``; the schedule scales both
    groups, and weight decay still skips 1-D parameters."""
    from worldflow.train.trainer import lr_at, make_optimizer

    class WithHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 3)
            self.heads = torch.nn.Linear(3, 2)

    model = WithHeads()
    cfg = TrainConfig(lr=1e-3, head_lr_scale=4.0, warmup=2, steps=1, ckpt_every=0, log_every=1)
    opt = make_optimizer(model, cfg)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.heads.weight)]["lr_scale"] == pytest.approx(4.0)
    assert by_param[id(model.body.weight)]["lr_scale"] == 1.0
    assert by_param[id(model.heads.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.body.weight)]["weight_decay"] == cfg.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    t = Trainer(model, cfg, tmp_path, "x", {}, progress=False)
    t.fit(lambda g: torch.ones(2, 3), lambda m, b, g: ((m.body(b).sum() + m.heads(b).sum()) ** 2, {}))
    lrs = {g["lr_scale"]: g["lr"] for g in t.opt.param_groups}
    assert lrs[4.0] == pytest.approx(4 * lr_at(0, cfg)) and lrs[1.0] == pytest.approx(lr_at(0, cfg))
    assert make_optimizer(model, TrainConfig(lr=1e-3)).param_groups[0]["lr_scale"] == 1.0  # default: 1
