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

    monkeypatch.setattr(ck, "save_state", boom)
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


# ---------------------------------------------------------------------------------------------------
# No pickles: the training state and the latent cache are safetensors + JSON


def test_state_file_round_trips_optimizer_and_rng_states(tmp_path):
    import random

    import numpy as np

    from worldflow.checkpoint import rng_state
    from worldflow.state import load_state, save_state

    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95))
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    random.random()
    tree = {"step": 3, "rng": rng_state(), "optimizer": opt.state_dict(),
            "extra": {"gen": torch.Generator().manual_seed(5).get_state(), "nan": float("nan"), "none": None}}
    save_state(tmp_path / "s.safetensors", tree)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["extra"]["none"] is None and np.isnan(back["extra"]["nan"])
    assert torch.equal(back["extra"]["gen"], tree["extra"]["gen"])
    py, npy = back["rng"]["python"], back["rng"]["numpy"]
    assert py == tree["rng"]["python"] and isinstance(py, tuple)  # random.setstate needs the tuple
    assert npy[0] == "MT19937" and npy[1].dtype == np.uint32
    assert np.array_equal(npy[1], tree["rng"]["numpy"][1])
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert back["optimizer"]["state"].keys() == tree["optimizer"]["state"].keys()  # int keys stay ints
    opt2 = torch.optim.AdamW(_model().parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # accepted as a real optimizer state
    random.setstate(py)
    np.random.set_state(npy)


class _Boom:
    """Unpickling this runs os.system: a crafted file must never get that far."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_in_a_checkpoint_runs_nothing(tmp_path, monkeypatch):
    """A run directory someone hands over, with state.pt (the pre-safetensors name) replaced by a pickle
    that would run a command: resuming fails with a named error and the command never runs."""
    import pickle

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(steps=4, batch=4, warmup=1, log_every=1, eval_every=0, ckpt_every=2)
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)
    t.fit(_batch, _loss)
    d = latest_checkpoint(tmp_path / "toy" / "checkpoints")
    (d / "state.safetensors").unlink()
    (d / "state.pt").write_bytes(pickle.dumps({"step": 4, "x": _Boom()}, protocol=2))
    from worldflow.checkpoint import read_state

    with pytest.raises(CheckpointError, match="is not a plain-data pickle, so it is not loaded"):
        read_state(d)
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)
    with pytest.warns(UserWarning, match="not a plain-data pickle"):
        assert t.resume() and t.step == 2  # the older checkpoint, never the crafted one
    assert not (tmp_path / "PWNED").exists()


def test_a_crafted_latent_cache_runs_nothing(tmp_path, monkeypatch):
    """A pickle saved under the latent cache's name is never unpickled: it is not a state file."""
    import pickle

    from worldflow.state import StateFileError, load_state

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "latents_train_0123456789ab.safetensors"
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(StateFileError, match="is unreadable"):
        load_state(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_legacy_plain_state_pt_still_resumes(tmp_path):
    """Checkpoints written before state.safetensors (a plain-data state.pt) resume as before."""
    cfg = TrainConfig(steps=4, batch=4, warmup=1, log_every=1, eval_every=0, ckpt_every=2)
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)
    t.fit(_batch, _loss)
    from worldflow.checkpoint import read_state

    d = latest_checkpoint(tmp_path / "toy" / "checkpoints")
    torch.save(read_state(d), d / "state.pt")  # what the old format held
    (d / "state.safetensors").unlink()
    again = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)
    assert again.resume() and again.step == 4


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    """A truncated model.safetensors in the newest step: resume names it, warns, and takes the older one."""
    cfg = TrainConfig(steps=6, batch=4, warmup=1, log_every=1, eval_every=0, ckpt_every=2)
    Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False).fit(_batch, _loss)
    root = tmp_path / "toy" / "checkpoints"
    newest = latest_checkpoint(root)
    assert newest.name == "step_00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)
    with pytest.warns(UserWarning, match="step_00000006 does not load.*unreadable"):
        assert t.resume()
    assert t.step == 4
    with pytest.raises(CheckpointError, match="model.safetensors are unreadable"):  # loaders name the file
        load_weights(_model(), newest)


def test_resume_with_another_config_names_the_keys_that_differ(tiny_data, tiny_cfg, tmp_path):
    from worldflow.checkpoint import CheckpointMismatchError
    from worldflow.train import tokenizer as train_tokenizer

    steps = ["train_tokenizer.steps=2", "train_tokenizer.ckpt_every=2", "train_tokenizer.eval_every=0"]
    train_tokenizer.train(tiny_cfg(*steps), tiny_data, tmp_path, progress=False)
    wider = tiny_cfg(*steps, "train_tokenizer.steps=4", "tokenizer.transformer.width=48")
    with pytest.raises(CheckpointMismatchError) as e:
        train_tokenizer.train(wider, tiny_data, tmp_path, progress=False)
    msg = str(e.value)
    assert "trained with another config (tokenizer.transformer.width: 32 -> 48)" in msg
    assert "--no-resume" in msg and "train_tokenizer.steps" not in msg and len(msg) < 400


def test_a_second_process_writing_the_same_run_stops_with_the_holders_pid(tmp_path):
    """While a phase trains, <run>/.lock is held; another process (here: a child holding the lock) makes
    a second trainer stop with a named error before it touches anything; the lock is freed afterwards."""
    import subprocess
    import sys

    from worldflow.io import RunLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from worldflow.io import run_lock\n"
         f"with run_lock({str(tmp_path)!r}, 'training toy'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = TrainConfig(steps=2, batch=4, warmup=1, log_every=1, eval_every=0, ckpt_every=2)
        held_by = f"is in use by pid {holder.pid} .*training toy.*another --run"
        with pytest.raises(RunLockedError, match=held_by):
            Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False).fit(_batch, _loss)
        assert not (tmp_path / "toy" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    t = Trainer(_model(), cfg, tmp_path, "toy", {}, progress=False)  # the kernel freed the dead holder's lock
    t.fit(_batch, _loss)
    assert t.step == 2 and (tmp_path / ".lock").read_text() == ""
