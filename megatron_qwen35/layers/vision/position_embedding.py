"""The learned absolute position table of the vision tower, resampled to each image's patch grid.

The table is a square side x side grid of vectors (transformers' `pos_embed`, an nn.Embedding of side**2 rows).
Each patch takes the bilinear interpolation of the table at its place, with align_corners=True (the grid's first and
last rows and columns land on the table's), exactly as transformers' `get_vision_interpolation_indices_and_weights`
(mode "bilinear", border padding): four taps per patch, weights computed in fp32, summed in the same order.
Shapes: N patches, H hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.layers.vision.grid import PatchPositions


class Qwen35VisionPositionEmbedding(nn.Module):
    """`weight` [side**2, H], replicated over tensor parallelism; forward(positions) -> [N, H] (the table's dtype
    promoted with the fp32 weights, as in transformers; the caller casts)."""

    def __init__(self, vision: Qwen35VisionConfig, config: TransformerConfig):
        super().__init__()
        self.side = math.isqrt(vision.num_position_embeddings)
        self.weight = nn.Parameter(torch.empty(vision.num_position_embeddings, vision.hidden_size,
                                               dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, positions: PatchPositions) -> torch.Tensor:
        row_taps, row_weights = _axis_taps(positions.rows, positions.heights, self.side)  # [N, 2] each
        col_taps, col_weights = _axis_taps(positions.cols, positions.widths, self.side)
        taps = (row_taps[:, :, None] * self.side + col_taps[:, None, :]).reshape(-1, 4)  # rows of the flat table
        weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
        return (F.embedding(taps, self.weight) * weights[:, :, None]).sum(1)  # [N, 4, H] -> [N, H]

    def extra_repr(self) -> str:
        return f"{self.side} x {self.side} table, {self.weight.shape[1]} wide"


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: the two table indices around each patch's source point and their linear weights, [N, 2]."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)  # align_corners; a 1-long axis -> 0
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)  # the last point's second tap falls on the border
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights
