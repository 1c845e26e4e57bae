"""The vision tower's TransformerConfig: the ViT's own shape, and only the language model's parallel and precision
settings.

Its blocks are plain pre-norm ViT blocks (transformers' `Qwen3_5VisionBlock`): LayerNorm with bias, multi-head
attention with a qkv bias, an MLP fc1 -> gelu(tanh) -> fc2 with biases, residuals around both.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_qwen35.config import Qwen35VisionConfig

# transformers' ACT2FN names -> the function; megatron's MLP calls `activation_func` on fc1's output
ACTIVATIONS = {"gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}
LAYERNORM_EPS = 1e-6  # transformers' nn.LayerNorm(eps=1e-6) in every block and in the merger


def vision_transformer_config(vision: Qwen35VisionConfig, config: TransformerConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig of the tower described by `vision`, inside the model that `config` (the
    language model's) parallelises.

    From `config` it takes the tensor-parallel size (heads are split over TP), parameter dtype, bf16 / fp16, CPU
    initialisation, whether to initialise, and the init std. The rest is the tower's own, whatever the text model
    does: no sequence parallelism (its tokens are patches, not the text's sequence), no context parallelism (every CP
    rank encodes all of its micro-batch's images), no pipeline split (it lives on the first stage), no experts.
    """
    if vision.hidden_act not in ACTIVATIONS:
        raise ValueError(f"vision hidden_act '{vision.hidden_act}' is not supported; "
                         f"choose one of {sorted(ACTIVATIONS)}")
    return TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,  # plain multi-head attention
        kv_channels=vision.hidden_size // vision.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=LAYERNORM_EPS,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[vision.hidden_act],
        # megatron fuses only F.gelu with the bias, and its fused kernel is the tanh form while unfused F.gelu is erf:
        # off, so every device computes the activation named in the config
        bias_activation_fusion=False,
        # the rope angles are per patch (2-D); Transformer Engine's fused THD rope restarts positions per sequence
        apply_rope_fusion=False,
        rotary_interleaved=False,  # rotate-half, as transformers' apply_rotary_pos_emb_vision
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        sequence_parallel=False,
        context_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        params_dtype=config.params_dtype,
        bf16=config.bf16,
        fp16=config.fp16,
        use_cpu_initialization=config.use_cpu_initialization,
        perform_initialization=config.perform_initialization,
        init_method_std=config.init_method_std,
    )
