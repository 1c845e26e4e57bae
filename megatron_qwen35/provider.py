"""Build Qwen3.5 as megatron-core's GPTModel (megatron.training's `model_provider` is training/model_provider.py).

GPTModel (not HybridModel): one TransformerLayer per Hugging Face decoder layer, our own final norm on the local
backend, and room for mRoPE (HybridModel rejects it). megatron-core 0.19 marks GPTModel deprecated in favour of
HybridModel and logs so on every build; model.py leaves that notice out of ours. Nothing here reads megatron.training's
arguments.
"""

from __future__ import annotations

from functools import partial

from megatron.core.transformer import TransformerConfig

from megatron_qwen35.config import Qwen35Config, megatron_fields
from megatron_qwen35.layers.rotary import qwen35_position_embedding_kwargs
from megatron_qwen35.model import Qwen35GPTModel
from megatron_qwen35.parallel_layout import check_transformer_config_layout
from megatron_qwen35.runtime import check_runtime_patches, transformer_engine_import_error
from megatron_qwen35.specs.layer_specs import qwen35_block_spec, qwen35_mtp_block_spec


def resolve_backend(config: TransformerConfig, backend: str | None = None) -> str:
    """An explicit backend wins; else the config's `transformer_impl` ('local', or Transformer Engine). Transformer
    Engine must import where it is chosen: a broken or missing TE is an error naming its import failure, never a
    quiet switch to the (slower) local modules."""
    if backend is None:
        backend = "local" if config.transformer_impl == "local" else "te"
    if backend == "te":
        error = transformer_engine_import_error()
        if error is not None:
            raise RuntimeError(f"the Transformer Engine backend is chosen (megatron's default --transformer-impl "
                               f"transformer_engine) but transformer_engine does not import here "
                               f"({type(error).__name__}: {error}); install it (pip install -e '.[gpu]'), or choose "
                               "the local backend explicitly (--transformer-impl local in training, "
                               "backend='local' for load_model, --backend local for tools/generate.py)")
    return backend


def qwen35_gpt_model(cfg: Qwen35Config, config: TransformerConfig, *, backend: str | None = None,
                     pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                     seq_length: int | None = None, gdn_kernels: str = "fla") -> Qwen35GPTModel:
    """The (stage of the) Qwen3.5 model described by `cfg` (with its vision tower when it has one), parallelised as
    `config` says (`seq_length`, the training sequence length when known, is checked against context parallelism;
    `gdn_kernels`: "fla" or "torch" for the Gated DeltaNet layers' CUDA tensors, layers/gdn_ops/fla.py)."""
    _check_consistent(cfg, config)
    check_transformer_config_layout(cfg, config, seq_length)  # a layout that cannot split the model is named first
    check_runtime_patches("building a Qwen3.5 model")  # applied by the entry points, never by a build
    backend = resolve_backend(config, backend)
    if cfg.vision is not None:  # the vision tower and mRoPE (vl_model.py); otherwise the same GPTModel
        from megatron_qwen35.vl_model import Qwen35VLModel

        model_class = partial(Qwen35VLModel, cfg, backend=backend)
    else:
        model_class = Qwen35GPTModel
    return model_class(
        config=config,
        transformer_layer_spec=qwen35_block_spec(config, backend=backend, vp_stage=vp_stage, gdn_kernels=gdn_kernels),
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
    wrong = {f.field: (getattr(config, f.field), f.value(cfg)) for f in megatron_fields(cfg)
             if f.field is not None and getattr(config, f.field) != f.value(cfg)}
    if wrong:
        detail = ", ".join(f"{f}={got!r} (model '{cfg.name}' needs {want!r})" for f, (got, want) in wrong.items())
        raise ValueError(f"TransformerConfig contradicts the Qwen3.5 architecture: {detail}")
