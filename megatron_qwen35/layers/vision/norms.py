"""LayerNorm (weight and bias) for the vision tower on the local backend, in Transformer Engine's checkpoint layout.

The tower's norms are transformers' nn.LayerNorm(eps=1e-6). On GPUs Transformer Engine fuses a block's two norms
into the linears after them (`TELayerNormColumnParallelLinear`) and the merger's norm is a standalone `TENorm`; the
local backend uses torch's LayerNorm and saves the same keys, as `norms.py` does for the text model's RMSNorm:
`Qwen35VisionLayerNorm` (standalone) saves TE's `_extra_state` (None), `Qwen35VisionFusedInputLayerNorm` (a slot TE
fuses) saves none, and the layer's `sharded_state_dict_keys_map` names its weight and bias after the linear.
"""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_qwen35.layers.norms import Qwen35RMSNorm


class Qwen35VisionLayerNorm(nn.LayerNorm):
    """torch's LayerNorm with megatron's norm-builder signature (config, hidden_size, eps), in params_dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)

    # TE's standalone norm saves an `_extra_state` and asks for one on load; see Qwen35RMSNorm
    get_extra_state = Qwen35RMSNorm.get_extra_state
    set_extra_state = Qwen35RMSNorm.set_extra_state


class Qwen35VisionFusedInputLayerNorm(Qwen35VisionLayerNorm):
    """Qwen35VisionLayerNorm in a slot that Transformer Engine fuses into the next linear: saves no `_extra_state`
    (the fused module's one is the linear's; see Qwen35FusedInputRMSNorm)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state
