"""worldflow: a world-model video library.

Causal latent video tokenizer + causal dynamics transformer trained with x-prediction shortcut forcing,
agents trained by behaviour cloning then RL in imagination, and the world model as a gymnasium env.
"""

__version__ = "0.1.0"
