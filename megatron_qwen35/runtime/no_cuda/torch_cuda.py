"""torch.cuda on a machine without CUDA: its entry points that megatron-core calls unconditionally, and the tools the
other no-CUDA modules share.

megatron allocates on ``torch.cuda.current_device()``, synchronizes, and waits on ``torch.cuda.current_stream()``;
each of those raises without CUDA. `patch_torch_cuda_*` answer them for the CPU. `CpuTorchProxy` is the ``torch`` a
megatron module sees when its ``device="cuda"`` literals must allocate on the CPU (literals.py, training_patches.py);
`tensor_cuda_is_identity` makes ``tensor.cuda()`` a no-op within a block (pipeline.py, training_patches.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from megatron_qwen35.runtime.patching import replace as _replace

_CPU = torch.device("cpu")


def _cpu_if_cuda(device: Any) -> Any:
    """Map any CUDA device spec ("cuda", "cuda:0", torch.device("cuda"), an int) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):  # a bare int means a CUDA ordinal to torch factories
        return _CPU
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


class CpuTorchProxy:
    """Stand-in for the ``torch`` module inside one megatron module: factory functions given
    ``device="cuda"`` allocate on the CPU instead, ``torch.cuda`` is `cuda` when one is given (megatron.training's
    modules get a CPU stand-in, training_patches.CPU_CUDA); everything else is the real ``torch``."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self, real_torch, cuda=None):
        self._real = real_torch
        self._cuda = cuda

    def __getattr__(self, name):
        if name == "cuda" and self._cuda is not None:
            return self._cuda
        attr = getattr(self._real, name)
        if name in self._FACTORIES:

            def factory(*args, _f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_if_cuda(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        return attr


# --------------------------------------------------------------------------------------
# torch.cuda entry points that megatron calls unconditionally
# --------------------------------------------------------------------------------------


def _cpu_current_device():
    return _CPU


def patch_torch_cuda_current_device() -> None:
    # megatron allocates with device=torch.cuda.current_device() in ~100 places (mappings, layers,
    # rotary, p2p, global memory buffer, router, ...); without CUDA that raises, so resolve to CPU.
    _replace(torch.cuda, "current_device", _cpu_current_device)


def _noop(*args, **kwargs):
    return None


def patch_torch_cuda_synchronize() -> None:
    # p2p_communication, dist_checkpointing (filesystem_async, fully_parallel, async_utils) and
    # parallel_state call torch.cuda.synchronize(); on CPU every op is already synchronous.
    _replace(torch.cuda, "synchronize", _noop)


class _CpuStream:
    """What torch.cuda.current_stream() returns on CPU: every wait/sync is already satisfied."""

    device = _CPU

    def wait_event(self, event=None):
        return None

    def wait_stream(self, stream=None):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return None

    def query(self):
        return True


_CPU_STREAM = _CpuStream()


def _cpu_current_stream(device=None):
    return _CPU_STREAM


def patch_torch_cuda_current_stream() -> None:
    # DDP's grad sync (param_and_grad_buffer.start_grad_sync) waits on
    # torch.cuda.current_stream() for CUDA-graph events every step; on CPU there is one stream.
    _replace(torch.cuda, "current_stream", _cpu_current_stream)


# --------------------------------------------------------------------------------------
# tensor.cuda() within a block (the pipeline embedding copy, megatron.training's get_model)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, ``tensor.cuda()`` returns the (CPU) tensor itself."""
    real_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda
