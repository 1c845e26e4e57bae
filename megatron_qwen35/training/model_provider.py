"""megatron.training's `model_provider`: this rank's chunk of the Qwen3.5 model, from megatron.training's args."""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from megatron_qwen35.model import Qwen35GPTModel
from megatron_qwen35.provider import qwen35_gpt_model
from megatron_qwen35.training.flags import check_args_match, lora_settings_from_args, qwen35_config_from_args


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: TransformerConfig | None = None, pg_collection=None) -> Qwen35GPTModel:
    """pretrain_gpt's model_provider signature (megatron.training's get_model calls it once per virtual stage)."""
    from megatron.training import get_args

    args = get_args()
    cfg = qwen35_config_from_args(args)
    check_args_match(args, cfg)  # pretrain_qwen35.py checked already; a script of the user's may not have
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    backend = "local" if args.transformer_impl == "local" else "te"  # TE must then import: no quiet switch
    model = qwen35_gpt_model(cfg, config, backend=backend, pre_process=pre_process, post_process=post_process,
                             vp_stage=vp_stage, seq_length=args.seq_length,
                             gdn_kernels=getattr(args, "gdn_kernels", "fla"))  # a user's script may lack our flags
    # the launch check found no MTP weights in the --load checkpoint (training/checkpoint_check.py)
    model.mtp_absent_from_load = getattr(args, "qwen35_mtp_absent_from_load", False)
    lora = lora_settings_from_args(args)
    if lora is not None:  # adapters on, the rest frozen, before megatron wraps the model (DDP, optimizer)
        from megatron_qwen35.lora import apply_lora

        apply_lora(model, cfg, lora, seed=args.seed)
        model.lora_absent_from_load = getattr(args, "qwen35_lora_absent_from_load", False)
        model.checkpoint_adapters_only = True  # its checkpoints hold the adapters (lora/base.py)
        base = getattr(args, "qwen35_lora_base", None)  # --load holds adapters: the base comes from here
        if base is not None:
            _load_base_once_every_chunk_is_built(model, base, vp_stage, args.virtual_pipeline_model_parallel_size)
    return model


_chunks_awaiting_base: list[Qwen35GPTModel] = []


def _load_base_once_every_chunk_is_built(model: Qwen35GPTModel, base: str, vp_stage: int | None,
                                         virtual_stages: int | None) -> None:
    """Load the frozen base into this rank's model once all its virtual pipeline chunks exist. megatron.training's
    get_model builds the chunks one after another, and building one can be a collective (the tied embedding's
    all-reduce between the first and the last pipeline stage, which those ranks reach at different chunks): a load,
    itself collective, between two chunks' builds deadlocks the ranks (rank 0 in the embedding's all-reduce, rank 1 in
    the load's metadata exchange, measured at PP2 x VPP2)."""
    from megatron_qwen35.lora.base import load_base

    if vp_stage is None:
        load_base(model, base)
        return
    if vp_stage == 0:
        _chunks_awaiting_base.clear()
    _chunks_awaiting_base.append(model)
    if vp_stage == virtual_stages - 1:
        chunks = list(_chunks_awaiting_base)
        _chunks_awaiting_base.clear()
        load_base(chunks, base)
