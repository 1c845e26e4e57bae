"""forward_step, loss and datasets in the shape of Megatron-LM's pretrain_gpt.py, for Qwen3.5.

`pretrain_qwen35.py` hands them to `megatron.training.pretrain` on every machine; they read Megatron's global args
and tokenizer. The MTP loss and the MoE auxiliary loss are added inside the model the
Megatron way (MTPLossAutoScaler / MoEAuxLossAutoScaler), so the loss here is the language-model loss only.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_tp_rank

from megatron_qwen35.layers.context_parallel import batch_on_this_cp_rank
from megatron_qwen35.runtime import compute_device

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # the VL model's kwargs


def _stage_roles(vp_stage: int | None) -> tuple[bool, bool, bool]:
    """(first stage, last stage, holds MTP layers) for this (virtual) pipeline stage: the ones that read data (tokens;
    labels; MTP rolls tokens and labels itself)."""
    from megatron.training import get_args

    mtp = get_args().mtp_num_layers
    return (mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            bool(mtp) and mtp_on_this_rank(mtp_num_layers=mtp, ignore_virtual=False, vp_stage=vp_stage))


def data_flag(args) -> str:
    """How the run names its training data, for messages."""
    if getattr(args, "sft_data_path", None):
        return f"--sft-data-path {args.sft_data_path}"
    if getattr(args, "vl_data_path", None):
        return f"--vl-data-path {args.vl_data_path}"
    return f"--data-path {' '.join(args.data_path)}" if args.data_path else "the training data"


def reads_on_every_rank(args) -> bool:
    """Whether every rank reads its own copy of each micro-batch (VL samples, chat samples, pretraining sequences
    whose documents are separated: see `_every_rank_batch`); else TP rank 0 reads and broadcasts (GPTDataset)."""
    from megatron_qwen35.training.flags import separates_documents

    return bool(getattr(args, "vl_data_path", None) or getattr(args, "sft_data_path", None)
                or separates_documents(args))


def document_boundaries(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """cu_seqlens [n + 1] int32 of a pretraining sequence tokens [1, s]: a document ends after each end-of-document
    token (as megatron's --reset-attention-mask cuts it), the last one with the sequence."""
    if tokens.shape[0] != 1:
        raise ValueError(f"documents are separated one sequence per micro-batch (--micro-batch-size 1), got "
                         f"{tokens.shape[0]}")
    ends = (tokens[0, :-1] == eod_id).nonzero().flatten() + 1
    total = torch.tensor([tokens.shape[1]], device=tokens.device)
    return torch.cat([torch.zeros(1, dtype=ends.dtype, device=tokens.device), ends, total]).to(torch.int32)


def _check_token_ids(batch: dict, vocab_size: int) -> None:
    """A token id the embedding cannot look up ends a run in a bare IndexError (a device assert on GPUs): name it."""
    for key in ("tokens", "labels"):
        largest = int(batch[key].max())  # the loader's CPU tensor: no device sync
        if largest >= vocab_size:
            from megatron.training import get_args

            args = get_args()
            model = args.qwen35_preset or args.hf_config
            raise ValueError(f"the batch's {key} hold id {largest}, outside the {vocab_size}-token vocabulary of the "
                             f"model '{model}'; {data_flag(args)} was tokenized for a larger vocabulary: use the "
                             "model's tokenizer, or a model whose vocabulary covers it (tiny-demo has the real "
                             "Qwen3.5 vocabulary)")


def get_batch(data_iterator, vp_stage: int | None = None) -> dict[str, torch.Tensor | None]:
    """This rank's micro-batch: read on TP rank 0, broadcast over TP, sliced for context parallelism; every key None
    on a stage that needs no data (nothing is consumed there)."""
    from megatron.training import get_args

    args = get_args()
    if reads_on_every_rank(args):
        return _every_rank_batch(data_iterator, vp_stage)
    first, last, mtp_here = _stage_roles(vp_stage)
    if not (first or last or mtp_here):
        return {k: None for k in BATCH_KEYS}
    batch = None
    if mpu.get_tensor_model_parallel_rank() == 0 and data_iterator is not None:
        batch = next(data_iterator)
        _check_token_ids(batch, args.padded_vocab_size)
        batch = {k: (v.to(compute_device(), non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=mpu.get_context_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(), micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        is_pipeline_first_stage=first, is_pipeline_last_stage=last)
    batch.setdefault("cu_seqlens", None)  # ordinary (not packed) pretraining batches
    # megatron's own split, computed where the model's CP layers compute it (megatron's pins memory: GPU only)
    return batch_on_this_cp_rank(batch, mpu.get_context_parallel_group())


def _every_rank_batch(data_iterator, vp_stage: int | None) -> dict[str, torch.Tensor | None]:
    """A micro-batch of vision-language samples (data/vl_dataset.py) or of packed conversations
    (data/sft_dataset.py). Every rank reads its own copy, rather than tensor-parallel rank 0 broadcasting it: every
    pipeline stage needs the positions (mRoPE) or the document boundaries (packed sequences), and the pixels are many
    and of varying valid length. The ranks of one data-parallel rank's model replica read the same samples
    (megatron's sampler is keyed by the data-parallel rank).

    Packed sequences reach the model as megatron's THD PackedSeqParams (one sequence per micro-batch), with a padding
    mask that keeps padding out of the MoE router's counts and auxiliary loss."""
    from megatron.training import get_args, get_tokenizer

    from megatron_qwen35.data.sft_dataset import qwen35_sft_unpad
    from megatron_qwen35.data.vl_dataset import qwen35_vl_unpad
    from megatron_qwen35.training.flags import separates_documents

    args = get_args()
    first, _, _ = _stage_roles(vp_stage)
    batch = next(data_iterator)
    _check_token_ids(batch, args.padded_vocab_size)
    batch = {k: v.to(compute_device(), non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    cu = None
    if "cu_seqlens" in batch:  # packed conversations
        cu = qwen35_sft_unpad(batch)
    elif separates_documents(args):  # a pretraining sequence's documents, cut at its end-of-document tokens
        cu = document_boundaries(batch["tokens"], get_tokenizer().eod)
        batch["padding_mask"] = torch.zeros_like(batch["tokens"], dtype=torch.bool)
    vision = dict(zip(VISION_INPUTS, qwen35_vl_unpad(batch), strict=True)) if first and "pixel_values" in batch else {}
    cp_group = mpu.get_context_parallel_group()
    if vision and cp_group.size() > 1:
        vision["full_input_ids"] = batch["tokens"]  # the vision pads are placed before the split (vl_model.py)
    positions = batch["position_ids"]
    if positions.dim() == 3:
        positions = positions.transpose(0, 1).contiguous()  # mRoPE's [3, b, s]
    text = {"tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": batch["loss_mask"],
            "position_ids": positions, "cu_seqlens": cu}  # (positions: megatron's THD rope restarts per document)
    if cu is not None:
        text["padding_mask"] = batch["padding_mask"]
    out = {**batch_on_this_cp_rank(text, cp_group), "attention_mask": None, **vision}
    if cu is not None:
        out["packed_seq_params"] = thd_packed_seq_params(cu)
    return out


def thd_packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """megatron's THD PackedSeqParams of one packed sequence whose documents end at `cu_seqlens` (int32 [n + 1], on
    the model's device), each document its own length (already aligned where context parallelism needs it)."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


SPIKY_LOSS_FACTOR = 10  # pretrain_gpt's: a loss this many times its running value is reported as spiky


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed masked token loss and the token count. The schedule divides by the counts summed over the whole global
    batch (--calculate-per-token-loss, which pretrain_qwen35.py sets): so how documents are packed, which tokens are
    masked and how context parallelism splits a sequence change nothing in the objective, and no rank's sum is
    weighted here. First, the checks pretrain_gpt runs through megatron's rerun state machine: a NaN or Inf in this
    rank's loss stops the run (--check-for-nan-in-loss-and-grad, on by default), a spiky one is reported
    (--check-for-spiky-loss)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    _check_loss(loss)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def _check_loss(loss: torch.Tensor) -> None:
    """pretrain_gpt's checks, as megatron.training's args ask (its defaults where a schedule of the user's runs
    without them: NaN / Inf checked, spikes not)."""
    from argparse import Namespace

    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    try:
        args = get_args()
    except AssertionError:  # megatron.training's args are not set up
        args = Namespace(check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=False)
    machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                    message=f"found {what} in local forward loss calculation")
    if args.check_for_spiky_loss:
        machine.validate_result(result=loss, rejection_func=partial(machine.is_unexpectedly_large,
                                                                    threshold=SPIKY_LOSS_FACTOR, context="loss"),
                                message="Spiky loss", tolerance=0.0, fatal=False)


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch through `model`; returns (per-token losses, loss_func) as Megatron's schedules expect."""
    vp_stage = get_attr_wrapped_model(model, "vp_stage")  # the model arrives wrapped: DDP(Float16Module(GPTModel))
    batch = get_batch(data_iterator, vp_stage)
    vision = {k: batch[k] for k in (*VISION_INPUTS, "full_input_ids") if batch.get(k) is not None}  # first stage
    per_token = get_attr_wrapped_model(model, "config").calculate_per_token_loss  # what the schedule reads
    if not per_token and mpu.get_context_parallel_world_size() > 1:
        raise ValueError("context parallelism needs --calculate-per-token-loss (pretrain_qwen35.py sets it): with "
                         "megatron's per-micro-batch mean, each rank's mean over its own tokens is averaged, which "
                         "is not the sequence's mean where masked tokens fall unevenly")
    packed = {k: batch[k] for k in ("packed_seq_params", "padding_mask") if batch.get(k) is not None}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"], **packed, **vision)
    return output, partial(loss_func, batch["loss_mask"])


def is_dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    """Data is read on TP rank 0 of stages that consume it (first: tokens; last: labels), or on every rank where
    every rank reads its own micro-batch (documents separated: every stage needs their boundaries)."""
    from megatron.training import get_args

    if reads_on_every_rank(get_args()):
        return True
    first = mpu.is_pipeline_first_stage(ignore_virtual=True)
    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    return (first or last) and mpu.get_tensor_model_parallel_rank() == 0


def gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    from megatron.training import get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: int | None = None):
    """Megatron's GPTDataset on indexed data (with blends), or MockGPTDataset under --mock-data."""
    from megatron.training import get_args

    args = get_args()
    if getattr(args, "sft_data_path", None):  # a script of the user's may parse without our flags
        return _sft_datasets(args, train_val_test_num_samples)
    if getattr(args, "vl_data_path", None):
        return _vl_datasets(args, train_val_test_num_samples)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    config = gpt_dataset_config_from_args(args)
    if config.split_matrix is not None:
        # megatron builds every part its --split names, also one it asks no samples of (evaluation off): a validation
        # part without a full sequence then asserts, and one without a document never finishes indexing
        config.split_matrix = [None if not wanted else part
                               for part, wanted in zip(config.split_matrix, train_val_test_num_samples, strict=True)]
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, is_dataset_built_on_rank,
                                         config).build()


# megatron.training.pretrain reads this to build datasets on every rank that needs them.
train_valid_test_datasets_provider.is_distributed = True


def _sft_datasets(args, train_val_test_num_samples):
    """data/sft_dataset.py's packed conversations on every rank (see `_every_rank_batch`), split as --split says;
    each conversation aligned to 2 x CP (context parallelism cuts every document into 2 x CP chunks)."""
    from megatron_qwen35.data.sft_dataset import build_sft_datasets
    from megatron_qwen35.training.flags import qwen35_config_from_args

    cfg = qwen35_config_from_args(args)
    cp = args.context_parallel_size
    return build_sft_datasets(args.sft_data_path, args.seq_length, train_val_test_num_samples, vision=cfg.vision,
                              seed=args.seed, split=vl_split(args), pack=not args.no_sft_packing,
                              align=2 * cp if cp > 1 else 1)


def _vl_datasets(args, train_val_test_num_samples):
    """data/vl_dataset.py's datasets on every rank (see `_every_rank_batch`), split as --split says."""
    from megatron_qwen35.data.vl_dataset import build_vl_datasets
    from megatron_qwen35.training.flags import qwen35_config_from_args

    cfg = qwen35_config_from_args(args)
    if cfg.vision is None:
        raise SystemExit(f"error: --vl-data-path needs a model with a vision tower; '{cfg.name}' has none")
    return build_vl_datasets(args.vl_data_path, args.seq_length, train_val_test_num_samples, vision=cfg.vision,
                             seed=args.seed, split=vl_split(args))


def vl_split(args) -> str:
    """--split for VL and chat data (megatron sets its default only for --data-path)."""
    from megatron_qwen35.data.vl_dataset import DEFAULT_SPLIT

    return args.split if args.split is not None else DEFAULT_SPLIT
