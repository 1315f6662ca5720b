"""Bad input through the public CLI: one line, ``worldflow: error: <message>``, exit 2, no traceback.

Each case is a row of the table in docs/troubleshooting.md ("Bad input: the one-line errors").
"""

from __future__ import annotations

import pytest

from worldflow.cli import main


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI on ``argv``; assert it failed as a user error; return the one error line."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects the command line while parsing it
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("worldflow")]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("worldflow: error: "), err
    assert "Traceback" not in err
    return lines[0]


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


def _train_tok(data, run, *extra):
    return ["train", "tokenizer", "--config", "tiny", "--data", str(data), "--run", str(run),
            "--no-progress", "data.size=16", *extra]


def test_preset_frame_size_differs_from_the_data(capsys, tiny_data, tmp_path):
    line = cli_error(capsys, _train_tok(tiny_data, tmp_path / "r", "data.size=32"))
    assert "has 16x16 frames but data.size is 32: pass data.size=16" in line
    assert not (tmp_path / "r").exists()  # nothing written before the check


def test_clips_longer_than_every_episode_name_their_key(capsys, tiny_data, tmp_path):
    line = cli_error(capsys, _train_tok(tiny_data, tmp_path / "r", "tokenizer.clip_len=5000"))
    assert "tokenizer.clip_len=5000 asks for 5000-frame clips but the longest training episode" in line
    assert "lower it" in line


def test_another_action_space_in_the_same_run(capsys, tiny_run, tmp_path):
    """Checked before the phase writes anything, so the (shared) run is left as it was."""
    from worldflow.data.collect import collect

    other = tmp_path / "cartpole"
    collect("worldflow/Catch-v0", 1, other, size=16, progress=False, max_steps=8)
    import json

    m = json.loads((other / "manifest.json").read_text())
    m["action_space"] = {"type": "Discrete", "n": 5, "start": 0}  # as if another game
    (other / "manifest.json").write_text(json.dumps(m))
    before = {p: p.read_bytes() for p in tiny_run.rglob("*.json")}
    line = cli_error(capsys, ["train", "dynamics", "--config", "tiny", "--data", str(other),
                              "--run", str(tiny_run), "--no-progress", "data.size=16", "dynamics.long_len=4"])
    assert "has action space" in line and "was trained on" in line and "new --run" in line
    assert {p: p.read_bytes() for p in tiny_run.rglob("*.json")} == before


@pytest.mark.parametrize("argv, message", [
    (["rollout", "--run", "r", "--data", "d", "--out", "o.mp4", "--horizon", "0"],
     "argument --horizon: must be at least 1, got 0"),
    (["rollout", "--run", "r", "--data", "d", "--out", "o.mp4", "--steps", "3"],
     "argument --steps: 3 is not a power of two"),
    (["eval", "--run", "r", "--horizons", "0,4"],
     "argument --horizons: expected comma-separated integers >= 1"),
    (["eval", "--run", "r", "--steps-sweep", "1,3"], "argument --steps-sweep: 3 is not a power of two"),
    (["collect", "--env", "worldflow/Catch-v0", "--episodes", "0", "--out", "d"],
     "argument --episodes: must be at least 1, got 0"),
    (["collect", "--env", "worldflow/Catch-v0", "--episodes", "2", "--out", "d", "--epsilon", "1.5"],
     "argument --epsilon: must be in [0, 1], got 1.5"),
    (["collect", "--env", "worldflow/Catch-v0", "--episodes", "two", "--out", "d"],
     "argument --episodes: 'two' is not a whole number"),
    (["train", "tokenizer", "--data", "d"], "the following arguments are required: --run"),
])
def test_bad_numbers_and_flags_name_their_flag(capsys, argv, message):
    line = cli_error(capsys, argv)
    assert message in line and line.endswith("--help)")


def test_steps_finer_than_the_model_was_trained_for(capsys, tiny_run, tiny_data, tmp_path):
    line = cli_error(capsys, ["rollout", "--run", str(tiny_run), "--data", str(tiny_data), "--context", "2",
                              "--horizon", "2", "--steps", "16", "--out", str(tmp_path / "o.mp4")])
    assert "--steps 16 is finer than the model was trained for (k_max = 8" in line


def test_rollout_video_start_past_its_end(capsys, tiny_run, tmp_path):
    import numpy as np

    from worldflow.data.video import write_video

    video = write_video(tmp_path / "short.mp4", np.zeros((10, 16, 16, 3), np.uint8), fps=15)
    line = cli_error(capsys, ["rollout", "--run", str(tiny_run), "--video", str(video), "--context", "2",
                              "--start", "50", "--steps", "1", "--out", str(tmp_path / "o.mp4")])
    assert "--start 50 + --context 2 needs 52 frames but" in line and "lower --start or --context" in line


@pytest.mark.parametrize("extra, message", [
    (["--config", "huge"], "unknown preset 'huge' (known: base, small, tiny)"),
    (["train_tokenizer.steps=ten"], "config key 'train_tokenizer.steps': expected int, got 'ten'"),
    (["data.on_corrupt=ignore"],
     "config key 'data.on_corrupt': expected one of ['error', 'skip'], got 'ignore'"),
    (["agent.bins=["], "override 'agent.bins=[': '[' is not a YAML value"),
    (["train_bc.head_lr=1e-3"], "config key 'train_bc.head_lr' was replaced by head_lr_scale"),
    (["data.cross_episode=true"], "config key 'data.cross_episode' was removed"),
    (["agent.train_backbone=true"], "config key 'agent.train_backbone' was removed: it did nothing"),
    (["dynamics.num_tasks=3"], "dynamics.num_tasks is 3, but worldflow datasets carry no task ids"),
])
def test_config_errors_are_one_line(capsys, tiny_data, tmp_path, extra, message):
    argv = ["train", "tokenizer", "--config", "tiny", "--data", str(tiny_data), "--run", str(tmp_path / "r"),
            "--no-progress", *extra]
    assert message in cli_error(capsys, argv)
    assert not (tmp_path / "r").exists()


def test_a_folder_that_is_not_a_dataset(capsys, tmp_path):
    line = cli_error(capsys, ["train", "tokenizer", "--config", "tiny", "--data", str(tmp_path),
                              "--run", str(tmp_path / "r")])
    assert "has no manifest.json; create one with `worldflow collect" in line


def test_unknown_env_id_suggests_close_ones(capsys, tmp_path):
    line = cli_error(capsys, ["collect", "--env", "CartPole-v9", "--episodes", "1",
                              "--out", str(tmp_path / "c")])
    assert "unknown environment id 'CartPole-v9'" in line and "did you mean 'CartPole-v1'" in line


def test_dynamics_before_the_tokenizer(capsys, tiny_data, tmp_path):
    line = cli_error(capsys, ["train", "dynamics", "--config", "tiny", "--data", str(tiny_data),
                              "--run", str(tmp_path / "fresh"), "--no-progress", "data.size=16"])
    assert "has no tokenizer checkpoint: run `worldflow train tokenizer" in line
