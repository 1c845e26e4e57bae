"""The Qwen3.5 architecture in Megatron's terms, written once: `MEGATRON_ARCHITECTURE` (each fact as megatron's
argument and TransformerConfig field) and `qwen35_transformer_config`. training/flags.py renders the table as flags
and refuses contradicting ones; the provider checks a TransformerConfig against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_qwen35.config.model import LINEAR_ATTENTION, Qwen35Config


def linear_attention_pattern(cfg: Qwen35Config) -> list[int]:
    """Megatron's per-layer pattern: 1 = Gated DeltaNet, 0 = full attention."""
    return [1 if t == LINEAR_ATTENTION else 0 for t in cfg.layer_types]


@dataclass(frozen=True)
class MegatronField:
    """One fact of the architecture as Megatron states it: the argument (`dest` of megatron.training's parser) and,
    where it has one, the TransformerConfig field it becomes; `value(cfg)` is what Qwen3.5 needs there."""

    dest: str
    value: Any  # Callable[[Qwen35Config], Any]
    config_field: str | None = ""  # "" = the same name as dest; None = not a TransformerConfig field (GPTModel's)
    moe_only: bool = False  # checked for MoE models only (megatron ignores these flags for dense ones)
    may_be_off: bool = False  # a run may turn it off (None or 0): a training aid beside the model, not its function

    @property
    def field(self) -> str | None:
        return self.dest if self.config_field == "" else self.config_field


def _fixed(value):
    return lambda cfg: value


_F = MegatronField
# Every Megatron argument that changes the model's function or shape. training/flags.py renders them as flags,
# refuses a parsed flag that differs, and qwen35_transformer_config / the provider's check read the config fields.
# Training knobs (dropout, init, aux-loss weight and type, dispatcher, recompute, precision) are not here.
MEGATRON_ARCHITECTURE: tuple[MegatronField, ...] = (
    _F("num_layers", lambda c: c.num_layers),
    _F("hidden_size", lambda c: c.hidden_size),
    _F("num_attention_heads", lambda c: c.num_attention_heads),
    _F("group_query_attention", _fixed(True), None),
    _F("num_query_groups", lambda c: c.num_query_groups),
    _F("kv_channels", lambda c: c.head_dim),  # 256, not hidden / heads
    _F("ffn_hidden_size", lambda c: c.moe_ffn_hidden_size if c.is_moe else c.ffn_hidden_size),
    _F("normalization", _fixed("RMSNorm")),
    _F("layernorm_epsilon", lambda c: c.norm_epsilon),
    _F("layernorm_zero_centered_gamma", _fixed(True)),  # Hugging Face's (1 + w) norms; w starts at zero
    _F("qk_layernorm", _fixed(True)),
    _F("attention_output_gate", _fixed(True)),  # q_proj's per-head [query | gate] half: out * sigmoid(gate)
    _F("swiglu", _fixed(True), "gated_linear_unit"),  # with activation_func = silu
    _F("add_bias_linear", _fixed(False)),
    _F("add_qkv_bias", _fixed(False)),
    _F("apply_residual_connection_post_layernorm", _fixed(False)),
    _F("position_embedding_type", _fixed("rope"), None),
    _F("rotary_percent", lambda c: c.partial_rotary_factor, None),  # rope on the first 64 of 256 dims
    _F("rotary_base", lambda c: int(c.rope_theta), None),
    _F("rotary_interleaved", _fixed(False)),  # rotate-half, as transformers (its "interleaved" is mRoPE's sections)
    _F("rotary_seq_len_interpolation_factor", _fixed(None), None),
    _F("use_rope_scaling", _fixed(False), None),
    _F("no_rope_freq", _fixed(None)),
    _F("window_size", _fixed(None)),
    _F("qk_l2_norm", _fixed(False)),
    _F("multi_latent_attention", _fixed(False)),
    _F("max_position_embeddings", lambda c: c.max_position_embeddings, None),
    _F("experimental_attention_variant", _fixed("gated_delta_net")),
    _F("linear_attention_freq", linear_attention_pattern),
    _F("linear_conv_kernel_dim", lambda c: c.linear_conv_kernel_dim),
    _F("linear_key_head_dim", lambda c: c.linear_key_head_dim),
    _F("linear_value_head_dim", lambda c: c.linear_value_head_dim),
    _F("linear_num_key_heads", lambda c: c.linear_num_key_heads),
    _F("linear_num_value_heads", lambda c: c.linear_num_value_heads),
    _F("vocab_size", lambda c: c.vocab_size, None),
    _F("make_vocab_size_divisible_by", _fixed(1), None),  # the checkpoint's vocabulary, unpadded
    _F("untie_embeddings_and_output_weights", lambda c: not c.tie_word_embeddings, None),
    # the multi-token-prediction layer trains beside the model (transformers' model never runs it): a run may leave it
    # out (--mtp-num-layers 0), e.g. to fine-tune a checkpoint saved without it
    _F("mtp_num_layers", lambda c: c.mtp_num_layers or None, may_be_off=True),
    _F("num_experts", lambda c: c.num_experts, "num_moe_experts"),
    _F("moe_router_topk", lambda c: c.moe_router_topk, moe_only=True),
    _F("moe_ffn_hidden_size", lambda c: c.moe_ffn_hidden_size, moe_only=True),
    _F("moe_shared_expert_intermediate_size", lambda c: c.moe_shared_expert_intermediate_size, moe_only=True),
    _F("moe_shared_expert_gate", _fixed(True), moe_only=True),  # sigmoid(x @ w) scales the shared expert
    _F("moe_layer_freq", _fixed(1), moe_only=True),  # every decoder layer is MoE
    # softmax over the top-k logits == transformers' softmax over all, top-k, renormalise
    _F("moe_router_pre_softmax", _fixed(False), moe_only=True),
    _F("moe_router_score_function", _fixed("softmax"), moe_only=True),
    _F("moe_router_topk_scaling_factor", _fixed(None), moe_only=True),
    _F("moe_router_num_groups", _fixed(None), moe_only=True),
    _F("moe_router_group_topk", _fixed(None), moe_only=True),
    _F("moe_router_enable_expert_bias", _fixed(False), moe_only=True),  # transformers' router has no bias
    _F("moe_latent_size", _fixed(None), moe_only=True),
)


def megatron_fields(cfg: Qwen35Config) -> tuple[MegatronField, ...]:
    """The MEGATRON_ARCHITECTURE rows that apply to `cfg` (the MoE rows only to MoE models)."""
    return tuple(f for f in MEGATRON_ARCHITECTURE if cfg.is_moe or not f.moe_only)


BACKENDS = ("te", "local")  # Transformer Engine's modules, or megatron's local PyTorch ones (with ours)
DEVICES = ("cuda", "cpu")


def qwen35_transformer_config(cfg: Qwen35Config, *, backend: str = "local", device: str = "cpu", **overrides):
    """megatron-core's TransformerConfig for `cfg` on `backend` ("te" or "local") and `device` ("cuda" or "cpu"),
    both the caller's choice (nothing here probes the machine); `overrides` set parallelism, precision, recompute...

    The architecture comes from MEGATRON_ARCHITECTURE; the rest are defaults for running it on that machine: the
    fusions that need CUDA kernels on CUDA only, megatron's fused rope (Transformer Engine's) only with TE on CUDA,
    weights initialised on the CPU without CUDA. Users override any field.
    """
    from megatron.core.transformer import TransformerConfig

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    cuda = device == "cuda"
    kw: dict[str, Any] = {f.field: f.value(cfg) for f in megatron_fields(cfg) if f.field is not None}
    kw.update(
        transformer_impl="transformer_engine" if backend == "te" else "local",
        activation_func=F.silu,  # swiglu's activation (megatron.training sets it from --swiglu)
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=cuda,
        masked_softmax_fusion=cuda,
        persist_layer_norm=cuda,
        gradient_accumulation_fusion=False,
        # megatron's fused rope is TE's, and reads one position row: a VL model's positions differ per sample
        apply_rope_fusion=cuda and backend == "te" and cfg.vision is None,
        use_cpu_initialization=not cuda,
    )
    if cfg.is_moe:
        kw.update(
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=cfg.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
        )
    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1:  # megatron requires it; p2p carries params_dtype
        kw.setdefault("pipeline_dtype", kw.get("params_dtype", torch.float32))
    if kw.get("virtual_pipeline_model_parallel_size"):  # as megatron.training: batched p2p mixes up PP2's messages
        kw.setdefault("overlap_p2p_comm", True)
        kw.setdefault("batch_p2p_comm", False)
    return TransformerConfig(**kw)
