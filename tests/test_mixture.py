"""Several datasets drawn as one (worldflow.data.mixture) and action-free training (imported videos)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldflow.cli.app import main
from worldflow.config import load_config
from worldflow.data.clips import ClipBank, episode_tensors
from worldflow.data.episodes import DatasetWriter, Episode
from worldflow.data.mixture import MixedClips, mixture_space
from worldflow.errors import DataMismatchError

BOX = {"type": "Box", "shape": [2], "dtype": "float32", "low": [-1.0, -1.0], "high": [1.0, 1.0]}


def _bank(lengths, first_id=0, box=True, value=0.0) -> ClipBank:
    eps = []
    for i, n in enumerate(lengths):
        frames = np.full((n, 4, 4, 3), (first_id + i) % 256, np.uint8)
        acts = np.full((n - 1, 2), value, np.float32) if box else None
        rew = np.arange(n - 1, dtype=np.float32) if box else None
        eps.append(episode_tensors(Episode(frames, acts, rew, np.zeros(n - 1, bool), np.zeros(n - 1, bool))))
    return ClipBank(eps, ids=list(range(first_id, first_id + len(lengths))))


def test_one_part_gives_exactly_its_own_batches():
    bank = _bank([9, 14, 30])
    mixed = MixedClips([bank])
    a = bank.sample(8, 5, torch.Generator().manual_seed(3))
    b = mixed.sample(8, 5, torch.Generator().manual_seed(3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unweighted_mix_draws_as_one_dataset_of_all_episodes():
    """data.mix=[] weighs every window equally: the same rows, from the same generator, as one bank
    holding both datasets' episodes."""
    a, b = _bank([9, 14], first_id=0), _bank([30, 6, 11], first_id=2)
    mixed = MixedClips([a, b])
    whole = ClipBank(a.episodes + b.episodes, ids=a.ids + b.ids)
    for seed in range(3):
        m = mixed.sample(16, 5, torch.Generator().manual_seed(seed))
        w = whole.sample(16, 5, torch.Generator().manual_seed(seed))
        for k in ("frames", "actions", "action_mask", "rewards", "start", "episode"):
            assert torch.equal(m[k], w[k]), k
        assert m["dataset"].tolist() == [0 if e < 2 else 1 for e in w["episode"].tolist()]


def test_weighted_mix_gives_each_dataset_its_share():
    a, b = _bank([40], first_id=0), _bank([40] * 20, first_id=1)  # b has 20x the windows of a
    only_a = MixedClips([a, b], weights=[1.0, 0.0]).sample(64, 5, torch.Generator())
    assert set(only_a["dataset"].tolist()) == {0}
    rows = MixedClips([a, b], weights=[3.0, 1.0]).sample(4000, 5, torch.Generator().manual_seed(0))
    share = float((rows["dataset"] == 0).float().mean())
    assert abs(share - 0.75) < 0.03  # 3:1 by weight, not 1:20 by size


def test_action_free_rows_get_placeholder_actions_of_the_labelled_space():
    labelled, free = _bank([12], box=True, value=0.5), _bank([12, 12], first_id=1, box=False)
    mixed = MixedClips([labelled, free], labelled=[True, False], space=BOX)
    b = mixed.sample(32, 6, torch.Generator().manual_seed(1))
    assert b["actions"].shape == (32, 6, 2) and b["actions"].dtype == torch.float32
    from_free = b["dataset"] == 1
    assert from_free.any() and (~from_free).any()
    assert not b["action_mask"][from_free].any() and torch.all(b["actions"][from_free] == 0)
    assert torch.all(b["actions"][~from_free][b["action_mask"][~from_free]] == 0.5)


def _dataset(root, space, n_eps=3, frames=12, size=16, fps=10):
    w = DatasetWriter(root, None if space is None else "test", space, fps=fps)
    rng = np.random.default_rng(0)
    for _ in range(n_eps):
        f = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
        t = frames - 1
        acts = None if space is None else rng.integers(0, 3, t)
        rew = None if space is None else np.zeros(t, np.float32)
        w.add_episode(f, acts, rew, np.zeros(t, bool), np.arange(t) == t - 1)
    return root


DISCRETE = {"type": "Discrete", "n": 3, "start": 0}


def test_mixture_checks_name_the_problem(tmp_path):
    cfg = load_config("tiny", ["data.size=16"])
    a = _dataset(tmp_path / "a", DISCRETE)
    free = _dataset(tmp_path / "free", None)
    other = _dataset(tmp_path / "other", {"type": "Discrete", "n": 5, "start": 0})
    big = _dataset(tmp_path / "big", None, size=24)
    assert mixture_space([a, free], cfg) == DISCRETE
    assert mixture_space([free], cfg) is None
    with pytest.raises(DataMismatchError, match="different frame shapes"):
        mixture_space([a, big], cfg)
    with pytest.raises(DataMismatchError, match="different action spaces"):
        mixture_space([a, other], cfg)
    with pytest.raises(DataMismatchError, match="2 --data datasets"):
        mixture_space([a, free], load_config("tiny", ["data.mix=[1, 2, 3]"]))
    with pytest.raises(DataMismatchError, match="data.allow_action_free=true"):
        mixture_space([a, free], load_config("tiny", ["data.allow_action_free=false"]))


TINY_TRAIN = ["--config", "tiny", "--no-progress", "data.size=16", "data.clip_len=4",
              "tokenizer.clip_len=4", "tokenizer.context=4", "dynamics.long_every=0",
              "train_tokenizer.steps=4", "train_dynamics.steps=4", "train_tokenizer.eval_every=4",
              "train_dynamics.eval_every=4",
              "train_tokenizer.ckpt_every=4", "train_dynamics.ckpt_every=4", "train_bc.steps=2"]


def test_action_free_and_mixed_training_end_to_end(tmp_path, capsys):
    """An imported-video dataset trains the tokenizer and the dynamics model (unlabeled path); together
    with a labelled one the dynamics trains on both; the agent refuses action-free data by name."""
    free = _dataset(tmp_path / "videos", None, n_eps=4, frames=14)
    labelled = _dataset(tmp_path / "play", DISCRETE, n_eps=3, frames=14)
    run = tmp_path / "run"
    for phase in ("tokenizer", "dynamics"):
        assert main(["train", phase, "--data", str(free), "--run", str(run), *TINY_TRAIN]) == 0
    info = json.loads((run / "dataset.json").read_text())
    assert info["action_space"] is None and info["datasets"] == [str(free.resolve())]
    lines = [json.loads(x) for x in (run / "dynamics" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("loss", np.nan)) for r in lines)

    from worldflow.errors import InputError
    from worldflow.run import Run

    with pytest.raises(InputError, match="action-free video only.*rollout --run"):
        Run(run).world_model()  # nothing to act in: the error says what the run can do instead

    # an action-free dynamics model cannot be given actions later: the run's action space is bound
    capsys.readouterr()
    assert main(["train", "dynamics", "--data", str(labelled), "--run", str(run), *TINY_TRAIN]) == 2
    assert "has action space" in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    assert main(["train", "tokenizer", "--data", str(free), "--run", str(mixed), *TINY_TRAIN]) == 0
    assert main(["train", "dynamics", "--data", str(labelled), "--data", str(free), "--run", str(mixed),
                 *TINY_TRAIN, "data.mix=[0.5, 0.5]"]) == 0
    info = json.loads((mixed / "dataset.json").read_text())
    assert info["action_space"] == DISCRETE and info["data"] == str(labelled.resolve())
    assert info["datasets"] == [str(labelled.resolve()), str(free.resolve())]
    capsys.readouterr()
    assert main(["train", "agent", "--phase", "bc", "--data", str(labelled), "--data", str(free),
                 "--run", str(mixed), *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert "is action-free" in err and "only action-labelled --data" in err and len(err.splitlines()) == 1
