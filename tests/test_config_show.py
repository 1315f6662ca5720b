"""`worldflow config show`: every field of the resolved config is printed, each with a one-line doc."""

from __future__ import annotations

import dataclasses

from worldflow.cli import main
from worldflow.cli.config import rows
from worldflow.config import load_config


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        yield from _leaves(v, prefix + f.name + ".") if dataclasses.is_dataclass(v) else [prefix + f.name]


def test_every_field_has_a_doc():
    cfg = load_config("small")
    table = rows(cfg)
    assert [k for k, _, _ in table] == list(_leaves(cfg))
    assert [k for k, _, doc in table if not doc] == []


def test_config_show_prints_overrides(capsys):
    assert main(["config", "show", "--config", "small", "train_tokenizer.lr=0.002"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(x for x in out if x.startswith("train_tokenizer.lr = "))
    assert line.split("#")[0].strip() == "train_tokenizer.lr = 0.002" and "learning rate" in line
    assert any(x.startswith("data.size = 64 ") for x in out)
