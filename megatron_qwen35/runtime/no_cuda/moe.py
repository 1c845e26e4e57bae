"""The MoE alltoall token dispatcher without CUDA streams.

Upstream creates a CUDA side stream for the dispatcher and moves the split sizes to host on it; here there is no
stream, and the split tensors become numpy arrays as upstream's host copies would.
"""

from __future__ import annotations

import torch

from megatron_qwen35.runtime.patching import replace as _replace


class _NoStream:
    """Placeholder for MoEAlltoAllTokenDispatcher.cuda_dtoh_stream (a class attribute that its
    __init__ would otherwise fill with torch.cuda.Stream())."""


def _as_host(value, as_numpy=False):
    # Upstream moves split sizes with .to('cpu', non_blocking=True).numpy() only if they are CUDA
    # tensors; on CPU they stay tensors, which all_to_all_single rejects as split sizes.
    if torch.is_tensor(value) and as_numpy:
        return value.numpy()
    return value


def _cpu_maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA streams/events."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _as_host(self.input_splits, as_numpy=True)
        self.output_splits = _as_host(self.output_splits, as_numpy=True)
        self.output_splits_tp = _as_host(self.output_splits_tp, as_numpy=True)
    return tokens_per_expert


def patch_moe_alltoall_dispatcher() -> None:
    # The alltoall dispatcher creates a CUDA stream in __init__ and moves split sizes to host on
    # that stream; on CPU skip the stream and turn the split tensors into numpy like upstream.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        _replace(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _NoStream())
    _replace(
        MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", _cpu_maybe_dtoh_and_synchronize
    )
