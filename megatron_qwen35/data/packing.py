"""Documents -> packed sequences: which documents share a sequence, and where each one starts (cu_seqlens).

A packed sequence of `seq_length` slots holds whole documents one after another, each padded at its end to a
multiple of `align` (context parallelism cuts every document into 2 x CP equal chunks, so align = 2 x CP there), and
one padding document filling the rest. The model sees the boundaries as megatron's THD `PackedSeqParams`
(cu_seqlens): attention, the Gated DeltaNet conv and recurrence, rope positions and MTP's shift all restart at each,
so a document computes as it would alone; the padding at a document's end comes after its last real token and
changes none of its values (and carries no loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def aligned(length: int, align: int) -> int:
    """`length` rounded up to a multiple of `align`."""
    return -(-length // align) * align


def first_fit(lengths: Sequence[int], capacity: int, *, align: int = 1) -> list[list[int]]:
    """Deterministic first-fit: document i (in order) goes into the first sequence whose room takes its aligned
    length, else a new one. Returns each sequence's document indices, in the order they were placed. The first
    sequence with room is found in a max-tree over the sequences' room: O(log n) per document."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    tree = [0] * (2 * size)  # leaves size..2 size: each sequence's room (0 for sequences not yet opened)
    bins: list[list[int]] = []
    for i, length in enumerate(lengths):
        need = aligned(length, align)
        if need > capacity:
            raise ValueError(f"document {i} has {length} tokens ({need} aligned to {align}), more than a "
                             f"{capacity}-token sequence holds")
        if tree[1] >= need:  # the leftmost leaf with room >= need
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            b = node - size
        else:
            b = len(bins)
            bins.append([])
            node = b + size
            tree[node] = capacity
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


@dataclass(frozen=True)
class PackedLayout:
    """Where the documents of one packed sequence lie: document d occupies [starts[d], starts[d] + lengths[d]) of its
    real tokens and [starts[d], starts[d + 1]) with its padding; the last boundary is the padding document's."""

    lengths: tuple[int, ...]  # real tokens per document
    cu_seqlens: tuple[int, ...]  # aligned boundaries, from 0; the padding document (if any) ends at seq_length

    @property
    def starts(self) -> tuple[int, ...]:
        return self.cu_seqlens[:len(self.lengths)]

    @classmethod
    def of(cls, lengths: Sequence[int], seq_length: int, *, align: int = 1) -> PackedLayout:
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + aligned(length, align))
        if bounds[-1] > seq_length:
            raise ValueError(f"documents of {list(lengths)} tokens (aligned to {align}) overflow {seq_length}")
        if bounds[-1] < seq_length:
            bounds.append(seq_length)  # the padding document
        return cls(tuple(lengths), tuple(bounds))


__all__ = ["aligned", "first_fit", "PackedLayout"]
