"""Rotary positions: the one place that chooses Qwen3.5's rope, for text-only models and for vision-language ones.

Qwen3.5 rotates the first `partial_rotary_factor` (25%) of each 256-dim head with theta 1e7, using interleaved
mRoPE: each rotary frequency belongs to one of three position streams (temporal, height, width), frequency i to
height when i % 3 == 1 and i < 3 * sections[1], to width when i % 3 == 2 and i < 3 * sections[2], else to time
(transformers' `Qwen3_5TextRotaryEmbedding.recomposition_frequencies`).

- Text-only models: the three streams are the same token index, so interleaved mRoPE is exactly 1-D rope with
  rotate-half on those dims: megatron-core's `rope`, whose table Transformer Engine's fused kernel can read.
- Vision-language models: image and video tokens get (t, h, w) grid positions (`mrope_position_ids`, transformers'
  `get_rope_index`), so each sample has its own positions. megatron-core's `mrope` slot in GPTModel takes position
  ids [3, b, s], but its `MultimodalRotaryEmbedding` is Qwen2-VL's contiguous sections (and allocates on CUDA at
  build); `InterleavedMRoPE` fills the same slot with Qwen3.5's interleaving.
"""

from __future__ import annotations

import itertools

import torch

from megatron_qwen35.config import Qwen35Config, Qwen35VisionConfig

TEXT, IMAGE, VIDEO = 0, 1, 2  # transformers' mm_token_type_ids values


def qwen35_position_embedding_kwargs(cfg: Qwen35Config) -> dict:
    """GPTModel keyword arguments for the text model's positions (a VL model then installs `InterleavedMRoPE`)."""
    return dict(
        position_embedding_type="rope",
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=int(cfg.rope_theta),
    )


def frequency_axes(cfg: Qwen35Config) -> torch.Tensor:
    """For each of the rotary_dim / 2 frequencies, the position stream it reads: 0 time, 1 height, 2 width."""
    axes = torch.zeros(cfg.rotary_dim // 2, dtype=torch.long)
    for axis in (1, 2):
        axes[axis:cfg.mrope_section[axis] * 3:3] = axis
    return axes


class InterleavedMRoPE(torch.nn.Module):
    """GPTModel's `rotary_pos_emb` for the `mrope` position type: position ids [3, b, s] (or [b, s] for text, all
    three streams equal) -> rope angles [s, b, 1, rotary_dim] in the rotate-half layout megatron applies.

    The angles are position * inverse frequency in fp32, as transformers computes them. The inverse frequencies are
    a plain attribute, not a buffer, so that casting the model to bf16 (megatron's Float16Module) leaves them fp32,
    as megatron's own RotaryEmbedding does. Context parallelism: the positions given are this rank's already (the
    batch is split with them), so nothing is sliced here; but for a packed (THD) sequence megatron applies rope per
    token only to angles of the whole packed sequence, picking each document's rows of this rank itself
    (rope_utils._apply_rotary_pos_emb_thd): there the angles are laid out at this rank's positions of a full-length
    tensor (`packed_context_parallel`, set by the VL model for its forward), the other rows zero and never read.
    """

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        dim = cfg.rotary_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.axes = frequency_axes(cfg)
        self.packed_context_parallel = None  # (cu_seqlens, cp_group) of a packed sequence split over CP ranks

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"mRoPE position ids must be [3, batch, seq] or [batch, seq], got "
                             f"{tuple(position_ids.shape)}")
        device = position_ids.device
        inv_freq, axes = self.inv_freq.to(device), self.axes.to(device)
        per_frequency = position_ids[axes].float()  # [dim / 2, b, s]: each frequency's own stream
        angles = per_frequency.permute(2, 1, 0) * inv_freq  # [s, b, dim / 2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)
        if self.packed_context_parallel is None:
            return angles
        from megatron_qwen35.layers.context_parallel import cp_rank_positions

        cu_seqlens, cp = self.packed_context_parallel
        total = int(cu_seqlens[-1])
        mine = cp_rank_positions(total, cp, cu_seqlens, device=device)
        return angles.new_zeros(total, *angles.shape[1:]).index_copy_(0, mine, angles)


def token_types(input_ids: torch.Tensor, vision: Qwen35VisionConfig) -> torch.Tensor:
    """transformers' `mm_token_type_ids` as its processor writes them: IMAGE at image pads, VIDEO at video pads."""
    types = torch.full_like(input_ids, TEXT)
    types[input_ids == vision.image_token_id] = IMAGE
    types[input_ids == vision.video_token_id] = VIDEO
    return types


def mrope_position_ids(input_ids: torch.Tensor, vision: Qwen35VisionConfig, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The (t, h, w) positions of every token, [3, b, s] for input_ids [b, s] ([3, s] for [s]): transformers'
    `Qwen3_5Model.get_rope_index` with the token types its processor writes.

    Text tokens count on from the previous position on all three streams; each run of image (video) pad tokens takes
    the next image's grid (each video frame is its own run: Qwen3.5 separates frames by timestamps), laid out as
    (start, start + row, start + column) over the merged grid, and the text after it continues from start +
    max(rows, columns). Images are taken in order over the whole batch, as transformers does. Padding
    (attention_mask 0) gets position 0 and is skipped.
    """
    if input_ids.dim() == 1:
        masks = None if attention_mask is None else attention_mask.unsqueeze(0)
        return mrope_position_ids(input_ids.unsqueeze(0), vision, image_grid_thw, video_grid_thw, masks)[:, 0]
    merge = vision.spatial_merge_size
    grids = {IMAGE: _grid_list(image_grid_thw), VIDEO: _frames(_grid_list(video_grid_thw))}
    used = {IMAGE: 0, VIDEO: 0}
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for row, ids in enumerate(input_ids.cpu()):
        keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[row].cpu().bool()
        types = token_types(ids[keep], vision).tolist()
        pieces, start, at = [], 0, 0
        for kind, run in itertools.groupby(types):
            length = len(list(run))
            if kind == TEXT:
                pieces.append(torch.arange(start, start + length).expand(3, -1))
                start += length
            else:
                name = "image" if kind == IMAGE else "video frame"
                if used[kind] == len(grids[kind]):
                    raise ValueError(f"row {row} has a run of {length} {name} tokens at position {at} but only "
                                     f"{len(grids[kind])} {name} grids were given")
                t, h, w = grids[kind][used[kind]]
                if t * h * w != length * merge * merge:
                    raise ValueError(f"{name} {used[kind]} (grid t={t}, h={h}, w={w}) needs "
                                     f"{t * h * w // (merge * merge)} tokens, but row {row} has a run of {length} "
                                     f"at position {at}")
                used[kind] += 1
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h // merge),
                                                  torch.arange(w // merge), indexing="ij")).reshape(3, -1)
                pieces.append(grid + start)
                start += max(h, w) // merge
            at += length
        if pieces:
            positions[:, row, keep] = torch.cat(pieces, dim=1)
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids were given but the input has {used[kind]} runs of "
                             f"{name} tokens")
    return positions.to(input_ids.device)


def _grid_list(grid_thw: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid_thw is None else [tuple(int(x) for x in g) for g in grid_thw.reshape(-1, 3).tolist()]


def _frames(videos: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """A video of t frames is t runs of one frame each (transformers splits video_grid_thw the same way)."""
    return [(1, h, w) for t, h, w in videos for _ in range(t)]
