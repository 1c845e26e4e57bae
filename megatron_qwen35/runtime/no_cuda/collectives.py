"""Uneven first-dim collectives under gloo (megatron.core.tensor_parallel.mappings).

MoE alltoall with TP > 1 gathers and reduce-scatters variable token counts over the TP group; gloo needs equal shapes,
so the gather pads to the largest split and trims, and the reduce-scatter all-reduces and keeps this rank's slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_qwen35.runtime.patching import replace as _replace


def _make_uneven_gather(orig: Callable) -> Callable:
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        # gloo's all_gather needs equal shapes; pad every rank to the largest split, gather, trim.
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        chunks = gathered.split(longest, dim=0)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)], dim=0)

    _gather_along_first_dim.__wrapped__ = orig
    return _gather_along_first_dim


def _make_uneven_reduce_scatter(orig: Callable) -> Callable:
    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        # gloo's reduce_scatter needs equal shapes; all-reduce the whole tensor, keep our slice.
        if input_split_sizes is None or group.size() == 1:
            return orig(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        reduced = input_.contiguous().clone()
        torch.distributed.all_reduce(reduced, group=group)
        start = sum(sizes[: group.rank()])
        return reduced[start : start + sizes[group.rank()]].contiguous()

    _reduce_scatter_along_first_dim.__wrapped__ = orig
    return _reduce_scatter_along_first_dim


def patch_uneven_first_dim_collectives() -> None:
    # MoE alltoall with TP>1 gathers/reduce-scatters variable token counts over the TP group
    # (output_split_sizes / input_split_sizes); gloo rejects unequal tensor lists.
    from megatron.core.tensor_parallel import mappings

    if not hasattr(mappings._gather_along_first_dim, "__wrapped__"):
        _replace(
            mappings, "_gather_along_first_dim", _make_uneven_gather(mappings._gather_along_first_dim)
        )
    if not hasattr(mappings._reduce_scatter_along_first_dim, "__wrapped__"):
        _replace(
            mappings,
            "_reduce_scatter_along_first_dim",
            _make_uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim),
        )
