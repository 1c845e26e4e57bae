"""The one owner of a parameter's checkpoint name: a module path in a live model -> the name the checkpoint, the
conversion table and every check use.

One model saves one set of names, whatever wraps it and whichever backend built it:
- megatron's wrappers (DistributedDataParallel, Float16Module: each a `module.` prefix) are looked through;
- local-backend layers keep their input norms as separate modules where Transformer Engine fuses them into the next
  linear; checkpoints use TE's names, so each TransformerLayer's own `sharded_state_dict_keys_map` renames them.
Conversion (`convert/model_state.py`), the key schema read from a meta model (`convert/megatron_keys.py`) and the GPU
checks ask here; the conversion table answers which rule owns a name (`table.rules_by_megatron_name`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import unwrap_model


def wrapper_prefix(model: torch.nn.Module) -> str:
    """The state-dict prefix megatron's wrappers put before the model's own names ("module.module." for
    DDP(Float16Module(model)), "" for the bare model)."""
    inner, prefix = unwrap_model(model), ""
    while model is not inner:
        model, prefix = model.module, prefix + "module."
    return prefix


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """{path: checkpoint name} of every tensor in `model`'s state dict, under the model's own paths and, where
    megatron's wrappers hold it, under the wrapped paths too (`module.module.decoder...`, as the wrapper's
    named_parameters spell them; its state_dict already uses the model's own)."""
    inner, prefix = unwrap_model(model), wrapper_prefix(model)
    renames: dict[str, str] = {}
    for name, module in inner.named_modules():
        if isinstance(module, TransformerLayer):
            for old, new in module.submodules_config.sharded_state_dict_keys_map.items():
                renames[f"{name}.{old}"] = f"{name}.{new}"
    out = {}
    for path in inner.state_dict(keep_vars=True):
        name = path
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[path] = name
    if prefix:
        out.update({prefix + path: name for path, name in list(out.items())})
    return out


def named_parameters_by_checkpoint_name(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{checkpoint name: parameter} of every parameter of `model` (both backends of one model give the same keys)."""
    inner = unwrap_model(model)
    names = checkpoint_names(inner)
    return {names[path]: param for path, param in inner.named_parameters()}


__all__ = ["wrapper_prefix", "checkpoint_names", "named_parameters_by_checkpoint_name"]
