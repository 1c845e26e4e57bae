"""The Qwen3.5 architecture: one source of truth for a model's shape, read from a preset name or a Hugging Face
config.json, written back to a config.json, and turned into megatron-core's TransformerConfig.

    model.py     Qwen35Config (text model) and Qwen35VisionConfig (vision tower): fields, checks, (de)serialisation
    presets.py   the public sizes and the tiny test / demo shapes (`qwen35_preset`)
    hf.py        Hugging Face config.json <-> Qwen35Config (`qwen35_config_from_hf`, `qwen35_config_to_hf`)
    megatron.py  MEGATRON_ARCHITECTURE, the architecture as megatron's arguments and TransformerConfig fields, and
                 `qwen35_transformer_config` (the machine's device and backend are its caller's choice)

megatron-core's TransformerConfig already has every Qwen3.5 switch (attention_output_gate, moe_shared_expert_gate,
layernorm_zero_centered_gamma, the `linear_*` Gated DeltaNet fields, mtp_num_layers); rotary settings go to GPTModel
through `layers/rotary.py`.
"""

from megatron_qwen35.config.hf import qwen35_config_from_hf, qwen35_config_to_hf
from megatron_qwen35.config.megatron import (
    MEGATRON_ARCHITECTURE,
    MegatronField,
    linear_attention_pattern,
    megatron_fields,
    qwen35_transformer_config,
)
from megatron_qwen35.config.model import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    MULTIMODAL_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    Qwen35Config,
    Qwen35VisionConfig,
)
from megatron_qwen35.config.presets import PRESETS, qwen35_preset

__all__ = ["FULL_ATTENTION", "LINEAR_ATTENTION", "MEGATRON_ARCHITECTURE", "MULTIMODAL_MODEL_TYPES", "PRESETS",
           "TEXT_MODEL_TYPES", "MegatronField", "Qwen35Config", "Qwen35VisionConfig", "linear_attention_pattern",
           "megatron_fields", "qwen35_config_from_hf", "qwen35_config_to_hf", "qwen35_preset",
           "qwen35_transformer_config"]
