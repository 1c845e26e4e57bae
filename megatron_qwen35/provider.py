"""Build Qwen3.5 as megatron-core's GPTModel; `model_provider` is the pretrain_gpt-style entry point.

GPTModel (not HybridModel): one TransformerLayer per Hugging Face decoder layer, our own final norm on the local
backend, and room for mRoPE (HybridModel rejects it). `model_provider` is the one place that reads Megatron's args.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_qwen35.config import Qwen35Config, qwen35_config_from_hf, qwen35_preset, qwen35_transformer_config
from megatron_qwen35.layers.rotary import qwen35_position_embedding_kwargs
from megatron_qwen35.layers.context_parallel import use_cp_global_mtp_token_counts
from megatron_qwen35.parallel_layout import check_transformer_config_layout
from megatron_qwen35.specs.layer_specs import default_backend, qwen35_block_spec, qwen35_mtp_block_spec


def resolve_backend(config: TransformerConfig, backend: str | None = None) -> str:
    """An explicit backend wins; `transformer_impl='local'` means local; otherwise TE where it imports."""
    if backend is not None:
        return backend
    return "local" if config.transformer_impl == "local" else default_backend()


def qwen35_gpt_model(cfg: Qwen35Config, config: TransformerConfig, *, backend: str | None = None,
                     pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                     seq_length: int | None = None) -> GPTModel:
    """The (stage of the) Qwen3.5 text model described by `cfg`, parallelised as `config` says (`seq_length`, the
    training sequence length when known, is checked against context parallelism)."""
    _check_consistent(cfg, config)
    check_transformer_config_layout(cfg, config, seq_length)  # a layout that cannot split the model is named first
    if config.context_parallel_size > 1 and config.mtp_num_layers:
        use_cp_global_mtp_token_counts()  # megatron's MTP loss weighs tokens per CP rank otherwise
    backend = resolve_backend(config, backend)
    return GPTModel(
        config=config,
        transformer_layer_spec=qwen35_block_spec(config, backend=backend, vp_stage=vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        mtp_block_spec=qwen35_mtp_block_spec(config, backend=backend, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **qwen35_position_embedding_kwargs(cfg),
    )


def _check_consistent(cfg: Qwen35Config, config: TransformerConfig) -> None:
    """A TransformerConfig that contradicts the architecture would build a different model: say which field."""
    expected = qwen35_transformer_config(cfg, tensor_model_parallel_size=config.tensor_model_parallel_size,
                                         pipeline_model_parallel_size=config.pipeline_model_parallel_size)
    fields = ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "ffn_hidden_size", "num_moe_experts", "moe_router_topk", "moe_shared_expert_intermediate_size",
              "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "linear_conv_kernel_dim", "linear_attention_freq", "attention_output_gate", "qk_layernorm",
              "layernorm_zero_centered_gamma", "gated_linear_unit"]
    wrong = {f: (getattr(config, f), getattr(expected, f)) for f in fields if getattr(config, f) != getattr(expected, f)}
    if wrong:
        detail = ", ".join(f"{f}={got!r} (model '{cfg.name}' needs {want!r})" for f, (got, want) in wrong.items())
        raise ValueError(f"TransformerConfig contradicts the Qwen3.5 architecture: {detail}")


def qwen35_config_from_args(args) -> Qwen35Config:
    """The architecture named by `--qwen35-preset NAME` or `--hf-config PATH` (exactly one)."""
    preset, hf_config = getattr(args, "qwen35_preset", None), getattr(args, "hf_config", None)
    if (preset is None) == (hf_config is None):
        raise ValueError("give exactly one of --qwen35-preset NAME or --hf-config PATH")
    return qwen35_preset(preset) if preset is not None else qwen35_config_from_hf(hf_config)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: TransformerConfig | None = None, pg_collection=None) -> GPTModel:
    """pretrain_gpt's model_provider signature: reads Megatron's global args, returns this rank's model chunk."""
    from megatron.training import get_args

    from megatron_qwen35.training.flags import check_args_match

    args = get_args()
    cfg = qwen35_config_from_args(args)
    check_args_match(args, cfg)  # a user flag that contradicts the architecture is named here
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    backend = "local" if getattr(args, "transformer_impl", None) == "local" else None
    return qwen35_gpt_model(cfg, config, backend=backend, pre_process=pre_process, post_process=post_process,
                            vp_stage=vp_stage, seq_length=args.seq_length)
