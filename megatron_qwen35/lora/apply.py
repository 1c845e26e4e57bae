"""Put LoRA adapters on a built Megatron Qwen3.5 model chunk and freeze everything else.

`apply_lora(model, cfg, settings)` walks the decoder layers this chunk holds (and the MTP layer's, with
`settings.mtp`), adapts each linear of lora/targets.py that the target names select, and leaves every other
parameter without a gradient: megatron's DDP then gives them no gradient buffer and its optimizer (distributed or
not) no state. It runs in model_provider, on every machine, before megatron wraps the model.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.lora.adapter import LoRAAdapter, attach_adapter
from megatron_qwen35.lora.targets import (
    ADAPTED_LINEARS,
    COLUMN,
    TARGET_MODULES,
    AdaptedLinear,
    check_target_modules,
    fused_row_parts,
    local_rows,
    parts_adapted,
)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """--lora-rank, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-mtp."""

    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    mtp: bool = False  # the MTP layer's linears too

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"--lora-rank {self.rank}: a LoRA rank is a positive number of dimensions")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout {self.dropout}: a dropout probability is in [0, 1)")
        check_target_modules(self.target_modules)


def _layers(model, with_mtp: bool):
    """(prefix, layer) of every transformer layer this chunk holds: decoder layers, then the MTP layers' own."""
    decoder = getattr(model, "decoder", None)
    for i, layer in enumerate(decoder.layers if decoder is not None else []):
        yield f"decoder.layers.{i}.", layer
    mtp = getattr(model, "mtp", None)
    if with_mtp and mtp is not None:
        for i, layer in enumerate(mtp.layers):
            yield f"mtp.layers.{i}.mtp_model_layer.", layer.mtp_model_layer


def _submodule(layer, path: str):
    module = layer
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _linears(layer, linear: AdaptedLinear):
    """(path, module) of each Megatron linear of `layer` this table row names (each local expert's for experts)."""
    if not linear.expert:
        module = _submodule(layer, linear.megatron)
        return [] if module is None else [(linear.megatron, module)]
    experts = _submodule(layer, "mlp.experts.local_experts")
    if experts is None:
        return []
    return [(linear.megatron.format(E=i), _submodule(layer, linear.megatron.format(E=i))) for i in range(len(experts))]


def _part_rows(linear: AdaptedLinear, cfg: Qwen35Config, total: int) -> list[int]:
    """The rows of each transformers part of a fused linear of `total` rows (the conversion's own split)."""
    return [t.shape[0] for t in linear.transform.to_hf([torch.empty(total, 1, device="meta")], cfg)]


def _adapter(module, linear: AdaptedLinear, parts: tuple[str, ...], cfg: Qwen35Config,
             settings: LoRASettings) -> LoRAAdapter:
    tp_group = module.tp_group
    tp, tp_rank = tp_group.size(), tp_group.rank()
    if linear.expert and tp > 1:
        raise ValueError(f"LoRA on routed experts with expert tensor parallelism {tp}: not supported; use "
                         "--expert-tensor-parallel-size 1 (experts split over EP), or leave 'experts' out of "
                         "--lora-target-modules")
    weight = module.weight
    out_local, in_local = weight.shape
    if linear.parallel == COLUMN:
        total = out_local * tp
        row_part = fused_row_parts(linear, cfg, _part_rows(linear, cfg, total))
        rows = local_rows(linear, cfg, total, tp, tp_rank)
        sections = [n // tp for n in linear.sections(cfg)] if linear.sections is not None else [out_local]
        if sum(sections) != out_local:
            raise ValueError(f"{linear.megatron}: sections {sections} do not add up to its {out_local} local rows")
        row_part = row_part[rows]
    else:
        row_part, sections = torch.zeros(out_local, dtype=torch.long), [out_local]
    index = {p: linear.parts.index(p) for p in parts}
    return LoRAAdapter(parallel=linear.parallel, parts=index, row_part=row_part.to(weight.device), sections=sections,
                       in_features=in_local, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                       tp_group=tp_group, sequence_parallel=bool(getattr(module, "sequence_parallel", False)),
                       expert_comm=bool(getattr(module, "explicit_expert_comm", False)), dtype=weight.dtype,
                       device=weight.device)


def apply_lora(model: torch.nn.Module, cfg: Qwen35Config, settings: LoRASettings) -> list[str]:
    """Adapt `model`'s linears in place; freeze the rest. Returns the adapted modules' paths."""
    targets = check_target_modules(settings.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for prefix, layer in _layers(model, settings.mtp):
        for linear in ADAPTED_LINEARS:
            parts = parts_adapted(linear, targets)
            if not parts:
                continue
            for path, module in _linears(layer, linear):
                attach_adapter(module, _adapter(module, linear, parts, cfg, settings))
                adapted.append(prefix + path)
    return adapted


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters by name (what trains)."""
    return {n: p for n, p in model.named_parameters() if ".lora." in f".{n}"}


__all__ = ["LoRASettings", "apply_lora", "lora_parameters"]
