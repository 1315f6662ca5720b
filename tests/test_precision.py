"""Precision chosen by the hardware (bf16: auto) and phases stopped by the max_minutes safety cap."""

import json
import warnings

import pytest
import torch

from worldflow import precision
from worldflow.cli.demo import capped_phases
from worldflow.config import ConfigError, TrainConfig, load_config
from worldflow.train.trainer import Trainer, status_note


def _fake_cpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(precision, "_cpu_bf16_native", lambda: native)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_support_and_never_warns(monkeypatch, native):
    _fake_cpu(monkeypatch, native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.use_bf16("auto", "cpu") is native
        assert precision.use_bf16(False, "cpu") is False


def test_forcing_emulated_bf16_warns_with_the_slowdown_and_the_fix(monkeypatch):
    _fake_cpu(monkeypatch, False)
    with pytest.warns(UserWarning, match=r"train_tokenizer\.bf16=true .*emulated.*8x slower.*bf16=auto"):
        assert precision.use_bf16(True, "cpu", "train_tokenizer") is True
    _fake_cpu(monkeypatch, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.use_bf16(True, "cpu") is True


def test_describe_cpu_names_capability_and_bf16():
    s = precision.describe_cpu()
    assert s.startswith(torch.backends.cpu.get_cpu_capability())
    assert s.endswith(("bf16 native", "bf16 emulated"))


def test_every_preset_defaults_to_auto_and_config_accepts_only_auto_true_false():
    for preset in ("tiny", "small", "base"):
        cfg = load_config(preset)
        for sec in ("train_tokenizer", "train_dynamics", "train_bc", "train_agent"):
            assert getattr(cfg, sec).bf16 == "auto", (preset, sec)
    assert load_config("tiny", ["train_bc.bf16=true"]).train_bc.bf16 is True
    assert load_config("tiny", ["train_bc.bf16=false"]).train_bc.bf16 is False
    assert load_config("tiny", ["train_bc.bf16=auto"]).train_bc.bf16 == "auto"
    for bad in ("maybe", "1", "Auto"):  # (YAML reads "yes" as true)
        with pytest.raises(ConfigError, match="train_bc.bf16"):
            load_config("tiny", [f"train_bc.bf16={bad}"])


def _trainer(tmp_path, monkeypatch, native: bool, **kw) -> Trainer:
    _fake_cpu(monkeypatch, native)
    torch.manual_seed(0)
    cfg = TrainConfig(**{"steps": 6, "batch": 4, "warmup": 1, "log_every": 1, "eval_every": 0,
                         "ckpt_every": 0, **kw})
    return Trainer(torch.nn.Linear(3, 1), cfg, tmp_path, "tokenizer", {}, progress=False)


def _fit(t: Trainer) -> dict:
    seen = []

    def loss_fn(m, x, gen):
        out = m(x)
        seen.append(out.dtype)
        return out.float().square().mean(), {}

    s = t.fit(lambda g: torch.randn(4, 3, generator=g), loss_fn)
    s["dtypes"] = set(seen)
    return s


@pytest.mark.parametrize("native", [True, False])
def test_trainer_resolves_auto_and_reports_precision(tmp_path, monkeypatch, native):
    s = _fit(_trainer(tmp_path, monkeypatch, native))
    assert s["precision"] == ("bf16" if native else "fp32")
    assert s["dtypes"] == {torch.bfloat16 if native else torch.float32}
    assert s["capped"] is False and s["step"] == s["planned_steps"] == 6
    assert status_note(s) == f", {s['precision']}"


def test_a_phase_stopped_by_the_safety_cap_says_so(tmp_path, monkeypatch, capsys):
    t = _trainer(tmp_path, monkeypatch, False, max_minutes=1e-9)
    s = _fit(t)
    assert s["capped"] is True and s["step"] == 1 and s["planned_steps"] == 6
    assert "CAPPED by max_minutes at step 1 of 6" in status_note(s)
    out = capsys.readouterr().out
    assert "safety cap (train_tokenizer.max_minutes) stopped training at step 1 of 6" in out
    listed = capped_phases({"tokenizer": s, "dynamics": {**s, "capped": False}})
    assert json.loads(json.dumps(listed)) == [{"phase": "tokenizer", "step": 1, "steps": 6}]
