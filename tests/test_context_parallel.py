"""The load-balanced context-parallel split (`layers/context_parallel.py`) against megatron's own definitions, and the
local core attention against megatron's DotProductAttention where both apply."""

import pytest
import torch

from megatron_qwen35.layers.context_parallel import (
    batch_on_this_cp_rank,
    document_ids,
    load_balanced_positions,
    natural_order_index,
)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_unpacked_split_is_chunks_r_and_2cp_minus_1_minus_r(cp):
    seq = torch.arange(8 * cp)
    chunks = seq.chunk(2 * cp)
    positions = load_balanced_positions(seq.numel(), cp)
    for r in range(cp):
        assert torch.equal(positions[r], torch.cat([chunks[r], chunks[2 * cp - 1 - r]]))


@pytest.mark.parametrize("cp", [2, 3])
def test_packed_split_matches_megatrons_gdn_permutation(cp):
    """megatron's GDN builds the same per-document split (for TE's THD partition) as an index permutation."""
    from megatron.core.ssm.gated_delta_net.common import _build_thd_cp_a2a_perm

    cu = torch.tensor([0, 12 * cp, 14 * cp, 20 * cp])
    positions = load_balanced_positions(int(cu[-1]), cp, cu)
    to_natural, _ = _build_thd_cp_a2a_perm(cu, cp, int(cu[-1]))
    assert torch.equal(natural_order_index(positions), to_natural)
    gathered = positions.flatten()  # every rank's tokens, one rank after another
    assert torch.equal(gathered[natural_order_index(positions)], torch.arange(int(cu[-1])))
    assert torch.equal(document_ids(torch.tensor([0, 12 * cp - 1, 12 * cp, 20 * cp - 1]), cu),
                       torch.tensor([0, 0, 1, 2]))


def test_lengths_that_do_not_split_are_named():
    with pytest.raises(ValueError, match=r"packed sequence lengths \(padded\) \[8, 6\] are not all divisible by 4"):
        load_balanced_positions(14, 2, torch.tensor([0, 8, 14]))
    with pytest.raises(ValueError, match=r"sequence length \[10\] is not all divisible by 4"):
        load_balanced_positions(10, 2)
    with pytest.raises(ValueError, match=r"must start at 0 and end at the 16 tokens"):
        load_balanced_positions(16, 2, torch.tensor([0, 8, 12]))


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_batch_split_keeps_every_key_of_the_attention_mask():
    tokens = torch.arange(16).view(2, 8)
    mask = torch.rand(2, 1, 8, 8) > 0.5
    for rank in range(2):
        mine = batch_on_this_cp_rank(dict(tokens=tokens, labels=tokens + 1, attention_mask=mask, position_ids=None),
                                     _Group(rank, 2))
        rows = load_balanced_positions(8, 2)[rank]
        assert torch.equal(mine["tokens"], tokens[:, rows]) and torch.equal(mine["labels"], tokens[:, rows] + 1)
        assert torch.equal(mine["attention_mask"], mask[:, :, rows, :]) and mine["position_ids"] is None


def test_batch_split_of_mrope_positions_splits_their_sequence():
    """mRoPE's position ids [3, b, s] are split along the sequence (the last dimension), like the tokens."""
    tokens = torch.arange(16).view(2, 8)
    positions = torch.stack([tokens, tokens + 100, tokens + 200])
    for rank in range(2):
        mine = batch_on_this_cp_rank(dict(tokens=tokens, position_ids=positions), _Group(rank, 2))
        rows = load_balanced_positions(8, 2)[rank]
        assert torch.equal(mine["position_ids"], positions[:, :, rows])


def test_cpu_rotary_slice_is_megatrons_chunks(megatron_single_process):
    from megatron.core.models.common.embeddings import rope_utils

    table = torch.randn(16, 1, 1, 4)
    for rank in range(2):
        got = rope_utils.get_pos_emb_on_this_cp_rank(table, 0, _Group(rank, 2))  # the CPU runtime's version
        chunks = table.chunk(4)
        assert torch.equal(got, torch.cat([chunks[rank], chunks[3 - rank]]))


@pytest.mark.parametrize("groups", [1, 2])
def test_core_attention_equals_megatrons_dot_product_attention(megatron_single_process, groups):
    """Without CP or packing, where megatron's local attention applies, the two agree (causal and explicit mask)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_qwen35.layers.core_attention import Qwen35CoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                               kv_channels=8, attention_dropout=0.0, params_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 2, 4, 8, generator=g)
    k, v = torch.randn(10, 2, groups, 8, generator=g), torch.randn(10, 2, groups, 8, generator=g)
    ours = Qwen35CoreAttention(config, 1, AttnMaskType.causal, "self")
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    assert (ours(q, k, v, None) - theirs(q, k, v, None)).abs().max().item() <= 1e-6
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1) | (torch.rand(10, 10, generator=g) > 0.7)
    mask.fill_diagonal_(False)  # every query keeps itself
    mask = mask.view(1, 1, 10, 10).expand(2, 1, 10, 10)
    padding = Qwen35CoreAttention(config, 1, AttnMaskType.padding, "self")
    theirs_padding = DotProductAttention(config, 1, AttnMaskType.padding, "self")
    assert (padding(q, k, v, mask) - theirs_padding(q, k, v, mask)).abs().max().item() <= 1e-6
