"""Data-parallel training under torchrun (worldflow.distributed, the Trainer): two CPU processes (gloo)
reproduce a single-process run, and their checkpoints are single-process checkpoints.

Unit tests of the row split run in-process; the end-to-end test launches
``python -m torch.distributed.run --nproc_per_node=2 --standalone -m worldflow.cli.app -- train dynamics``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from worldflow import distributed
from worldflow.checkpoint import load_weights, read_state
from worldflow.config import ConfigError, load_config
from worldflow.distributed import Rows, batch_rows, rows_of, split_rows, take_rows
from worldflow.dynamics import DynamicsModel, dynamics_loss

COMMON = ["--config", "tiny", "data.size=16", "train_dynamics.log_every=1", "train_dynamics.eval_every=0",
          "train_dynamics.ckpt_every=3", "train_dynamics.max_minutes=30",  # a budget: its stop flag is
          # agreed every step by all-reduce, without ever stopping these runs
          "train_dynamics.bf16=false"]  # fp32 on every CPU kind: the 1e-5 match of one process and two is a
# float32 tolerance (bf16 autocast, which "auto" picks on CPUs with native bf16, rounds the row-split sums
# differently: 0.0970356 vs 0.0970291 at step 2)


# ---------------------------------------------------------------------------------------------------
# The row split, in one process


def test_split_and_take_rows():
    assert [split_rows(8, r, 4) for r in range(4)] == [Rows(0, 2, 8), Rows(2, 4, 8), Rows(4, 6, 8),
                                                       Rows(6, 8, 8)]
    with pytest.raises(ConfigError, match="multiple of 3"):
        split_rows(8, 0, 3)

    @dataclasses.dataclass
    class Batch:
        h: torch.Tensor
        extra: dict

    b = Batch(torch.arange(8.0).reshape(4, 2), {"a": (torch.arange(4), torch.zeros(3)), "k": 5})
    out = take_rows(b, Rows(2, 4, 4))
    assert out.h.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert out.extra["a"][0].tolist() == [2, 3] and out.extra["a"][1].shape == (3,) and out.extra["k"] == 5
    assert distributed.batch_size(b) == 4


def test_rows_of_only_inside_batch_rows():
    assert rows_of(3) == Rows(0, 3, 3)
    with batch_rows(Rows(2, 4, 6)):
        assert rows_of(2) == Rows(2, 4, 6)
        assert rows_of(5) == Rows(0, 5, 5)  # another batch size: not the split batch
    assert rows_of(2) == Rows(0, 2, 2)
    r = Rows(2, 4, 6)
    assert r.within(0, 3) == Rows(2, 3, 3) and r.within(3, 6) == Rows(0, 1, 3) and r.within(4, 6).count == 0
    assert r.repeat(3) == Rows(6, 12, 18)


def test_dynamics_loss_row_slices_average_to_the_global_gradient():
    """Three "ranks" of 2 rows each, with the same-seeded generator: their losses average to the global
    loss and their gradients to the global gradient (rank 1 and 2 hold no single-frame items, so the
    empty-part path runs too); every slice leaves the generator where the global batch does."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = DynamicsModel(cfg.dynamics, 4, 8, gym.spaces.Discrete(3))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(6, 6, 4, 8, generator=g).tanh()
    acts = torch.randint(0, 3, (6, 6), generator=g)
    mask = torch.ones(6, 6, dtype=torch.bool)

    def run(sl: slice, rows: Rows | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        gen = torch.Generator().manual_seed(1)
        with batch_rows(rows) if rows is not None else nullcontext():
            loss, _ = dynamics_loss(model, lat[sl], acts[sl], mask[sl], cfg.dynamics, gen)
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        return loss.detach(), grads, gen.get_state()

    ref_loss, ref_grads, ref_state = run(slice(None), None)
    parts = [run(slice(2 * r, 2 * r + 2), Rows(2 * r, 2 * r + 2, 6)) for r in range(3)]
    torch.testing.assert_close(sum(p[0] for p in parts) / 3, ref_loss, rtol=1e-6, atol=0)
    for i, ref in enumerate(ref_grads):
        torch.testing.assert_close(sum(p[1][i] for p in parts) / 3, ref, rtol=1e-5, atol=1e-8)
    assert all(torch.equal(p[2], ref_state) for p in parts)


# ---------------------------------------------------------------------------------------------------
# torchrun, two processes


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "dynamics" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: only rank 0 may write logs"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _torchrun(data: Path, run: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "worldflow.cli", "--",  # "--": torchrun would read --run as its own --run-path
           "train", "dynamics", "--data", str(data), "--run", str(run), "--no-progress", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("dynamics: step") == 1, "only rank 0 prints"


def test_torchrun_two_processes_match_one(tiny_data, tiny_cfg, tmp_path):
    """Two gloo processes train the tiny dynamics model on the same global batch (4) as one process.

    Every process draws the global batch, and the loss draws (single-frame split, τ, d, noise) for it,
    from the same-seeded generator and keeps its rows, so the computation is the single-process one split
    by rows. It is not bit-exact: each process averages its own rows and the gradient all-reduce then
    averages the processes, which rounds differently from one float32 mean over the whole batch (~1e-8
    relative on the loss). Losses must agree to rtol 1e-5 over 6 steps: any difference in the random draws,
    the batch or the gradient would be orders of magnitude larger (losses move by ~1e-2 per step).

    Steps 1-3 run under DDP from scratch; steps 4-6 resume that checkpoint under FSDP2 with activation
    checkpointing (a sharded run restoring a DDP checkpoint), and its final checkpoint loads strictly into
    a plain single-process model and equals the single-process weights.
    """
    from worldflow.dynamics.model import build_dynamics
    from worldflow.run import action_space_of
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    base = tmp_path / "tok"
    train_tokenizer.train(tiny_cfg("train_tokenizer.steps=2", "train_tokenizer.eval_every=0"), tiny_data,
                          base, progress=False)
    single, multi = tmp_path / "single", tmp_path / "multi"
    for run in (single, multi):
        shutil.copytree(base, run)

    cfg = load_config("tiny", [*COMMON[2:], "train_dynamics.steps=6"])
    train_dynamics.train(cfg, tiny_data, single, progress=False)
    ref = _losses(single)

    _torchrun(tiny_data, multi, "train_dynamics.steps=3")
    assert sorted(_losses(multi)) == [1, 2, 3]
    _torchrun(tiny_data, multi, "train_dynamics.steps=6", "train_dynamics.fsdp=true",
              "train_dynamics.activation_checkpointing=true")
    got = _losses(multi)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-7), (step, got[step], ref[step])

    ckpt = lambda run: run / "dynamics" / "checkpoints" / "step_00000006"
    model = build_dynamics(cfg, action_space_of(tiny_data))
    load_weights(model, ckpt(multi))  # strict: the names and shapes of an unwrapped module
    want = build_dynamics(cfg, action_space_of(tiny_data))
    load_weights(want, ckpt(single))
    for (name, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    state, ref_state = read_state(ckpt(multi)), read_state(ckpt(single))
    assert state["optimizer"]["param_groups"] == ref_state["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == ref_state["optimizer"]["state"].keys()
    assert torch.equal(state["extra"]["gen"], ref_state["extra"]["gen"])  # the same batches were drawn
