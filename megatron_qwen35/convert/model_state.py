"""A live megatron model's tensors under the conversion table's (checkpoint) names, and in-process HF loading.

Local-backend layers keep their input norms as separate modules; the checkpoint (and Transformer Engine) name them
after the fused linear. `megatron_named_tensors` applies each layer's own `sharded_state_dict_keys_map`, so the
table sees one naming whichever backend built the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.table import check_names, hf_to_megatron, megatron_to_hf, qwen35_rules


def table_names(model: torch.nn.Module) -> dict[str, str]:
    """{state_dict name: checkpoint-style (table) name} of every tensor in `model`'s state dict."""
    renames: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            for old, new in module.submodules_config.sharded_state_dict_keys_map.items():
                renames[f"{name}.{old}"] = f"{name}.{new}"
    out = {}
    for name in model.state_dict(keep_vars=True):
        table_name = name
        for old, new in renames.items():
            if name.startswith(old):
                table_name = new + name[len(old):]
                break
        out[name] = table_name
    return out


def megatron_named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{checkpoint-style name: live parameter tensor} of an unsharded (TP=1, PP=1, EP=1) model."""
    names = table_names(model)
    return {names[name]: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if not name.endswith("_extra_state")}


def load_hf_state_dict(model: torch.nn.Module, cfg: Qwen35Config, hf_state: Mapping[str, torch.Tensor],
                       **rule_options) -> None:
    """Copy a Hugging Face state dict into an unsharded megatron model, checking every name and shape."""
    rules = qwen35_rules(cfg, **rule_options)
    hf_state = _without_tied_head(hf_state, cfg)
    check_names(set(hf_state), {n for r in rules for n in r.hf}, side="Hugging Face")
    targets = megatron_named_tensors(model)
    if not rule_options.get("include_mtp", True):  # leave the model's own MTP weights as they are
        targets = {k: v for k, v in targets.items() if not k.startswith("mtp.")}
    check_names(set(targets), {n for r in rules for n in r.megatron}, side="Megatron model")
    with torch.no_grad():
        for name, tensor in hf_to_megatron(hf_state, cfg, **rule_options):
            target = targets[name]
            if target.shape != tensor.shape:
                raise ValueError(f"shape of '{name}' is {tuple(tensor.shape)} from Hugging Face but the model "
                                 f"has {tuple(target.shape)}")
            target.copy_(tensor)


def _without_tied_head(hf_state: Mapping[str, torch.Tensor], cfg: Qwen35Config) -> Mapping[str, torch.Tensor]:
    """A tied model's in-memory state dict repeats the embedding as lm_head.weight; files omit it."""
    if not cfg.tie_word_embeddings or "lm_head.weight" not in hf_state:
        return hf_state
    return {k: v for k, v in hf_state.items() if k != "lm_head.weight"}


def export_hf_state_dict(model: torch.nn.Module, cfg: Qwen35Config, **rule_options) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of an unsharded megatron model."""
    named = {k: v.detach() for k, v in megatron_named_tensors(model).items()}
    return dict(megatron_to_hf(named, cfg, **rule_options))


__all__ = ["table_names", "megatron_named_tensors", "load_hf_state_dict", "export_hf_state_dict", "qwen35_rules"]
