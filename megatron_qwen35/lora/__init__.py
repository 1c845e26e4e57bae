"""LoRA on Megatron's linears (every one of the language model's by default: Gated DeltaNet, attention, MLP, shared
expert, each routed expert; the MTP layer's, the routers' and the vision tower's on request), trained through the
same recipes and entry point, exact against Hugging Face peft.

- `targets.py`: which linears, named as transformers names them, and how each maps onto Megatron's fused linears.
- `adapter.py`: the adapter on one linear, in megatron's tensor / sequence / expert parallel layout.
- `apply.py`: `apply_lora(model, cfg, LoRASettings(...))`: adapters on, everything else frozen.
- `peft_format.py`: adapters to and from a Hugging Face PEFT adapter (transformers' module names).
- `merge.py`: the adapters' update folded into the base weights (the merged export).
- `base.py`: a LoRA run's checkpoints hold the adapters alone; the base they were trained on, named again wherever it
  is needed, is checked against the fingerprint they record.
"""

from megatron_qwen35.lora.apply import (
    LoRASettings,
    adapter_whole_shapes,
    apply_lora,
    load_adapter_tensors,
    lora_parameters,
)
from megatron_qwen35.lora.peft_format import from_peft, to_peft
from megatron_qwen35.lora.targets import TARGET_MODULES

__all__ = ["LoRASettings", "apply_lora", "lora_parameters", "adapter_whole_shapes", "load_adapter_tensors",
           "TARGET_MODULES", "from_peft", "to_peft"]
