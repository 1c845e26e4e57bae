"""Adapters between Megatron's names and a Hugging Face PEFT adapter's (what `peft.PeftModel.from_pretrained` reads).

Megatron side (whole tensors, not split over TP / EP; as `named_parameters` of a one-process model and as the
checkpoint names them): per adapted linear `{linear}.lora.A_{part}` [rank, in] and `{linear}.lora.B_{i}`, the fused
rows' TP sections in order [rows_i, rank]. Hugging Face side: transformers' module names under the conversion
table's prefix (`model.` or `model.language_model.`), `base_model.model.{module}.lora_A.weight` / `lora_B.weight`;
the fused rows are split into transformers' modules by the conversion's own transform (convert/transforms.py). A
routed expert's adapters are peft's `target_parameters` on the packed expert tensors: for `mlp.experts.gate_up_proj`
then `mlp.experts.down_proj` (peft nests the second wrapper outside the first, so the first's keys carry
`base_layer.`), lora_A [E x rank, in] holds expert e's A in rows e x rank ..., lora_B [out, rank x E] its B in the
columns r x E + e (peft's ParamWrapper.get_delta_weight). The router's (`--lora-router`) is peft's
`target_parameters` entry `mlp.gate.weight`: `mlp.gate.lora_A` / `lora_B`, as a linear's. The vision tower's
adapters (`--lora-vision`) sit on transformers' `model.visual.*` modules, whatever the language model's prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.table import TEXT_ONLY_PREFIX, qwen35_rules, rules_by_megatron_name, vision_rules
from megatron_qwen35.lora.targets import (
    COLUMN,
    ROUTER_PEFT_PARAMETER,
    VISION_PEFT_TARGETS,
    adapted_linear_of,
    is_vision_linear,
)

PEFT_PREFIX = "base_model.model."  # what peft's saved adapter keys start with
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # peft's target_parameters order (inner wrapper first)


def _expert_key(layer_hf: str, parameter: str, which: str) -> str:
    nest = "base_layer." if parameter == EXPERT_PARAMETERS[0] else ""
    return f"{PEFT_PREFIX}{layer_hf}mlp.experts.{nest}lora_{which}.weight"


def _linears(cfg: Qwen35Config, names: set[str], hf_prefix: str):
    """(megatron linear, table row, transformers module of each part) of every adapted linear in `names`, the
    language model's modules under `hf_prefix`."""
    rules = qwen35_rules(cfg, hf_prefix=TEXT_ONLY_PREFIX, expert_layout="per_expert")
    linears = sorted({n.split(".lora.")[0] for n in names if ".lora." in n})
    if any(is_vision_linear(n) for n in linears):
        rules = rules + vision_rules(cfg)
    rules = rules_by_megatron_name(rules)
    for linear in linears:
        row = adapted_linear_of(linear)
        if row.shared_by_experts is not None:  # no weight of its own: peft's names are its experts' (_expert_key)
            yield linear, row, []
            continue
        modules = [h[: -len(".weight")] for h in rules[f"{linear}.weight"].hf]
        if not is_vision_linear(linear):
            modules = [hf_prefix + m[len(TEXT_ONLY_PREFIX):] for m in modules]
        yield linear, row, modules


def _layer_and_expert(linear: str) -> tuple[str, int | None]:
    """('decoder.layers.3.', 5) of 'decoder.layers.3.mlp.experts.local_experts.5.linear_fc1'; ('decoder.layers.3.',
    None) of the layer's adapter shared by its experts, 'decoder.layers.3.mlp.experts.lora_shared_fc1'."""
    head, _, rest = linear.partition("mlp.experts.")
    return head, int(rest.split(".")[1]) if rest.startswith("local_experts.") else None


def to_peft(adapters: Mapping[str, torch.Tensor], cfg: Qwen35Config, *, hf_prefix: str = TEXT_ONLY_PREFIX
            ) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors from Megatron's (whole tensors by Megatron name)."""
    if any(n.startswith("mtp.") for n in adapters):
        raise ValueError("the MTP layer's adapters have no PEFT form: transformers' Qwen3.5 has no MTP layer "
                         "(export merged instead, or train without --lora-mtp)")
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for linear, row, hf_parts in _linears(cfg, set(adapters), hf_prefix):
        a = {p: adapters[f"{linear}.lora.A_{p}"] for p in row.parts if f"{linear}.lora.A_{p}" in adapters}
        sections = [adapters[k] for k in sorted((k for k in adapters if k.startswith(f"{linear}.lora.B_")),
                                                key=lambda k: int(k.rsplit("_", 1)[1]))]
        b = torch.cat(sections, dim=0)
        if row.expert:
            layer, expert = _layer_and_expert(linear)
            param = row.parts[0] if row.parallel == COLUMN else "down_proj"
            for e in range(cfg.num_experts) if expert is None else [expert]:  # shared: every expert's copy
                experts.setdefault((layer, param), {})[e] = (a[row.parts[0]], b)
            continue
        part_b = row.transform.to_hf([b], cfg) if row.parallel == COLUMN else [b]
        for part, hf_module, b_part in zip(row.parts, hf_parts, part_b, strict=True):
            if part in a:
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
    used: set[str] = set()

    def get(key: str) -> torch.Tensor:
        used.add(key)
        return _get(peft, key)

    for linear, row, hf_parts in _linears(cfg, set(like), hf_prefix):
        if row.expert:
            layer, e = _layer_and_expert(linear)
            param = row.parts[0] if row.parallel == COLUMN else "down_proj"
            layer_hf = hf_prefix + layer[len("decoder."):]
            a_all, b_all = (get(_expert_key(layer_hf, param, w)) for w in "AB")
            rank = a_all.shape[0] // cfg.num_experts
            a_each, b_each = a_all.view(cfg.num_experts, rank, -1), b_all.view(b_all.shape[0], rank, cfg.num_experts)
            if e is None:  # one adapter shared by the layer's experts: peft's copies must be one
                if not (torch.equal(a_each, a_each[:1].expand_as(a_each))
                        and torch.equal(b_each, b_each[:, :, :1].expand_as(b_each))):
                    raise ValueError(f"the PEFT adapter's experts of {layer_hf}mlp.experts differ: they are not one "
                                     "adapter shared by the layer's experts (load it with --lora-experts each)")
                e = 0
            a, b = a_each[e], b_each[:, :, e]
            wanted[f"{linear}.lora.A_{row.parts[0]}"] = a
            _put_sections(wanted, linear, b, like)
            continue
        a_parts, b_parts = {}, []
        for part, hf_module in zip(row.parts, hf_parts, strict=True):
            if f"{linear}.lora.A_{part}" in like:
                a_parts[part] = get(f"{PEFT_PREFIX}{hf_module}.lora_A.weight")
                b_parts.append(get(f"{PEFT_PREFIX}{hf_module}.lora_B.weight"))
            else:  # a part the model does not adapt: its rows of the fused B stay zero
                b_parts.append(None)
        for part, a in a_parts.items():
            wanted[f"{linear}.lora.A_{part}"] = a
        rank = next(iter(a_parts.values())).shape[0]
        if row.parallel == COLUMN:
            shapes = [t.shape for t in row.transform.to_hf(
                [torch.empty(sum(like[k][0] for k in like if k.startswith(f"{linear}.lora.B_")), rank,
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
    unused = sorted(set(peft) - used)
    if unused:
        raise ValueError(f"the PEFT adapter's '{unused[0]}' ({len(unused)} in all) adapts nothing of this model: an "
                         "adapter of other target modules or layers, or of another model")
    return wanted


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names


def peft_config(settings, cfg: Qwen35Config) -> dict:
    """The adapter_config.json of `settings` (lora.LoRASettings), written by peft's own LoraConfig."""
    from peft import LoraConfig

    from megatron_qwen35.lora.targets import EXPERTS

    modules = sorted(t for t in settings.target_modules if t != EXPERTS)
    if settings.vision:
        modules += list(VISION_PEFT_TARGETS)
    parameters = ([f"mlp.experts.{p}" for p in EXPERT_PARAMETERS]
                  if EXPERTS in settings.target_modules and cfg.is_moe else [])
    if settings.router and cfg.is_moe:
        parameters.append(ROUTER_PEFT_PARAMETER)  # a module of its own: the experts' nesting stays as it is
    parameters = parameters or None
    # peft refuses any lora_dropout on an adapter with target_parameters (its routed experts' and router's form:
    # peft 0.21 tuners/lora/layer.py ParamWrapper, "does not work with lora_dropout != 0"); dropout acts only in
    # training, so such an adapter is written without it, to stay loadable (docs/lora.md)
    dropout = settings.dropout if parameters is None else 0.0
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=dropout,
                        target_modules=modules or None, target_parameters=parameters, task_type="CAUSAL_LM")
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def settings_from_peft_config(config: dict, source: str):
    """lora.LoRASettings of a peft adapter_config.json; what this project's adapters cannot express is a ValueError
    naming the field."""
    from megatron_qwen35.lora import LoRASettings
    from megatron_qwen35.lora.targets import EXPERTS

    def refuse(why: str):
        raise ValueError(f"{source}: {why}")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r}, not 'LORA'")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            refuse(f"{field} {config[field]}: one rank and alpha for every module is what Megatron's adapters take")
    for field in ("use_dora", "use_rslora", "layers_to_transform", "exclude_modules", "modules_to_save",
                  "trainable_token_indices"):
        if config.get(field):
            refuse(f"{field} {config[field]!r}: not supported")
    if config.get("bias", "none") != "none":
        refuse(f"bias {config['bias']!r}: LoRA biases are not supported")
    modules = config.get("target_modules") or []
    if isinstance(modules, str):
        refuse(f"target_modules {modules!r}: give the module names as a list")
    vision = [m for m in modules if m in VISION_PEFT_TARGETS]
    if vision and sorted(vision) != sorted(VISION_PEFT_TARGETS):
        refuse(f"target_modules {sorted(vision)} of the vision tower: the tower is adapted whole "
               f"({' '.join(VISION_PEFT_TARGETS)}) or not at all")
    modules = [m for m in modules if m not in VISION_PEFT_TARGETS]
    parameters = set(config.get("target_parameters") or [])
    router = ROUTER_PEFT_PARAMETER in parameters
    parameters.discard(ROUTER_PEFT_PARAMETER)
    experts = {f"mlp.experts.{p}" for p in EXPERT_PARAMETERS}
    if parameters and parameters != experts:
        refuse(f"target_parameters {sorted(parameters)}: only both of {sorted(experts)} (and the router's "
               f"{ROUTER_PEFT_PARAMETER}) are supported")
    try:
        return LoRASettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout") or 0.0),
                            target_modules=tuple(modules) + ((EXPERTS,) if parameters else ()),
                            vision=bool(vision), router=router)
    except (KeyError, ValueError) as e:
        refuse(str(e))


def read_peft_adapter(directory) -> tuple:
    """(lora.LoRASettings, {peft key: tensor}) of a peft adapter directory (adapter_config.json and
    adapter_model.safetensors, the files peft's save_pretrained writes)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not a peft adapter directory")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    settings = settings_from_peft_config(config, str(directory / ADAPTER_CONFIG))
    return settings, load_file(directory / ADAPTER_WEIGHTS)


def _get(peft: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in peft:
        raise ValueError(f"the PEFT adapter lacks '{key}' (an adapter of other target modules, or of another model)")
    return peft[key]


def _put_sections(wanted: dict, linear: str, b: torch.Tensor, like: Mapping[str, torch.Size]) -> None:
    keys = sorted((k for k in like if k.startswith(f"{linear}.lora.B_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    start = 0
    for k in keys:
        n = like[k][0]
        wanted[k] = b[start:start + n]
        start += n


__all__ = ["PEFT_PREFIX", "EXPERT_PARAMETERS", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "to_peft", "from_peft",
           "peft_config", "settings_from_peft_config", "read_peft_adapter"]
