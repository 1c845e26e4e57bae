"""The vision tower's axial 2-D rope, as the rotation angles megatron's `apply_rotary_pos_emb` takes.

transformers' `Qwen3_5VisionRotaryEmbedding`: d/4 frequencies theta^(-2i / (d/2)); a patch's angles are
[row * f | col * f] (d/2), repeated twice to cover the whole head (rotate-half pairs dim i with i + d/2), so the
first half of each half-head turns with the row and the second with the column. No partial rotation.
megatron's rope takes the angles as freqs [N, 1, 1, d] and computes cos / sin itself; under a THD batch whose freqs
cover every token (N == cu_seqlens[-1]) it reads them token by token, so each patch gets its own angles.
Shapes: N patches, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn


class Qwen35VisionRotaryEmbedding(nn.Module):
    """forward(rows, cols) -> freqs [N, 1, 1, d] (fp32)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"vision head dim {head_dim} must be a multiple of 4 (a quarter each for rows and "
                             "columns, twice for rotate-half)")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # computed here rather than kept as a buffer: megatron's Float16Module casts float buffers to bf16
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, half, 2, dtype=torch.float, device=rows.device) / half))
        angles = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)  # [N, d/2]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
