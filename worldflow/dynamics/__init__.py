"""The dynamics model: action tokens, the transformer over latents, its objective and streaming rollout.

Read in this order: :mod:`~worldflow.dynamics.actions` (how actions become tokens and align to frames),
:mod:`~worldflow.dynamics.model` (the token layout and forward), :mod:`~worldflow.dynamics.loss` (shortcut
forcing on clips), :mod:`~worldflow.dynamics.rollout` (generation with a bounded KV cache).
"""

from worldflow.dynamics.actions import ActionEncoder, Actions, shift_actions
from worldflow.dynamics.loss import dynamics_loss
from worldflow.dynamics.model import DynamicsModel
from worldflow.dynamics.rollout import RolloutStream, rollout

__all__ = ["ActionEncoder", "Actions", "DynamicsModel", "RolloutStream", "dynamics_loss", "rollout",
           "shift_actions"]
