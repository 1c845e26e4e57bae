"""Where each patch of a batch of images and videos sits, in the order transformers' processor emits them.

The processor flattens each frame's h x w patch grid in spatial-merge-block order: the m x m patches that the merger
joins into one token are consecutive (block row, block column, row in block, column in block); a video repeats that
for each of its t frames; images and videos follow one another as listed in grid_thw [n, 3] (t, h, w in patches).
The tower's positional parts read this order: the resampled position table, the 2-D rope, the merger's grouping,
and attention, which sees the patches of one frame and no others (transformers' `get_vision_cu_seqlens`).

N = sum of t * h * w over grid_thw; m = spatial_merge_size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PatchPositions(NamedTuple):
    """Per patch, [N] long each: its row and column in its frame, and its frame's height and width."""

    rows: torch.Tensor
    cols: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor


def check_grid(grid_thw: torch.Tensor, merge: int) -> None:
    """Name a grid the tower cannot read: not [n, 3], or a side that the merger's m x m blocks do not tile."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t < 1 or h % merge or w % merge or h < merge or w < merge:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: t must be >= 1 and h, w positive multiples of "
                             f"spatial_merge_size {merge}")


def patch_positions(grid_thw: torch.Tensor, merge: int, *, device: torch.device) -> PatchPositions:
    """Row, column and frame size of every patch, in the processor's order (see the module docstring)."""
    parts = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)  # [h, w] -> block row, row in block, block col, col in block
        rows = rows.reshape(blocks).transpose(1, 2).flatten().repeat(t)
        cols = cols.reshape(blocks).transpose(1, 2).flatten().repeat(t)
        parts.append((rows, cols, torch.full_like(rows, h), torch.full_like(rows, w)))
    return PatchPositions(*(torch.cat(column) for column in zip(*parts, strict=True)))


def frame_boundaries(grid_thw: torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """cu_seqlens [frames + 1] int32: each frame of each image or video is one attention sequence."""
    grid = grid_thw.to(device)
    per_frame = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))
