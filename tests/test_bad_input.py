"""Bad input through the public CLI: one line, ``worldflow: error: <message>``, exit 2, no traceback.

Each case is a row of the table in docs/troubleshooting.md ("Bad input: the one-line errors").
"""

from __future__ import annotations

import pytest

from worldflow.cli import main


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI on ``argv``; assert it failed as a user error; return the one error line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("worldflow: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_dataset(capsys, tmp_path):
    line = cli_error(capsys, ["train", "tokenizer", "--config", "tiny", "--data", str(tmp_path / "nope"),
                              "--run", str(tmp_path / "r"), "--no-progress"])
    assert "does not exist; create one with `worldflow collect" in line


def test_unknown_config_key(capsys, tiny_data, tmp_path):
    line = cli_error(capsys, ["train", "tokenizer", "--config", "tiny", "--data", str(tiny_data),
                              "--run", str(tmp_path / "r"), "tokenizer.nosuch=1"])
    assert "unknown config key 'tokenizer.nosuch'" in line


def test_eval_context_longer_than_trained(capsys, tiny_run, tiny_data, tmp_path):
    line = cli_error(capsys, ["eval", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "99",
                              "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert "--context 99 exceeds the context the model was trained for" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from worldflow.data.episodes import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError):
        main(["train", "tokenizer", "--config", "tiny", "--data", str(tmp_path / "nope"),
              "--run", str(tmp_path / "r"), "--no-progress", "--debug"])
    monkeypatch.setenv("WORLDFLOW_DEBUG", "1")
    with pytest.raises(DatasetNotFoundError):
        main(["train", "tokenizer", "--config", "tiny", "--data", str(tmp_path / "nope"),
              "--run", str(tmp_path / "r"), "--no-progress"])


def test_a_bug_keeps_its_traceback_and_says_so(capsys, monkeypatch, tmp_path):
    from worldflow.cli import app

    def broken(args):
        raise ZeroDivisionError("an internal invariant broke")

    parser = app.build_parser()
    monkeypatch.setattr(app, "build_parser", lambda: parser)
    args = parser.parse_args(["config", "show", "--config", "tiny"])
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)
    args.func = broken
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "this is a bug in worldflow" in err
