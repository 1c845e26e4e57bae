"""flash-linear-attention's Triton kernels, where Triton can run them: CUDA tensors, or any tensor while Triton's
interpreter is on (runtime/triton_interpreter.py: FLA's real kernels tested on a CPU).

No quiet fallback: where Triton could run a kernel, it is FLA's unless the PyTorch path was chosen (`kernels="torch"`,
--gdn-kernels torch) or megatron's deterministic mode is on, and a chosen FLA that does not import is an error naming
the import failure (the PyTorch path is several times slower and keeps every chunk's state: a user would otherwise
find out from the step time). Choosing the PyTorch path on CUDA is logged once.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from megatron_qwen35.runtime import triton_interpreter

KERNELS = ("fla", "torch")  # what a caller may choose; CPU tensors always take the PyTorch path

# name -> (FLA module, attribute)
_FLA = {
    "chunk_gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "fused_recurrent_gated_delta_rule": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "causal_conv1d": ("fla.modules.causal_conv1d", "causal_conv1d"),
    "causal_conv1d_update": ("fla.modules.causal_conv1d", "causal_conv1d_update"),
}

_log = logging.getLogger(__name__)


class FLAUnavailable(RuntimeError):
    """FLA's kernels were chosen where Triton runs them, and they do not import."""


@functools.cache
def _load(name: str):
    """(FLA's kernel `name`, None), or (None, the exception importing it raised)."""
    module, attribute = _FLA[name]
    try:
        return getattr(importlib.import_module(module), attribute), None
    except Exception as e:  # noqa: BLE001 - ImportError, or Triton failing to initialise: reported, not swallowed
        return None, e


@functools.cache
def _note_torch_path(reason: str) -> None:
    _log.warning("Gated DeltaNet runs its PyTorch kernels where FLA's could run (%s): slower, and more memory",
                 reason)


def kernel(name: str, x: torch.Tensor, *, kernels: str, deterministic: bool):
    """FLA's kernel `name` for input `x`, or None for the PyTorch path (see the module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown Gated DeltaNet kernels {kernels!r}; choose one of {KERNELS}")
    if not (x.is_cuda or triton_interpreter.triton_interpreter_enabled()):
        return None  # a CPU tensor: the PyTorch path is this machine's path
    if kernels == "torch" or deterministic:
        # deterministic: FLA's autotuner picks block sizes, and with them the summation order, by timing
        _note_torch_path("--gdn-kernels torch" if kernels == "torch" else "deterministic mode")
        return None
    fn, error = _load(name)
    if fn is None:
        raise FLAUnavailable(f"FLA's {name} does not import on this machine ({type(error).__name__}: {error}); "
                             "install flash-linear-attention's kernels (fla-core: pip install -e .), or choose the "
                             "PyTorch path explicitly (--gdn-kernels torch; load_model(..., gdn_kernels='torch'))")
    return fn


__all__ = ["KERNELS", "FLAUnavailable", "kernel"]
