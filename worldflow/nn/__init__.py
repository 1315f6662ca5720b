"""Transformer building blocks shared by the tokenizer and the dynamics model.

Everything here works on channel-last tensors. Attention tensors use the layout ``(batch, heads, length,
head_dim)`` of :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA).

Blocks (Dreamer 4's efficient transformer): pre-RMSNorm, SwiGLU MLP, rotary position embeddings (RoPE),
QK-norm, attention logit soft-capping and grouped-query attention (GQA). :class:`SpaceTimeTransformer` stacks
them into a factorised space/time transformer: spatial attention inside every frame in every layer, causal
temporal attention (per token position, sliding window) every ``temporal_every``-th layer, and a bounded
:class:`KVCache` so streaming one frame at a time equals a whole-sequence forward with the same window.

Mask convention everywhere: boolean, ``True`` = the query may attend the key (as in SDPA).
"""

from worldflow.nn.attention import Attention, attend, softcap_logits
from worldflow.nn.layers import RMSNorm, SwiGLU, apply_rope, rope_angles, rope_tables, rotate, swiglu_hidden
from worldflow.nn.transformer import KVCache, SpaceTimeBlock, SpaceTimeTransformer, temporal_mask

__all__ = [
    "RMSNorm",
    "SwiGLU",
    "swiglu_hidden",
    "rope_angles",
    "apply_rope",
    "rope_tables",
    "rotate",
    "softcap_logits",
    "attend",
    "Attention",
    "KVCache",
    "SpaceTimeBlock",
    "SpaceTimeTransformer",
    "temporal_mask",
]
