"""The adapters' update folded into the base weights (the merged export): `W + scaling * B A`, in fp32.

Names are the whole model's (a one-process model's, as the checkpoint holds them): `{linear}.weight` and its
adapter's `{linear}.lora.A_{part}` / `{linear}.lora.B_{i}`; an adapter shared by a layer's routed experts
(`mlp.experts.lora_shared_fc1`) updates every expert's weight of that layer (`adapted_weights`). In a fused linear
each row reads its own part's A (lora/targets.py), so the update of rows of part p is B[rows] A_p, and rows of a part
not adapted are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.lora.targets import COLUMN, adapted_linear_of, fused_row_parts, part_rows


def adapter_sections(tensors: Mapping[str, torch.Tensor], linear: str) -> list[str]:
    """The names of `linear`'s B sections in order."""
    prefix = f"{linear}.lora.B_"
    return sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))


def adapted_weights(names: Iterable[str], cfg: Qwen35Config) -> dict[str, list[str]]:
    """{base weight name: the names of the adapter tensors (of `names`) that update it}."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        linear = name.split(".lora.")[0]
        row = adapted_linear_of(linear)
        if row.shared_by_experts is None:
            weights = [f"{linear}.weight"]
        else:
            layer = linear[: -len(row.megatron)]
            weights = [f"{layer}mlp.experts.local_experts.{e}.{row.shared_by_experts}.weight"
                       for e in range(cfg.num_experts)]
        for weight in weights:
            out.setdefault(weight, []).append(name)
    return out


def lora_delta(linear: str, cfg: Qwen35Config, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """scaling x B A of the adapter of Megatron linear `linear` (fp32, the shape of its weight)."""
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
    """Base weight `name` (`{linear}.weight`) with its adapter's update (`tensors`: the adapter's, as
    `adapted_weights` names them), fp32."""
    (adapter,) = {n.split(".lora.")[0] for n in tensors}
    delta = lora_delta(adapter, cfg, tensors, scaling)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"the adapter {adapter} updates a {list(delta.shape)} weight; {name} in the base holds "
                         f"{list(weight.shape)}")
    return weight.float() + delta


__all__ = ["adapted_weights", "adapter_sections", "lora_delta", "merged_weight"]
