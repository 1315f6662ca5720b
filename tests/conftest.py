"""Shared fixtures: a tiny dataset and a tiny fully-trained run, built once per test session.

Everything is made here from the built-in Catch game at 16x16 with the tiny preset: no downloads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = ["data.size=16", "collect.episodes=8"]

# Tiny models gain nothing from intra-op threads; on a busy 2-core machine extra threads only spin
# (measured 10-25x slower steps). One thread for the whole test session.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from worldflow.data.collect import collect

    out = tmp_path_factory.mktemp("data") / "catch16"
    collect("worldflow/Catch-v0", 6, out, policy="epsilon-expert", size=16, seed=0, progress=False,
            env_kwargs={"num_balls": 4})
    collect("worldflow/Catch-v0", 2, out, policy="random", size=16, seed=100, progress=False,
            env_kwargs={"num_balls": 4})
    return out


@pytest.fixture(scope="session")
def tiny_cfg():
    from worldflow.config import load_config

    return lambda *extra: load_config("tiny", [*TINY, *extra])


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tiny_cfg, tmp_path_factory) -> Path:
    """A run with every phase trained for a few steps: tokenizer, dynamics, agent_bc, agent."""
    from worldflow.train import agent as train_agent
    from worldflow.train import dynamics as train_dynamics
    from worldflow.train import tokenizer as train_tokenizer

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_tokenizer.train(tiny_cfg(), tiny_data, run, progress=False)
    train_dynamics.train(tiny_cfg(), tiny_data, run, progress=False)
    train_agent.train_offline(tiny_cfg(), tiny_data, run, progress=False)
    return run
