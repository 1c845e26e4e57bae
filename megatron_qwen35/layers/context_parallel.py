"""Which tokens a context-parallel rank holds: megatron's load-balanced split, the one place we compute it.

Megatron cuts every sequence into 2 x CP equal chunks and gives rank r chunks r and 2CP-1-r, so that causal
attention costs every rank the same. A packed (THD) batch is split the same way sequence by sequence, so every
document is spread over all CP ranks (TE's `thd_get_partitioned_indices` does this on GPUs). Three users need the
exact token order: the data split (`batch_on_this_cp_rank`), the Gated DeltaNet layer (which gathers whole
sequences and must run them in natural order) and the local core attention (which masks by global position).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import torch


def _sequence_bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[int]:
    if cu_seqlens is None:
        return [0, total]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"packed sequence boundaries {bounds} must start at 0 and end at the {total} tokens "
                         "of the batch")
    return bounds


def load_balanced_positions(total: int, cp_size: int, cu_seqlens: torch.Tensor | None = None,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """[cp_size, total / cp_size]: row r holds the natural (global) index of each token on CP rank r, in that rank's
    local order. `total` counts the tokens of the whole sequence (or packed batch) before the split; with
    `cu_seqlens` (global, padded boundaries) every packed sequence is split on its own."""
    bounds = _sequence_bounds(cu_seqlens, total)
    return _positions(tuple(bounds), cp_size).to(device)


@lru_cache(maxsize=64)  # every GDN and attention layer asks again for the same micro-batch
def _positions(bounds: tuple[int, ...], cp_size: int) -> torch.Tensor:
    lengths = [end - start for start, end in pairwise(bounds)]
    if any(n % (2 * cp_size) for n in lengths):
        what = "sequence length" if len(bounds) == 2 and bounds[0] == 0 else "packed sequence lengths (padded)"
        raise ValueError(f"context_parallel={cp_size} splits every sequence into 2 x {cp_size} equal chunks, but the "
                         f"{what} {lengths} {'is' if len(lengths) == 1 else 'are'} not all divisible by "
                         f"{2 * cp_size}")
    rows = []
    for rank in range(cp_size):
        parts = []
        for start, n in zip(bounds[:-1], lengths, strict=True):
            chunk = n // (2 * cp_size)
            for c in (rank, 2 * cp_size - 1 - rank):
                parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
    return torch.stack(rows)


def natural_order_index(positions: torch.Tensor) -> torch.Tensor:
    """For tokens gathered rank after rank (`positions.flatten()` order), the index that puts them in natural
    order: natural = gathered.index_select(dim, natural_order_index(positions))."""
    flat = positions.flatten()
    inverse = torch.empty_like(flat)
    inverse[flat] = torch.arange(flat.numel(), device=flat.device)
    return inverse


def document_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The packed sequence each natural position belongs to (all 0 without packing)."""
    if cu_seqlens is None:
        return torch.zeros_like(positions)
    return torch.bucketize(positions, cu_seqlens[1:].to(positions.device), right=True)


def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """This rank's share of a [b, s] micro-batch (and of a packed one, whose boundaries are in `cu_seqlens`):
    every tensor is indexed along its last dimension, the sequence (tokens, labels, loss mask, position ids [b, s] or
    mRoPE's [3, b, s]), by `load_balanced_positions`. The attention mask, when present ([b, 1, s, s]), keeps every
    key and only this rank's query rows, as megatron's own split does."""
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size == 1:
        return batch
    tokens = batch["tokens"] if batch.get("tokens") is not None else batch["labels"]
    mine = cp_rank_positions(tokens.size(-1), cp_group, batch.get("cu_seqlens"), device=tokens.device)
    out = dict(batch)
    for key, value in batch.items():
        if key == "cu_seqlens" or not torch.is_tensor(value):
            continue
        out[key] = value.index_select(2 if key == "attention_mask" else value.dim() - 1, mine)
    return out


def cp_rank_positions(total: int, cp_group, cu_seqlens: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The natural indices of the tokens this context-parallel rank holds, in its local order."""
    return load_balanced_positions(total, cp_group.size(), cu_seqlens, device=device)[cp_group.rank()]


__all__ = ["load_balanced_positions", "natural_order_index", "document_ids", "batch_on_this_cp_rank",
           "cp_rank_positions"]
