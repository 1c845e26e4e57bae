"""A live megatron model's tensors under the conversion table's (checkpoint) names, and in-process HF loading.

Names come from `convert/names.py` (the one owner of a parameter's checkpoint name), so the table sees one naming
whichever backend built the model and whatever wraps it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.names import checkpoint_names
from megatron_qwen35.convert.table import (
    VISION_PREFIX,
    NamedRule,
    check_names,
    megatron_to_hf,
    qwen35_rules,
    vision_rules,
)


def megatron_named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{checkpoint-style name: live parameter tensor} of an unsharded (TP=1, PP=1, EP=1) model."""
    names = checkpoint_names(model)
    return {names[name]: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if not name.endswith("_extra_state")}


def load_hf_state_dict(model: torch.nn.Module, cfg: Qwen35Config, hf_state: Mapping[str, torch.Tensor],
                       **rule_options) -> None:
    """Copy a Hugging Face state dict into an unsharded megatron model, checking every name and shape."""
    targets = megatron_named_tensors(model)
    if not rule_options.get("include_mtp", True):  # leave the model's own MTP weights as they are
        targets = {k: v for k, v in targets.items() if not k.startswith("mtp.")}
    _copy_by_rules(targets, qwen35_rules(cfg, **rule_options), _without_tied_head(hf_state, cfg), cfg)


def load_hf_vision_state_dict(tower: torch.nn.Module, cfg: Qwen35Config, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy transformers' `Qwen3_5VisionModel` state dict (its own names, or all under `model.visual.`) into an
    unsharded `Qwen35VisionModel` of `cfg.vision`, checking every name and shape."""
    prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in hf_state) else ""
    rules = vision_rules(cfg, hf_prefix=prefix, megatron_prefix="")
    _copy_by_rules(megatron_named_tensors(tower), rules, hf_state, cfg)


def _copy_by_rules(targets: Mapping[str, torch.Tensor], rules: list[NamedRule], hf_state: Mapping[str, torch.Tensor],
                   cfg: Qwen35Config) -> None:
    """Every rule's Hugging Face tensors, transformed, into the model's tensors: names on both sides checked first,
    then each shape."""
    check_names(set(hf_state), {n for r in rules for n in r.hf}, side="Hugging Face")
    check_names(set(targets), {n for r in rules for n in r.megatron}, side="Megatron model")
    with torch.no_grad():
        for rule in rules:
            out = rule.transform.to_megatron([hf_state[n] for n in rule.hf], cfg)
            for name, tensor in zip(rule.megatron, out, strict=True):
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


def export_hf_vision_state_dict(tower: torch.nn.Module, cfg: Qwen35Config,
                                *, hf_prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of transformers' `Qwen3_5VisionModel` (names under `hf_prefix`) of an unsharded
    `Qwen35VisionModel`."""
    rules = vision_rules(cfg, hf_prefix=hf_prefix, megatron_prefix="")
    named = {k: v.detach() for k, v in megatron_named_tensors(tower).items()}
    check_names(set(named), {n for r in rules for n in r.megatron}, side="Megatron model")
    out = {}
    for rule in rules:
        out.update(zip(rule.hf, rule.transform.to_hf([named[n] for n in rule.megatron], cfg), strict=True))
    return out


__all__ = ["megatron_named_tensors", "load_hf_state_dict", "export_hf_state_dict", "qwen35_rules",
           "load_hf_vision_state_dict", "export_hf_vision_state_dict"]
