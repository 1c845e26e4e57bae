"""Context parallelism without CUDA: this rank's slice of the rotary table.

Upstream picks the rows of this rank's load-balanced chunks with a pinned index tensor moved by ``.cuda()``; here they
come from `layers.context_parallel.load_balanced_positions`, on the table's own device.
"""

from __future__ import annotations

from megatron_qwen35.runtime.patching import replace as _replace


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """rope_utils.get_pos_emb_on_this_cp_rank without its pinned index tensor and ``.cuda()`` copy: the rows of
    this rank's load-balanced chunks (r and 2CP-1-r), from the one place that computes that split."""
    from megatron_qwen35.layers.context_parallel import load_balanced_positions

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    positions = load_balanced_positions(pos_emb.size(seq_dim), cp_group.size(), device=pos_emb.device)
    return pos_emb.index_select(seq_dim, positions[cp_group.rank()])


def patch_rope_context_parallel_slice() -> None:
    # With CP > 1 the rotary table is cut to this rank's chunks through an index tensor built with
    # pin_memory=True and moved with .cuda(): both need a CUDA driver. The function is imported by name into the
    # rotary modules, so each binding is replaced.
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        _replace(module, "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank)
