"""Qwen3.5's vision tower as megatron-core modules: transformers' `Qwen3_5VisionModel` (its `pooler_output`).

    pixel_values [N, C*T*P*P] --patch_embed--> [N, H] + position table resampled to each grid
    --decoder (depth TransformerLayers, 2-D rope, attention within each frame)--> [N, H]
    --merger (m x m patches -> one token)--> [N / m**2, D]

What differs from transformers: the blocks are megatron's TransformerLayer inside megatron's TransformerBlock (TE
or local modules, tensor parallel: heads, fc1 and the merger's fc1 split over TP, the outputs all-reduced), rope goes
through megatron's `apply_rotary_pos_emb`, and the packed frames are a THD batch (`PackedSeqParams`) rather than a
loop over frames. Patch embedding, the position table and the norms are replicated over TP; every TP rank returns
the same output. Megatron names follow Megatron-Bridge's Qwen3-VL (`patch_embed.proj`, `pos_embed`,
`decoder.layers.{i}`, `merger`), in Transformer Engine's spelling on both backends.
Shapes: N patches, H hidden, m spatial merge size, D out_hidden_size (the text model's hidden size).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.layers.vision.grid import check_grid, frame_boundaries, patch_positions
from megatron_qwen35.layers.vision.merger import Qwen35VisionPatchMerger
from megatron_qwen35.layers.vision.patch_embed import Qwen35VisionPatchEmbed
from megatron_qwen35.layers.vision.position_embedding import Qwen35VisionPositionEmbedding
from megatron_qwen35.layers.vision.rotary import Qwen35VisionRotaryEmbedding
from megatron_qwen35.layers.vision.transformer_config import vision_transformer_config
from megatron_qwen35.specs.vision_specs import qwen35_vision_layer_spec, vision_backend_provider


class Qwen35VisionModel(MegatronModule):
    """forward(pixel_values [N, patch_dim], grid_thw [n, 3]) -> [N / m**2, D].

    `config` is the language model's TransformerConfig: the tower takes its tensor-parallel and precision settings
    only (`vision_transformer_config`); `self.config` is the tower's own."""

    def __init__(self, vision: Qwen35VisionConfig, config: TransformerConfig, *, backend: str):
        tower = vision_transformer_config(vision, config)
        super().__init__(config=tower)
        self.vision = vision
        groups = _tower_process_groups()
        self.patch_embed = Qwen35VisionPatchEmbed(vision, tower)
        self.pos_embed = Qwen35VisionPositionEmbedding(vision, tower)
        self.rotary_pos_emb = Qwen35VisionRotaryEmbedding(tower.kv_channels, vision.rope_theta)
        block = TransformerBlockSubmodules(layer_specs=[qwen35_vision_layer_spec(backend=backend)] * vision.depth,
                                           layer_norm=None)  # transformers' tower has no final norm: the merger's
        self.decoder = TransformerBlock(tower, block, post_layer_norm=False, pg_collection=groups)
        self.merger = Qwen35VisionPatchMerger(vision, tower, vision_backend_provider(backend), tp_group=groups.tp)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merge = self.vision.spatial_merge_size
        check_grid(grid_thw, merge)
        device = pixel_values.device
        positions = patch_positions(grid_thw, merge, device=device)
        if pixel_values.shape != (positions.rows.numel(), self.vision.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid_thw.tolist()} "
                             f"needs [{positions.rows.numel()}, {self.vision.patch_dim}]")
        hidden = self.patch_embed(pixel_values)
        hidden = hidden + self.pos_embed(positions).to(hidden.dtype)  # [N, H]
        cu_seqlens = frame_boundaries(grid_thw, device=device)
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        frames = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        hidden = self.decoder(hidden.unsqueeze(1), attention_mask=None,  # [N, 1, H]: THD, one row
                              rotary_pos_emb=self.rotary_pos_emb(positions.rows, positions.cols),
                              packed_seq_params=frames)
        return self.merger(hidden.squeeze(1))


def _tower_process_groups() -> ProcessGroupCollection:
    """megatron's process groups, except that context parallelism is this rank alone: each CP rank encodes all of its
    micro-batch's images (the text model splits only its own sequence), and megatron's attention and rope read the
    CP group's size from here."""
    groups = ProcessGroupCollection.use_mpu_process_groups()
    if groups.cp is not None and groups.cp.size() > 1:
        groups.cp = _own_rank_group()
    return groups


@functools.cache
def _own_rank_group() -> dist.ProcessGroup:
    """A process group of this rank only (made by this rank alone: local synchronisation)."""
    return dist.new_group([dist.get_rank()], use_local_synchronization=True)
