"""megatron.training 0.19.2 on a machine without CUDA: the adaptations that let `megatron.training.pretrain` itself run.

megatron.training assumes a GPU in a few dozen places, nearly all of them bookkeeping: start-up timestamps and loss
sums allocated with `device='cuda'`, memory reports, a side stream around DDP construction, `cuda_rng_state` in
checkpoints and in the rerun state machine, `initialize_megatron`'s CUDA assert, `model.cuda()` in `get_model`.
Rather than a global device mode, each module that does so sees a `torch` whose `device='cuda'` factories allocate on
the CPU and whose `torch.cuda` is `CPU_CUDA` (one "device", the CPU); the real `torch.cuda` stays untouched for
everything else (`is_available()` stays False). Applied only where CUDA is absent (see register.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatron_qwen35.runtime.no_cuda.torch_cuda import CpuTorchProxy, tensor_cuda_is_identity
from megatron_qwen35.runtime.patching import replace


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs) -> int:
    return 0


class _CpuStream:
    """A CUDA stream on a machine whose every op is synchronous: waits and syncs are already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    wait_stream = wait_event = record_event = synchronize = _noop

    def query(self) -> bool:
        return True


def _no_cuda_generator_state(*args, **kwargs) -> torch.Tensor:
    """What a checkpoint records as `cuda_rng_state` where there is no CUDA generator: a Philox-shaped (seed,
    offset) state of zeros, 16 bytes as on a GPU (the CPU generator's own state is saved as `torch_rng_state`)."""
    return torch.zeros(16, dtype=torch.uint8)


class CpuCuda:
    """`torch.cuda` as megatron.training sees it without CUDA: one device, the CPU; what is not listed is the real
    `torch.cuda` (whose `current_device` / `synchronize` / `current_stream` no_cuda.torch_cuda already answers)."""

    device_count = staticmethod(lambda: 1)  # "a device exists": initialize_megatron then builds model-parallel state
    set_device = set_stream = empty_cache = staticmethod(_noop)
    Stream = _CpuStream
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = staticmethod(_zero)
    device_memory_used = staticmethod(_zero)
    memory_stats = staticmethod(lambda *a, **k: {})
    get_rng_state = staticmethod(_no_cuda_generator_state)
    set_rng_state = staticmethod(_noop)  # nothing to restore: the CPU generator is restored from torch_rng_state

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


CPU_CUDA = CpuCuda()

# The megatron.training (and rerun state machine) modules that allocate on 'cuda' or call torch.cuda in a CPU run.
MODULES_WITH_CUDA_CALLS = (
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.checkpointing",
    "megatron.training.utils.common_utils",
    "megatron.core.rerun_state_machine",
)


def patch_training_torch_on_cpu() -> None:
    # The modules above allocate bookkeeping tensors with device='cuda' and call torch.cuda's stream, memory, device
    # and RNG functions; each gets a torch whose 'cuda' allocations and torch.cuda calls land on the CPU.
    import importlib

    for name in MODULES_WITH_CUDA_CALLS:
        module = importlib.import_module(name)
        if not isinstance(module.torch, CpuTorchProxy):
            replace(module, "torch", CpuTorchProxy(torch, cuda=CPU_CUDA))


def patch_initialize_megatron_without_cuda() -> None:
    # pretrain() calls initialize_megatron(), which asserts torch.cuda.is_available() unless allow_no_cuda=True.
    from megatron.training import training

    init = training.initialize_megatron
    if not hasattr(init, "__wrapped__"):
        replace(training, "initialize_megatron", functools.wraps(init)(functools.partial(init, allow_no_cuda=True)))


def _no_jit_warmup(*args, **kwargs) -> None:
    """set_jit_fusion_options without the warm-up: on CPU there is nothing to warm up (dynamo is off), and its ten
    `torch.rand(device='cuda')` draws would advance the CPU generator that `--use-cpu-initialization` builds the
    weights from, so a CPU run would start from other weights than the same run's model built anywhere else."""


def patch_skip_jit_warmup() -> None:
    from megatron.training import training

    replace(training, "set_jit_fusion_options", _no_jit_warmup)


def patch_get_model_cuda_move() -> None:
    # get_model moves each model chunk with model.cuda(torch.cuda.current_device()); on CPU the chunk is in place.
    from megatron.training import training

    get_model = training.get_model
    if not hasattr(get_model, "__wrapped__"):
        @functools.wraps(get_model)
        def get_model_on_cpu(*args, **kwargs):
            with tensor_cuda_is_identity():
                return get_model(*args, **kwargs)

        replace(training, "get_model", get_model_on_cpu)


__all__ = ["CPU_CUDA", "MODULES_WITH_CUDA_CALLS", "patch_training_torch_on_cpu",
           "patch_initialize_megatron_without_cuda", "patch_skip_jit_warmup", "patch_get_model_cuda_move"]
