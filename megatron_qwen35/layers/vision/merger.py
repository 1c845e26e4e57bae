"""The vision tower's patch merger: transformers' `Qwen3_5VisionPatchMerger` with megatron's parallel linears.

LayerNorm over each patch (H), then each m x m block of consecutive patches (the processor's merge-block order)
joined into one row of m*m*H, fc1 (column parallel, m*m*H -> m*m*H) -> GELU (erf, transformers' nn.GELU()) ->
fc2 (row parallel, m*m*H -> the text model's hidden size). The norm runs per patch, before the join, so it cannot be
fused into fc1 the way a block's norms are: it is a standalone norm (TE's `TENorm` on GPUs).
Megatron names follow Megatron-Bridge's Qwen3-VL: `patch_norm`, `linear_fc1`, `linear_fc2`.
Shapes: N patches, H hidden, m spatial merge size, D out_hidden_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.layers.vision.transformer_config import LAYERNORM_EPS


class Qwen35VisionPatchMerger(MegatronModule):
    """forward(hidden [N, H]) -> [N / m**2, D], the same on every tensor-parallel rank."""

    def __init__(self, vision: Qwen35VisionConfig, config: TransformerConfig, provider: BackendSpecProvider, *,
                 tp_group):
        super().__init__(config=config)
        width = vision.hidden_size * vision.spatial_merge_size ** 2
        self.width = width
        self.patch_norm = provider.layer_norm(rms_norm=False, for_qk=False)(
            config=config, hidden_size=vision.hidden_size, eps=LAYERNORM_EPS)
        self.linear_fc1 = provider.column_parallel_linear()(
            width, width, config=config, init_method=config.init_method, gather_output=False, bias=True,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=tp_group)
        self.linear_fc2 = provider.row_parallel_linear()(
            width, vision.out_hidden_size, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=tp_group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        joined = self.patch_norm(hidden).view(-1, 1, self.width)  # [N, H] -> [N / m**2, 1, m*m*H]
        x, _ = self.linear_fc1(joined)  # [N / m**2, 1, m*m*H / tp]
        x, _ = self.linear_fc2(F.gelu(x))  # all-reduced over TP: [N / m**2, 1, D]
        return x.squeeze(1)
