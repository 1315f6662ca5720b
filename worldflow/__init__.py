"""worldflow: a world-model video library.

Causal latent video tokenizer + causal dynamics transformer trained with x-prediction shortcut forcing,
agents trained by behaviour cloning then RL in imagination, and the world model as a gymnasium env.
"""

__version__ = "0.1.0"

# The main classes, imported on first use (PEP 562), so `import worldflow` does not import torch.
_EXPORTS = {
    "Config": "worldflow.config", "load_config": "worldflow.config",
    "CausalTokenizer": "worldflow.tokenizer.model",
    "DynamicsModel": "worldflow.dynamics.model", "RolloutStream": "worldflow.dynamics.rollout",
    "AgentModel": "worldflow.agent.model",
    "Run": "worldflow.run", "WorldModel": "worldflow.run",
    "WorldModelEnv": "worldflow.gym_env.env", "WorldModelVectorEnv": "worldflow.gym_env.env",
    "WorldflowError": "worldflow.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'worldflow' has no attribute {name!r}")

# Importing worldflow registers its gymnasium ids (worldflow/Catch-v0, worldflow/WorldModel-v0), so
# gymnasium.make works after `import worldflow`. gymnasium 1.x has no plugin entry points; without any
# import, gymnasium.make("worldflow.envs:worldflow/Catch-v0") imports the module itself.
from worldflow import envs as _envs  # noqa: E402,F401
