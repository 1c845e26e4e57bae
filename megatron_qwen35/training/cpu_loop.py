"""Pretraining without CUDA: a compact loop from megatron-core's own parts, driven by Megatron's own flags.

Why not `megatron.training.pretrain`: it assumes CUDA in dozens of places (device placement, timers, memory
reports, fused kernels). Its pieces that do not are reused as they are: argument parsing and validation, global
args / tokenizer / micro-batch calculator, the data loader and sampler, the LR scheduler. The step itself is
megatron-core's: `get_forward_backward_func` (1F1B, interleaved PP), DDP with `finalize_model_grads`,
`get_megatron_optimizer` (plain or distributed), and dist_checkpointing with the optimizer's sharded state, so a
CPU checkpoint resumes exactly (the next step's loss equals that of an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from megatron_qwen35.runtime import ensure_cpu_runtime, initialize_parallel

# Megatron kernel fusions that need CUDA / Transformer Engine; on CPU the unfused paths compute the same thing.
_CPU_FLAG_OVERRIDES = dict(apply_rope_fusion=False, bias_gelu_fusion=False, bias_swiglu_fusion=False,
                           bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                           persist_layer_norm=False, use_cpu_initialization=True, transformer_impl="local",
                           overlap_grad_reduce=False, overlap_param_gather=False, moe_grouped_gemm=False)


def parse_cpu_args(argv: list[str], extra_args_provider):
    """Megatron's parse_args + validate_args on `argv` (architecture flags already expanded), adapted for CPU."""
    from megatron.training.arguments import parse_args, validate_args

    saved, sys.argv = sys.argv, [sys.argv[0]] + list(argv)
    try:
        args = parse_args(extra_args_provider=extra_args_provider)
    finally:
        sys.argv = saved
    for name, value in _CPU_FLAG_OVERRIDES.items():
        setattr(args, name, value)
    ensure_cpu_runtime()  # validate_args reads the GPU architecture; the runtime answers for the CPU
    with contextlib.redirect_stdout(io.StringIO()) as listing:  # megatron prints every argument; keep it quiet
        validate_args(args, {})
    if os.environ.get("QWEN35_PRINT_ARGS"):
        print(listing.getvalue())
    return args


def build_model_chunks(model_provider, config, args) -> list[torch.nn.Module]:
    """This rank's model chunks (one, or one per virtual pipeline stage), as megatron.training's get_model."""
    from megatron.core import parallel_state as mpu

    vpp = args.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunk = model_provider(pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                               post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                               vp_stage=stage, config=config)
        chunk.vp_stage = stage
        chunks.append(chunk)
    return chunks


def _optimizer(chunks, args):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr,
                             weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                             adam_eps=args.adam_eps, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
                             params_dtype=args.params_dtype, use_distributed_optimizer=args.use_distributed_optimizer)
    return get_megatron_optimizer(config, chunks)


def _data_iterators(datasets_provider, args, consumed_samples: int, num_chunks: int):
    """One training iterator per model chunk, positioned after `consumed_samples` (resume continues the stream)."""
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader

    from megatron_qwen35.training.steps import is_dataset_built_on_rank

    train_samples = args.train_iters * args.global_batch_size
    loader = None
    if is_dataset_built_on_rank():
        train_ds, _, _ = datasets_provider([train_samples, 0, 0])
        loader = build_pretraining_data_loader(train_ds, consumed_samples)
    iterator = iter(loader) if loader is not None else None
    return [iterator] * num_chunks if num_chunks > 1 else iterator


def _lm_loss(losses_reduced) -> float | None:
    """Token-weighted LM loss of one step over the whole global batch, as megatron.training logs it: summed over
    this rank's micro-batches and over the data- and context-parallel ranks (on the last pipeline stage; None
    elsewhere)."""
    from megatron.core import parallel_state as mpu

    if not losses_reduced:
        return None
    total = sum(x["lm loss"] for x in losses_reduced).clone()
    torch.distributed.all_reduce(total, group=mpu.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1]).item()


def pretrain_on_cpu(argv: list[str], datasets_provider, model_provider, forward_step, *, extra_args_provider):
    """Train as `pretrain_qwen35.py` would on GPUs; returns {"losses": [...], "iteration": N} for this rank."""
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import get_optimizer_param_scheduler

    from megatron_qwen35.provider import qwen35_config_from_args

    args = parse_cpu_args(argv, extra_args_provider)
    set_global_variables(args, build_tokenizer=True)
    initialize_parallel(tensor_parallel=args.tensor_model_parallel_size,
                        pipeline_parallel=args.pipeline_model_parallel_size,
                        virtual_pipeline_parallel=args.virtual_pipeline_model_parallel_size,
                        expert_parallel=args.expert_model_parallel_size,
                        expert_tensor_parallel=args.expert_tensor_parallel_size,
                        context_parallel=args.context_parallel_size, seed=args.seed)
    cfg = qwen35_config_from_args(args)
    config = core_transformer_config_from_args(args)
    chunks = build_model_chunks(model_provider, config, args)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)  # as megatron.training
              for i, c in enumerate(chunks)]
    optimizer = _optimizer(chunks, args)
    scheduler = get_optimizer_param_scheduler(optimizer)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    iteration, consumed = 0, 0
    if args.load and (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
        state = load_checkpoint([c.module for c in chunks], args.load, optimizer=optimizer)
        iteration, consumed = state["iteration"], state["consumed_train_samples"]
        scheduler.load_state_dict(state["opt_param_scheduler"])
        print(f"resumed from {args.load} at iteration {iteration}", flush=True)
    data = _data_iterators(datasets_provider, args, consumed, len(chunks))

    forward_backward = get_forward_backward_func()
    losses = []
    start = time.time()
    while iteration < args.train_iters:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=forward_step, data_iterator=data,
                                   model=chunks if len(chunks) > 1 else chunks[0],
                                   num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=False)
        update_ok, grad_norm, _ = optimizer.step()
        if not update_ok:
            raise RuntimeError(f"optimizer step {iteration + 1} failed (grad norm {grad_norm})")
        scheduler.step(increment=args.global_batch_size)
        iteration += 1
        consumed += args.global_batch_size
        loss = _lm_loss(reduced) if mpu.is_pipeline_last_stage(ignore_virtual=True) else None
        losses.append(loss)
        last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1  # megatron logs there
        if last_rank and (iteration % args.log_interval == 0 or iteration == args.train_iters):
            print(f"iteration {iteration:6d}/{args.train_iters} | lm loss {loss:.4f} | grad norm {grad_norm:.3f} | "
                  f"lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | {time.time() - start:.1f}s", flush=True)
        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0  # Megatron's --exit-interval
        if args.save and (exiting or iteration == args.train_iters
                          or (args.save_interval and iteration % args.save_interval == 0)):
            save_checkpoint([c.module for c in chunks], cfg, args.save, iteration=iteration, optimizer=optimizer,
                            extra_state={"opt_param_scheduler": scheduler.state_dict(),
                                         "consumed_train_samples": consumed})
        if exiting:
            print(f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})", flush=True)
            break
    return {"losses": losses, "iteration": iteration}


__all__ = ["pretrain_on_cpu", "parse_cpu_args", "build_model_chunks", "latest_iteration"]
