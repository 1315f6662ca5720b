"""Behaviour policies for collecting episodes: random, a scripted expert, and an epsilon-mix of the two.

A policy is a plain callable ``policy(obs) -> action``. Expert policies ignore the observation and ask
the environment for ``env.unwrapped.expert_action()``, which reads the true game state (for envs
worldflow does not own, such as gymnasium's CartPole, a controller in :data:`EXTERNAL_EXPERTS` reads
it); that is only meaningful while ``policy`` is called on the env's *current* observation (the usual
collection loop).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np

from worldflow.errors import InputError

POLICY_KINDS = ("random", "expert", "epsilon-expert")

Policy = Callable[[Any], Any]


def make_policy(kind: str, env: gymnasium.Env, epsilon: float = 0.3, seed: int | None = None) -> Policy:
    """Build a policy ``obs -> action`` for ``env``.

    Args:
        kind: ``"random"`` (uniform over the action space), ``"expert"`` (``env.unwrapped.expert_action()``)
            or ``"epsilon-expert"`` (a uniform random action with probability ``epsilon``, else the expert).
        env: the environment the policy acts in (possibly wrapped).
        epsilon: exploration rate in [0, 1] for ``"epsilon-expert"``; ignored by the other kinds.
        seed: seeds the policy's own RNG, so action choice is reproducible independently of the env.

    Raises:
        ValueError: unknown ``kind``, ``epsilon`` outside [0, 1], or an expert kind for an env without
            ``expert_action()``.
    """
    if kind not in POLICY_KINDS:
        raise InputError(f"unknown policy kind {kind!r}; expected one of {', '.join(POLICY_KINDS)}")
    if kind == "random":
        return _random_policy(env, seed)
    expert = _expert_fn(env)
    if kind == "expert":
        return lambda obs: expert()
    if not 0.0 <= epsilon <= 1.0:
        raise InputError(f"epsilon must be in [0, 1], got {epsilon}")
    return _epsilon_policy(env, expert, epsilon, seed)


def _random_policy(env: gymnasium.Env, seed: int | None) -> Policy:
    # A private copy of the space: seeding it must not disturb anyone else sampling env.action_space.
    space = copy.deepcopy(env.action_space)
    space.seed(seed)
    return lambda obs: space.sample()


def _cartpole_expert(env: gymnasium.Env) -> Callable[[], int]:
    """Gymnasium's CartPole from its true state (x, ẋ, θ, θ̇): push right when 0.1·x + 0.5·ẋ + 10·θ + 2·θ̇
    > 0, a linear state-feedback law (pole angle and angular velocity for balance, cart position and
    velocity to stay on the track). It holds the pole for the full 500 steps of CartPole-v1 from every
    seed tried (tests/test_envs.py)."""

    def act() -> int:
        x, x_dot, theta, theta_dot = (float(v) for v in env.unwrapped.state)
        return int(0.1 * x + 0.5 * x_dot + 10.0 * theta + 2.0 * theta_dot > 0)

    return act


# Scripted experts for envs worldflow does not own, by the unwrapped env's class (module.qualname).
EXTERNAL_EXPERTS: dict[str, Callable[[gymnasium.Env], Callable[[], Any]]] = {
    "gymnasium.envs.classic_control.cartpole.CartPoleEnv": _cartpole_expert,
}


def _expert_fn(env: gymnasium.Env) -> Callable[[], Any]:
    expert = getattr(env.unwrapped, "expert_action", None)
    cls = type(env.unwrapped)
    external = EXTERNAL_EXPERTS.get(f"{cls.__module__}.{cls.__qualname__}")
    if not callable(expert) and external is not None:
        expert = external(env)
    if not callable(expert):
        raise InputError(
            f"environment {_env_name(env)} has no scripted expert (env.unwrapped.expert_action()); "
            f"use policy kind 'random' or an env that provides one, e.g. worldflow/Catch-v0 or CartPole-v1"
        )
    return expert


def _epsilon_policy(
    env: gymnasium.Env, expert: Callable[[], Any], epsilon: float, seed: int | None
) -> Policy:
    rng = np.random.default_rng(seed)
    explore = _random_policy(env, None if seed is None else int(rng.integers(2**31)))

    def policy(obs: Any) -> Any:
        return explore(obs) if rng.random() < epsilon else expert()

    return policy


def _env_name(env: gymnasium.Env) -> str:
    spec = env.spec
    return repr(spec.id) if spec is not None else type(env.unwrapped).__name__
