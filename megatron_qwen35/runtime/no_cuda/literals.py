"""``device="cuda"`` literals and the GPU reads that remain after torch.cuda is answered (torch_cuda.py).

The schedules, transformer masks, dist-checkpointing's plan check, the optimizers, clip_grads and the grad scaler each
see a `CpuTorchProxy` as their ``torch``; the no-TE/no-apex l2-norm fallback, which returns its norm on 'cuda', is
replaced by a CPU one; megatron.training's argument check is told the GPU generation it would read from torch.cuda.
"""

from __future__ import annotations

import torch

from megatron_qwen35.runtime.no_cuda.torch_cuda import CpuTorchProxy
from megatron_qwen35.runtime.patching import replace as _replace

# --------------------------------------------------------------------------------------
# "cuda" string literals
# --------------------------------------------------------------------------------------


def patch_cuda_literals() -> None:
    # These modules build tensors with a literal device="cuda": schedules (total_num_tokens),
    # transformer.utils (default causal / sliding-window masks used by the local softmax),
    # dist_checkpointing's state_dict_saver (plan-reuse check). Give each a torch proxy.
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    for module in (schedules, transformer_utils, state_dict_saver):
        if not isinstance(module.torch, CpuTorchProxy):
            _replace(module, "torch", CpuTorchProxy(torch))


# --------------------------------------------------------------------------------------
# Optimizers (megatron.core.optimizer): their literals, and clip_grads' l2-norm fallback
# --------------------------------------------------------------------------------------


def patch_optimizer_cuda_literals() -> None:
    # The optimizers allocate their scale / found-inf / overflow flags, clip_grads its norm and
    # zero-count accumulators, and the grad scaler its factors with a literal device="cuda".
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as optimizer_module

    for module in (optimizer_module, clip_grads, grad_scaler):
        if not isinstance(module.torch, CpuTorchProxy):
            _replace(module, "torch", CpuTorchProxy(torch))


def _cpu_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron.core.utils.local_multi_tensor_l2_norm (the no-TE/no-apex fallback) without its
    device="cuda" result: the l2 norm of the per-tensor l2 norms, as a 1-element fp32 tensor."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros([])
    return total.reshape(1).to(torch.float), None


def patch_grad_norm_fallback() -> None:
    # Without Transformer Engine and apex, clip_grads uses megatron's local l2-norm fallback,
    # which returns its result on device="cuda"; give clip_grads a CPU one.
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        _replace(clip_grads, "l2_norm_impl", _cpu_multi_tensor_l2_norm)


# --------------------------------------------------------------------------------------
# megatron.training's argument check: the GPU generation
# --------------------------------------------------------------------------------------


def _no_stream_ordering_arch() -> int:
    """What validate_args may know of the CPU: no CUDA streams, so none of Hopper's ordering requirements (10 is
    the first generation without them)."""
    return 10


def patch_training_device_arch() -> None:
    # validate_args asks torch.cuda for the GPU generation when TP > 1 or CP > 1, to demand
    # CUDA_DEVICE_MAX_CONNECTIONS=1 before Blackwell (kernel ordering on CUDA streams); without CUDA that raises.
    from megatron.training import arguments

    _replace(arguments, "get_device_arch_version", _no_stream_ordering_arch)
