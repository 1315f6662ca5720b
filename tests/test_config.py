"""Config loading, presets, overrides and errors."""

import json

import pytest

from worldflow.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    load_config,
    read_config,
    save_config,
    to_dict,
    warn_if_window_exceeds_training,
)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.tokenizer.transformer.width > 0


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_never_attend_further_back_than_they_train(preset):
    """Every shipped preset keeps each temporal window within its longest training clip."""
    cfg = load_config(preset)
    assert cfg.tokenizer.context <= cfg.tokenizer.clip_len
    dyn = cfg.dynamics
    assert dyn.context <= max(cfg.data.clip_len, dyn.long_len if dyn.long_every > 0 else 0)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_latents_pack_into_whole_dynamics_tokens(preset):
    cfg = load_config(preset)
    n = cfg.tokenizer.num_latents(cfg.data.size)
    assert n > 0 and n % cfg.dynamics.pack == 0 and cfg.data.size % cfg.tokenizer.patch == 0


def test_window_warning_names_the_section():
    with pytest.warns(UserWarning, match="dynamics.context=16 exceeds the 8-frame"):
        warn_if_window_exceeds_training("dynamics", 16, 8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_window_exceeds_training("dynamics", 8, 8)


def test_preset_values_applied():
    cfg = load_config("tiny")
    assert cfg.data.size == 16
    assert cfg.tokenizer.transformer.width == 32
    # untouched fields keep dataclass defaults
    assert cfg.dynamics.bootstrap_fraction == 0.25


def test_overrides_types():
    cfg = load_config("tiny", ["tokenizer.transformer.width=48", "train_dynamics.lr=1e-3",
                               "train_dynamics.bf16=true", "collect.env=CartPole-v1",
                               "train_agent.betas=[0.8, 0.9]", "tokenizer.lpips_path=123"])
    assert cfg.tokenizer.transformer.width == 48
    assert cfg.train_dynamics.lr == pytest.approx(1e-3)
    assert cfg.train_dynamics.bf16 is True
    assert cfg.collect.env == "CartPole-v1"
    assert cfg.train_agent.betas == (0.8, 0.9)
    assert cfg.tokenizer.lpips_path == "123"  # a str field keeps the raw text


def test_int_field_accepts_no_float_and_float_accepts_int():
    cfg = load_config(None, ["train_tokenizer.lr=1"])
    assert isinstance(cfg.train_tokenizer.lr, float)
    with pytest.raises(ConfigError, match="train_tokenizer.steps"):
        load_config(None, ["train_tokenizer.steps=1.5"])


@pytest.mark.parametrize("override,key", [
    ("tokenizer.widht=3", "tokenizer.widht"),
    ("nosuch=1", "nosuch"),
    ("tokenizer.transformer.depth=deep", "tokenizer.transformer.depth"),
    ("train_agent.bf16=3", "train_agent.bf16"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["tokenizer.width"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dynamics:\n  registerz: 3\n")
    with pytest.raises(ConfigError, match=r"dynamics\.registerz"):
        load_config(p)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_save_and_read_roundtrip(tmp_path):
    cfg = load_config("small", ["dynamics.k_max=32"])
    save_config(cfg, tmp_path / "config.json")
    back = read_config(tmp_path / "config.json")
    assert to_dict(back) == to_dict(cfg)
    assert json.loads((tmp_path / "config.json").read_text())["dynamics"]["k_max"] == 32


def test_all_presets_are_listed():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} >= {"tiny", "small", "base"}
    assert isinstance(Config(), Config)


def _same_as_default(data: dict, default, prefix: str = "") -> list[str]:
    """Dotted keys of a preset mapping whose value equals the default it would replace."""
    import dataclasses

    same = []
    for k, v in data.items():
        cur = getattr(default, k)
        if dataclasses.is_dataclass(cur):
            same += _same_as_default(v, cur, f"{prefix}{k}.")
        elif k != "preset" and (list(cur) if isinstance(cur, tuple) else cur) == v:
            same.append(prefix + k)
    return same


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_state_only_what_differs(preset):
    """A preset lists only the fields it changes, so reading it shows what makes it that preset."""
    import yaml

    data = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    assert _same_as_default(data, Config()) == []


def test_configs_are_frozen_and_derived_not_mutated():
    import dataclasses

    from worldflow.config import derive

    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.size = 32  # type: ignore[misc]
    new = derive(cfg, **{"data.size": 32, "train_bc.steps": 7, "device": "cuda"})
    assert (new.data.size, new.train_bc.steps, new.device) == (32, 7, "cuda")
    assert (cfg.data.size, cfg.train_bc.steps, cfg.device) == (16, 20, "cpu")  # the original is unchanged
    assert new.data.clip_len == cfg.data.clip_len and new.tokenizer is cfg.tokenizer


def test_old_run_configs_with_sentinels_are_upgraded(tmp_path):
    """config.json of a run written before the '0 = inherit' sentinels were removed still loads."""
    old = to_dict(load_config("tiny"))
    old["tokenizer"]["clip_len"] = 0  # meant data.clip_len
    old["agent"]["imag_steps"] = 0  # meant dynamics.steps
    for phase in ("train_tokenizer", "train_dynamics", "train_agent"):
        old[phase].pop("head_lr_scale")
        old[phase]["head_lr"] = 0.0  # meant lr
    old["train_bc"].pop("head_lr_scale")
    old["train_bc"]["head_lr"] = 4 * old["train_bc"]["lr"]
    old["agent"]["train_backbone"] = False  # removed later: it had no effect
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = read_config(tmp_path / "config.json")
    assert cfg.tokenizer.clip_len == cfg.data.clip_len == 6
    assert cfg.agent.imag_steps == cfg.dynamics.steps == 2
    assert cfg.train_agent.head_lr_scale == 1.0
    assert cfg.train_bc.head_lr_scale == pytest.approx(4.0)


def test_a_replaced_key_names_its_replacement():
    with pytest.raises(ConfigError, match="train_bc.head_lr' was replaced by head_lr_scale"):
        load_config("tiny", ["train_bc.head_lr=1e-3"])
    with pytest.raises(ConfigError, match="data.cross_episode' was removed"):
        load_config("tiny", ["data.cross_episode=true"])
    with pytest.raises(ConfigError, match="agent.train_backbone' was removed: it did nothing"):
        load_config("tiny", ["agent.train_backbone=true"])
