"""Adapters between Megatron's names and a Hugging Face PEFT adapter's (what `peft.PeftModel.from_pretrained` reads).

Megatron side (whole tensors, not split over TP / EP; as `named_parameters` of a one-process model and as the
checkpoint names them): per adapted linear `{linear}.lora.A.{part}` [rank, in] and `{linear}.lora.B.{i}`, the fused
rows' TP sections in order [rows_i, rank]. Hugging Face side: transformers' module names under the conversion
table's prefix (`model.` or `model.language_model.`), `base_model.model.{module}.lora_A.weight` / `lora_B.weight`;
the fused rows are split into transformers' modules by the conversion's own transform (convert/transforms.py). A
routed expert's adapters are peft's `target_parameters` on the packed expert tensors: for `mlp.experts.gate_up_proj`
then `mlp.experts.down_proj` (peft nests the second wrapper outside the first, so the first's keys carry
`base_layer.`), lora_A [E x rank, in] holds expert e's A in rows e x rank ..., lora_B [out, rank x E] its B in the
columns r x E + e (peft's ParamWrapper.get_delta_weight).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.table import TEXT_ONLY_PREFIX, qwen35_rules, rules_by_megatron_name
from megatron_qwen35.lora.targets import ADAPTED_LINEARS, COLUMN, AdaptedLinear

PEFT_PREFIX = "base_model.model."  # what peft's saved adapter keys start with
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # peft's target_parameters order (inner wrapper first)


def _expert_key(layer_hf: str, parameter: str, which: str) -> str:
    nest = "base_layer." if parameter == EXPERT_PARAMETERS[0] else ""
    return f"{PEFT_PREFIX}{layer_hf}mlp.experts.{nest}lora_{which}.weight"


def _linears(cfg: Qwen35Config, names: set[str]):
    """(megatron linear, table row, transformers module of each part) of every adapted linear in `names`."""
    rules = rules_by_megatron_name(qwen35_rules(cfg, hf_prefix=TEXT_ONLY_PREFIX, expert_layout="per_expert"))
    linears = sorted({n.split(".lora.")[0] for n in names if ".lora." in n})
    for linear in linears:
        row = _row_of(linear)
        rule = rules[f"{linear}.weight"]
        yield linear, row, [h[: -len(".weight")] for h in rule.hf]


_LAYER = r"(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.mtp_model_layer\.)"


def _row_of(linear: str) -> AdaptedLinear:
    """The table row of a Megatron linear's name."""
    for row in ADAPTED_LINEARS:
        if re.fullmatch(_LAYER + re.escape(row.megatron).replace(re.escape("{E}"), r"\d+"), linear):
            return row
    raise KeyError(f"'{linear}' is not a linear LoRA adapts")


def _layer_and_expert(linear: str) -> tuple[str, int]:
    """('decoder.layers.3.', 5) of 'decoder.layers.3.mlp.experts.local_experts.5.linear_fc1'."""
    head, _, rest = linear.partition("mlp.experts.local_experts.")
    return head, int(rest.split(".")[0])


def to_peft(adapters: Mapping[str, torch.Tensor], cfg: Qwen35Config, *, hf_prefix: str = TEXT_ONLY_PREFIX
            ) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors from Megatron's (whole tensors by Megatron name)."""
    if any(n.startswith("mtp.") for n in adapters):
        raise ValueError("the MTP layer's adapters have no PEFT form: transformers' Qwen3.5 has no MTP layer "
                         "(export merged instead, or train without --lora-mtp)")
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for linear, row, hf_parts in _linears(cfg, set(adapters)):
        a = {p: adapters[f"{linear}.lora.A.{p}"] for p in row.parts if f"{linear}.lora.A.{p}" in adapters}
        sections = [adapters[k] for k in sorted((k for k in adapters if k.startswith(f"{linear}.lora.B.")),
                                                key=lambda k: int(k.rsplit(".", 1)[1]))]
        b = torch.cat(sections, dim=0)
        if row.expert:
            layer, e = _layer_and_expert(linear)
            param = row.parts[0] if row.parallel == COLUMN else "down_proj"
            experts.setdefault((layer, param), {})[e] = (a[row.parts[0]], b)
            continue
        part_b = row.transform.to_hf([b], cfg) if row.parallel == COLUMN else [b]
        for part, hf_module, b_part in zip(row.parts, hf_parts, part_b, strict=True):
            if part in a:
                hf_module = hf_prefix + hf_module[len(TEXT_ONLY_PREFIX):]
                out[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = a[part].contiguous()
                out[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = b_part.contiguous()
    for (layer, param), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.num_experts)):
            raise ValueError(f"{layer}: adapters of experts {sorted(per_expert)}, not all {cfg.num_experts}")
        a = torch.stack([per_expert[e][0] for e in range(cfg.num_experts)])  # [E, r, in]
        b = torch.stack([per_expert[e][1] for e in range(cfg.num_experts)], dim=-1)  # [out, r, E]
        layer_hf = hf_prefix + layer[len("decoder."):]
        out[_expert_key(layer_hf, param, "A")] = a.reshape(-1, a.shape[-1]).contiguous()
        out[_expert_key(layer_hf, param, "B")] = b.reshape(b.shape[0], -1).contiguous()
    return out


def from_peft(peft: Mapping[str, torch.Tensor], cfg: Qwen35Config, like: Mapping[str, torch.Size], *,
              hf_prefix: str = TEXT_ONLY_PREFIX) -> dict[str, torch.Tensor]:
    """Megatron's tensors (the names and whole shapes of `like`, a model's adapters) from a PEFT adapter's; a
    tensor the model has and the adapter lacks, or one of another shape, is a ValueError naming it."""
    wanted = {}  # megatron name -> tensor
    for linear, row, hf_parts in _linears(cfg, set(like)):
        if row.expert:
            layer, e = _layer_and_expert(linear)
            param = row.parts[0] if row.parallel == COLUMN else "down_proj"
            layer_hf = hf_prefix + layer[len("decoder."):]
            a_all, b_all = (_get(peft, _expert_key(layer_hf, param, w)) for w in "AB")
            rank = a_all.shape[0] // cfg.num_experts
            a = a_all.view(cfg.num_experts, rank, -1)[e]
            b = b_all.view(b_all.shape[0], rank, cfg.num_experts)[:, :, e]
            wanted[f"{linear}.lora.A.{row.parts[0]}"] = a
            _put_sections(wanted, linear, b, like)
            continue
        a_parts, b_parts = {}, []
        for part, hf_module in zip(row.parts, hf_parts, strict=True):
            hf_module = hf_prefix + hf_module[len(TEXT_ONLY_PREFIX):]
            if f"{linear}.lora.A.{part}" in like:
                a_parts[part] = _get(peft, f"{PEFT_PREFIX}{hf_module}.lora_A.weight")
                b_parts.append(_get(peft, f"{PEFT_PREFIX}{hf_module}.lora_B.weight"))
            else:  # a part the model does not adapt: its rows of the fused B stay zero
                b_parts.append(None)
        for part, a in a_parts.items():
            wanted[f"{linear}.lora.A.{part}"] = a
        rank = next(iter(a_parts.values())).shape[0]
        if row.parallel == COLUMN:
            shapes = [t.shape for t in row.transform.to_hf(
                [torch.empty(sum(like[k][0] for k in like if k.startswith(f"{linear}.lora.B.")), rank,
                             device="meta")], cfg)]
            full = [b if b is not None else torch.zeros(s) for b, s in zip(b_parts, shapes, strict=True)]
            (b,) = row.transform.to_megatron(full, cfg)
        else:
            (b,) = b_parts
        _put_sections(wanted, linear, b, like)
    for name, tensor in wanted.items():
        if name not in like or tuple(tensor.shape) != tuple(like[name]):
            raise ValueError(f"the adapter's tensor for {name} has shape {tuple(tensor.shape)}, the model's "
                             f"{tuple(like[name]) if name in like else 'none'}: an adapter of another LoRA rank or "
                             "targets, or of another model")
    missing = sorted(set(like) - set(wanted))
    if missing:
        raise ValueError(f"the adapter has nothing for {missing[0]} ({len(missing)} in all)")
    return wanted


def _get(peft: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in peft:
        raise ValueError(f"the PEFT adapter lacks '{key}' (an adapter of other target modules, or of another model)")
    return peft[key]


def _put_sections(wanted: dict, linear: str, b: torch.Tensor, like: Mapping[str, torch.Size]) -> None:
    keys = sorted((k for k in like if k.startswith(f"{linear}.lora.B.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    start = 0
    for k in keys:
        n = like[k][0]
        wanted[k] = b[start:start + n]
        start += n


__all__ = ["PEFT_PREFIX", "EXPERT_PARAMETERS", "to_peft", "from_peft"]
