"""The vision tower's patch embedding: transformers' `Qwen3_5VisionPatchEmbed`, replicated over tensor parallelism.

Each row of pixel_values is one patch as the processor flattens it, C x T x P x P (channels, frames, height, width);
a Conv3d whose stride equals its kernel maps each to one H-vector. Kept a Conv3d (not a linear on the flat row) so
the parameter has transformers' shape [H, C, T, P, P] and converts by name. Shapes: N patches, H hidden.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_qwen35.config import Qwen35VisionConfig


class Qwen35VisionPatchEmbed(nn.Module):
    """forward(pixel_values [N, C*T*P*P]) -> [N, H]."""

    def __init__(self, vision: Qwen35VisionConfig, config: TransformerConfig):
        super().__init__()
        self.patch_shape = (vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        kernel = self.patch_shape[1:]
        self.proj = nn.Conv3d(vision.in_channels, vision.hidden_size, kernel_size=kernel, stride=kernel, bias=True,
                              dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = pixel_values.view(-1, *self.patch_shape).to(self.proj.weight.dtype)  # [N, C, T, P, P]
        return self.proj(patches).view(patches.shape[0], -1)  # [N, H, 1, 1, 1] -> [N, H]
