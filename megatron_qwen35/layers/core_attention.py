"""Core attention for the local (non-Transformer-Engine) backend, with packed sequences and context parallelism.

megatron-core's local `DotProductAttention` refuses both (context parallelism and THD "are only supported by
TEDotProductAttention"), which leaves CPU runs, and every layout test, without them. This module is its
replacement in `Qwen35LocalSpecProvider`; on GPUs the TE backend keeps TE's own fused attention and CP.

- Masking is by position, so one rule covers every case: a query at natural position i of packed sequence d sees the
  keys at positions j <= i of the same d (and what an explicit megatron mask, True = masked, still allows). Under
  a `no_mask` type (the vision tower's blocks) the j <= i part drops: every key of the same d.
- Context parallelism all-gathers K and V over the CP group (megatron's sequence-parallel gather, whose backward
  reduce-scatters the key and value gradients back to their owners) and keeps this rank's queries; the positions of
  both come from `context_parallel.load_balanced_positions`, so documents may cross CP ranks freely. Each rank does
  the same work because megatron's split is load-balanced; memory holds the whole sequence's K and V and a
  [local, whole] boolean mask, which is what a CPU proof and short sequences need (on GPUs, for long context, TE's
  fused attention and ring exchange avoid both).
- Generation: megatron's SelfAttention hands over the queries of the new tokens and the keys and values of every
  token so far (its static KV cache); the queries sit at the last positions, and the causal rule by position applies.
- The product itself is torch's `scaled_dot_product_attention`, which picks a kernel for the tensor's device; a plain
  causal sequence (no CP, no packing, no explicit mask) builds no mask and passes `is_causal`, so a GPU without
  Transformer Engine still gets a flash kernel.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_qwen35.layers.context_parallel import document_ids, load_balanced_positions


class Qwen35CoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v over this rank's heads, with THD packing and context parallelism.

    Takes what megatron's `SelfAttention` hands its core attention: q [sq, b, np, hn] and k, v [sk, b, ng, hn]
    (or [t, heads, hn] for packed sequences), and returns [sq, b, np * hn] (packed: [t, np * hn])."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by Qwen35CoreAttention "
                             "(Qwen3.5 uses the vanilla softmax)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if softmax_scale is None:
            softmax_scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by Qwen35CoreAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        cu_seqlens = _packed_boundaries(packed_seq_params)
        if cu_seqlens is not None:  # [t, heads, hn] -> [t, 1, heads, hn]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        local_len, batch = query.shape[:2]
        cached_len = key.shape[0] - local_len  # generation: keys of earlier tokens from megatron's KV cache

        cp_size = 1 if self.cp_group is None else self.cp_group.size()
        if cached_len and (cp_size > 1 or cu_seqlens is not None):
            raise ValueError("Qwen35CoreAttention reads a KV cache without context parallelism or packed sequences")
        if cp_size > 1:
            positions = load_balanced_positions(local_len * cp_size, cp_size, cu_seqlens, device=query.device)
            q_pos, k_pos = positions[self.cp_group.rank()], positions.flatten()
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)  # ranks' tokens one after another
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        else:  # the queries are the last local_len of the keys' positions
            k_pos = torch.arange(cached_len + local_len, device=query.device)
            q_pos = k_pos[cached_len:]
        if cu_seqlens is not None and int(cu_seqlens[-1]) != local_len * cp_size:
            raise ValueError(f"packed sequence boundaries end at {int(cu_seqlens[-1])} but the batch has "
                             f"{local_len * cp_size} tokens")

        if cached_len:  # after the prompt megatron lowers the mask type to no_mask, right for one new token only
            causal = "causal" in self.attn_mask_type.name and local_len > 1  # one new token reads every key
        else:
            causal = "causal" in mask_type.name
        allowed = None  # a plain causal (or unmasked) sequence: SDPA's own flag lets it pick a flash kernel
        # (SDPA's is_causal pairs the first queries with the first keys: after a KV cache, the mask says it)
        if cp_size > 1 or cu_seqlens is not None or attention_mask is not None or (causal and cached_len):
            allowed = _allowed(q_pos, k_pos, cu_seqlens, causal=causal)  # [sq, sk]
            if attention_mask is not None:  # megatron's convention: True = masked; keys in natural order
                allowed = allowed & ~attention_mask.index_select(-1, k_pos).bool()

        heads, groups = query.size(2), key.size(2)
        if heads != groups:  # grouped queries: query head i reads key/value group i // (heads / groups)
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        dropout = self.dropout if self.training else 0.0
        # megatron's rule: dropout of heads that TP splits draws from the tensor-parallel RNG stream
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 is_causal=causal and allowed is None, scale=self.softmax_scale)
        out = out.permute(2, 0, 1, 3).reshape(local_len, batch, heads * out.size(-1))  # [sq, b, np * hn]
        return out.squeeze(1) if cu_seqlens is not None else out


def _packed_boundaries(packed_seq_params: PackedSeqParams | None) -> torch.Tensor | None:
    """Global (padded) document boundaries of a THD batch; None for [s, b] batches."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, cu_seqlens: torch.Tensor | None, *, causal: bool):
    """[sq, sk] True where a query may read a key: same packed document, and not in its future when causal."""
    allowed = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if cu_seqlens is not None:
        allowed &= document_ids(k_pos, cu_seqlens).unsqueeze(0) == document_ids(q_pos, cu_seqlens).unsqueeze(1)
    return allowed
