"""Which linear layers LoRA adapts, named as transformers names them (what peft's `target_modules` match), and how
each maps onto the Megatron linear that holds it.

Megatron fuses what transformers keeps apart: the Gated DeltaNet's `in_proj_qkv`, `in_proj_z`, `in_proj_b`,
`in_proj_a` are one `in_proj`; attention's `q_proj`, `k_proj`, `v_proj` one `linear_qkv`; an MLP's `gate_proj` and
`up_proj` one `linear_fc1`. Each transformers module keeps its own adapter (its own A, and its rows of B), as peft
gives it, so an adapter trained here is peft's and back. The rows of a fused linear come from the conversion's own
row transform (convert/transforms.py, the one source of that layout), and which of them a tensor-parallel rank holds
from megatron's split of that linear (`sections`: each section split on its own, as megatron's GDN and SwiGLU
checkpoints split them; None: one contiguous block).

A routed expert's `gate_up_proj` (one tensor in transformers, `[gate | up]`) has one adapter per expert, as peft's
`target_parameters` gives the packed expert tensors; with `--lora-experts shared` one adapter serves every routed
expert of a layer (EXPERT_SHARED_LINEARS: it lives in a holder module of the layer's experts, `lora_shared_fc1` /
`lora_shared_fc2`), the same at every expert-parallel size; in peft's form every expert holds a copy of it.

The MoE router (opt-in, `--lora-router`): its weight [experts, hidden] is whole on every TP rank and reads this
rank's tokens; transformers' router (`mlp.gate`) is not an nn.Linear, so peft adapts its `weight` as a
`target_parameters` entry (`mlp.gate.weight`), which gives the same update B A.

The vision tower (opt-in, `--lora-vision`) is adapted whole: every block's attention qkv and proj and MLP fc1 and fc2,
and the merger's fc1 and fc2 (transformers' `attn.qkv` ... `merger.linear_fc2`, which name nothing in the language
model; its patch embedding, a Conv3d, stays frozen). Megatron keeps qkv's rows per head (the conversion's VISION_QKV).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.transforms import GATE_UP, GATED_QKV, GDN_IN_PROJ, IDENTITY, VISION_QKV, Transform

COLUMN, ROW, REPLICATED = "column", "row", "replicated"  # how the adapted weight is split over TP


@dataclass(frozen=True)
class AdaptedLinear:
    """One Megatron linear LoRA may adapt."""

    megatron: str  # the module's path inside a decoder layer
    parallel: str  # COLUMN (output rows split over TP), ROW (input columns split) or REPLICATED (whole everywhere)
    parts: tuple[str, ...]  # transformers' modules it fuses, in the conversion rule's order: one adapter each
    transform: Transform = IDENTITY  # the conversion's rows: parts (transformers) -> the fused linear (Megatron)
    sections: Callable[[Qwen35Config], list[int]] | None = None  # how megatron splits the fused rows over TP
    expert: bool = False  # one linear per routed expert
    shared_by_experts: str | None = None  # the routed experts' linear (linear_fc1 / fc2) one adapter serves for all


def _gdn_sections(cfg: Qwen35Config) -> list[int]:
    qk = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    v = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return [qk, qk, v, v, cfg.linear_num_value_heads, cfg.linear_num_value_heads]  # q k v | z | b | a


def _halves(cfg: Qwen35Config, width: int) -> list[int]:
    return [width, width]


ADAPTED_LINEARS = (
    AdaptedLinear("self_attention.in_proj", COLUMN, ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
                  GDN_IN_PROJ, _gdn_sections),
    AdaptedLinear("self_attention.out_proj", ROW, ("out_proj",)),
    AdaptedLinear("self_attention.linear_qkv", COLUMN, ("q_proj", "k_proj", "v_proj"), GATED_QKV),
    AdaptedLinear("self_attention.linear_proj", ROW, ("o_proj",)),
    AdaptedLinear("mlp.linear_fc1", COLUMN, ("gate_proj", "up_proj"), GATE_UP,
                  lambda cfg: _halves(cfg, cfg.ffn_hidden_size)),
    AdaptedLinear("mlp.linear_fc2", ROW, ("down_proj",)),
    AdaptedLinear("mlp.shared_experts.linear_fc1", COLUMN, ("gate_proj", "up_proj"), GATE_UP,
                  lambda cfg: _halves(cfg, cfg.moe_shared_expert_intermediate_size)),
    AdaptedLinear("mlp.shared_experts.linear_fc2", ROW, ("down_proj",)),
    AdaptedLinear("mlp.experts.local_experts.{E}.linear_fc1", COLUMN, ("gate_up_proj",),
                  sections=lambda cfg: _halves(cfg, cfg.moe_ffn_hidden_size), expert=True),
    AdaptedLinear("mlp.experts.local_experts.{E}.linear_fc2", ROW, ("down_proj",), expert=True),
)
# --lora-experts shared: these instead of the two per-expert rows above
EXPERT_SHARED_LINEARS = (
    AdaptedLinear("mlp.experts.lora_shared_fc1", COLUMN, ("gate_up_proj",),
                  sections=lambda cfg: _halves(cfg, cfg.moe_ffn_hidden_size), expert=True,
                  shared_by_experts="linear_fc1"),
    AdaptedLinear("mlp.experts.lora_shared_fc2", ROW, ("down_proj",), expert=True, shared_by_experts="linear_fc2"),
)

# The MoE router's (in a decoder or MTP layer, as the table above): logits + scaling * B A x
ROUTER_LINEARS = (AdaptedLinear("mlp.router", REPLICATED, ("gate",)),)
ROUTER_PEFT_PARAMETER = "mlp.gate.weight"  # peft's target_parameters entry for it

# The vision tower's: in each block (VISION_BLOCK_PREFIX), then the merger (in the tower, VISION_PREFIX).
VISION_BLOCK_LINEARS = (
    AdaptedLinear("self_attention.linear_qkv", COLUMN, ("qkv",), VISION_QKV),
    AdaptedLinear("self_attention.linear_proj", ROW, ("proj",)),
    AdaptedLinear("mlp.linear_fc1", COLUMN, ("linear_fc1",)),
    AdaptedLinear("mlp.linear_fc2", ROW, ("linear_fc2",)),
)
VISION_MERGER_LINEARS = (
    AdaptedLinear("merger.linear_fc1", COLUMN, ("linear_fc1",)),
    AdaptedLinear("merger.linear_fc2", ROW, ("linear_fc2",)),
)
VISION_PREFIX = "vision_model."
VISION_BLOCK_PREFIX = VISION_PREFIX + "decoder.layers.{i}."
# peft's target_modules for the tower: transformers' module paths' ends, none of which names a language-model module
# (nor the patch embedding's `proj`)
VISION_PEFT_TARGETS = ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2", "merger.linear_fc1",
                       "merger.linear_fc2")

EXPERTS = "experts"  # the user's name for every routed expert's gate_up_proj and down_proj
# Every name --lora-target-modules accepts, in the order of the table (the default is all of them).
TARGET_MODULES = tuple(dict.fromkeys(
    [p for a in ADAPTED_LINEARS if not a.expert for p in a.parts] + [EXPERTS]))


def parts_adapted(linear: AdaptedLinear, targets: frozenset[str]) -> tuple[str, ...]:
    """The parts of `linear` the user's target names select."""
    if linear.expert:
        return linear.parts if EXPERTS in targets else ()
    return tuple(p for p in linear.parts if p in targets)


# transformers' names of the layers peft could also adapt that these adapters do not (docs/lora.md, "Not yet")
NOT_BUILT = {"embed_tokens": "the embedding", "lm_head": "the output layer"}


def check_target_modules(names) -> frozenset[str]:
    """The user's target names, each one we know; else a ValueError naming the valid ones."""
    names = list(names)
    for name in names:
        if name in NOT_BUILT:
            raise ValueError(f"--lora-target-modules {name}: LoRA on {NOT_BUILT[name]} is not built (it stays frozen); "
                             f"the names (transformers' modules) are: {' '.join(TARGET_MODULES)}")
    unknown = [n for n in names if n not in TARGET_MODULES]
    if unknown or not names:
        raise ValueError(f"--lora-target-modules {' '.join(unknown) or '(none)'}: not a linear layer LoRA adapts "
                         f"here; the names (transformers' modules) are: {' '.join(TARGET_MODULES)}")
    return frozenset(names)


def fused_row_parts(linear: AdaptedLinear, cfg: Qwen35Config, part_rows: list[int]) -> torch.Tensor:
    """For each row of the fused Megatron linear (the whole, unsplit), the index of the transformers part it comes
    from: the conversion's transform run on part labels."""
    labels = [torch.full((n, 1), i, dtype=torch.float64) for i, n in enumerate(part_rows)]
    (fused,) = linear.transform.to_megatron(labels, cfg)
    return fused[:, 0].to(torch.long)


def part_rows(linear: AdaptedLinear, cfg: Qwen35Config, total: int) -> list[int]:
    """The rows of each transformers part of a fused linear of `total` rows (the conversion's own split)."""
    return [t.shape[0] for t in linear.transform.to_hf([torch.empty(total, 1, device="meta")], cfg)]


_LAYER = r"(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.mtp_model_layer\.)"
_TABLES = ((_LAYER, ADAPTED_LINEARS + EXPERT_SHARED_LINEARS + ROUTER_LINEARS),
           (re.escape(VISION_BLOCK_PREFIX).replace(re.escape("{i}"), r"\d+"), VISION_BLOCK_LINEARS),
           (re.escape(VISION_PREFIX), VISION_MERGER_LINEARS))


def adapted_linear_of(name: str) -> AdaptedLinear:
    """The table row of a Megatron linear's path in the model (`decoder.layers.3.self_attention.in_proj`,
    `vision_model.decoder.layers.0.self_attention.linear_qkv`)."""
    for layer, table in _TABLES:
        for row in table:
            if re.fullmatch(layer + re.escape(row.megatron).replace(re.escape("{E}"), r"\d+"), name):
                return row
    raise KeyError(f"'{name}' is not a linear LoRA adapts")


def is_vision_linear(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


def local_rows(linear: AdaptedLinear, cfg: Qwen35Config, total: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The rows of the fused linear (of `total`) this tensor-parallel rank holds, in its local order."""
    sections = linear.sections(cfg) if linear.sections is not None else [total]
    if sum(sections) != total:
        raise ValueError(f"{linear.megatron}: sections {sections} do not add up to its {total} rows")
    rows, start = [], 0
    for n in sections:
        if n % tp_size:
            raise ValueError(f"{linear.megatron}: a section of {n} rows does not split over {tp_size} TP ranks")
        rows.append(torch.arange(start + tp_rank * n // tp_size, start + (tp_rank + 1) * n // tp_size))
        start += n
    return torch.cat(rows)


__all__ = ["COLUMN", "ROW", "REPLICATED", "ROUTER_LINEARS", "ROUTER_PEFT_PARAMETER", "AdaptedLinear",
           "ADAPTED_LINEARS", "EXPERT_SHARED_LINEARS", "EXPERTS", "TARGET_MODULES", "VISION_BLOCK_LINEARS",
           "VISION_MERGER_LINEARS", "VISION_PREFIX", "VISION_BLOCK_PREFIX", "VISION_PEFT_TARGETS", "parts_adapted",
           "check_target_modules", "fused_row_parts", "part_rows", "adapted_linear_of", "is_vision_linear",
           "local_rows"]
