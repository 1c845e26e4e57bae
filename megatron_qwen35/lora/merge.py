"""The adapters' update folded into the base weights (the merged export): `W + scaling * B A`, in fp32.

Names are the whole model's (a one-process model's, as the checkpoint holds them): `{linear}.weight` and its
adapter's `{linear}.lora.A_{part}` / `{linear}.lora.B_{i}`. In a fused linear each row reads its own part's A
(lora/targets.py), so the update of rows of part p is B[rows] A_p, and rows of a part not adapted are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.lora.targets import COLUMN, adapted_linear_of, fused_row_parts, part_rows


def adapter_sections(tensors: Mapping[str, torch.Tensor], linear: str) -> list[str]:
    """The names of `linear`'s B sections in order."""
    prefix = f"{linear}.lora.B_"
    return sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))


def lora_delta(linear: str, cfg: Qwen35Config, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """scaling x B A of Megatron linear `linear` (fp32, the shape of its weight)."""
    row = adapted_linear_of(linear)
    a = {p: tensors[f"{linear}.lora.A_{p}"].float() for p in row.parts if f"{linear}.lora.A_{p}" in tensors}
    b = torch.cat([tensors[k].float() for k in adapter_sections(tensors, linear)], dim=0)
    if row.parallel == COLUMN:
        row_part = fused_row_parts(row, cfg, part_rows(row, cfg, b.shape[0]))
    else:
        row_part = torch.zeros(b.shape[0], dtype=torch.long)
    delta = torch.zeros(b.shape[0], next(iter(a.values())).shape[1])
    for i, part in enumerate(row.parts):
        if part in a:
            rows = row_part == i
            delta[rows] = b[rows] @ a[part]
    return delta * scaling


def merged_weight(name: str, weight: torch.Tensor, cfg: Qwen35Config, tensors: Mapping[str, torch.Tensor],
                  scaling: float) -> torch.Tensor:
    """Base weight `name` (`{linear}.weight`) with its adapter's update, fp32."""
    linear = name.removesuffix(".weight")
    delta = lora_delta(linear, cfg, tensors, scaling)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"the adapter of {linear} updates a {list(delta.shape)} weight; the base holds "
                         f"{list(weight.shape)}")
    return weight.float() + delta


__all__ = ["adapter_sections", "lora_delta", "merged_weight"]
