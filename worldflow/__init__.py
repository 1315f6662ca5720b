"""worldflow: a world-model video library.

Causal latent video tokenizer + causal dynamics transformer trained with x-prediction shortcut forcing,
agents trained by behaviour cloning then RL in imagination, and the world model as a gymnasium env.
"""

__version__ = "0.1.0"

# Importing worldflow registers its gymnasium ids (worldflow/Catch-v0, worldflow/WorldModel-v0), so
# gymnasium.make works after `import worldflow`. gymnasium 1.x has no plugin entry points; without any
# import, gymnasium.make("worldflow.envs:worldflow/Catch-v0") imports the module itself.
from worldflow import envs as _envs  # noqa: E402,F401
