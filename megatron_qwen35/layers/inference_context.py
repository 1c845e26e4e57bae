"""megatron's static inference context for a batch of left-padded prompts: which slots are padding, and the position
of every slot, for the layers that need them while generating.

megatron-core's `StaticInferenceContext` keeps every attention layer's KV cache (`key_value_memory_dict[layer_number]`,
written by `SelfAttention`) and counts the tokens already cached (`sequence_len_offset`); our Gated DeltaNet keeps its
conv and recurrent states in the same dict under its own layer number, as megatron's Mamba layers do. What the static
context lacks is padding: it assumes every row's first token sits in slot 0.

Left padding: row i's prompt fills the last n_i of the prompt's s slots; after the prompt every row generates into the
same slot, one token per step. Nothing a real token computes depends on the pads in front of it:
- positions count real tokens only (slot j of row i is at position j - pads_i; a pad is at 0): transformers'
  `generate` derives the same from the attention mask (cumsum - 1, pads 0);
- attention never reads a pad key; a pad query reads only itself, so no softmax row is empty (torch 2.13's SDPA
  returns zeros for one, a plain softmax NaN, which the pads' residual stream would carry into later attention
  layers' values, where a weight of 0 times NaN is NaN);
- Gated DeltaNet zeroes its input at pads (transformers' `apply_mask_to_padding_states`): zero input projects to zero
  q, k, v, so the conv and recurrent states stay exactly as if the pads were not there.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


class Qwen35InferenceContext(StaticInferenceContext):
    """megatron's static-batch context (caches keyed by layer number, `sequence_len_offset`), plus the prompts' left
    padding. `prompt_padding` [b, s] is True at the pads, which open each row."""

    def __init__(self, prompt_padding: torch.Tensor, max_sequence_length: int):
        batch, prompt_len = prompt_padding.shape
        if prompt_len > max_sequence_length:
            raise ValueError(f"the prompts take {prompt_len} slots, more than max_sequence_length="
                             f"{max_sequence_length}")
        super().__init__(max_batch_size=batch, max_sequence_length=max_sequence_length)
        self.prompt_padding = prompt_padding.bool()
        self.pad_counts = self.prompt_padding.sum(dim=1)  # [b]: a row's pads are its first pad_counts slots
        self.has_padding = bool(self.pad_counts.any())  # asked once: on a GPU every answer is a device sync

    def padding(self, num_tokens: int) -> torch.Tensor | None:
        """[b, num_tokens] True at the pads among the tokens of the forward that starts at `sequence_len_offset`;
        None when it holds none (every step after the prompt)."""
        start = self.sequence_len_offset
        if not self.has_padding or start >= self.prompt_padding.shape[1]:
            return None
        pads = self.prompt_padding[:, start:start + num_tokens]
        return torch.nn.functional.pad(pads, (0, num_tokens - pads.shape[1]))  # tokens past the prompt are real

    def positions(self) -> torch.Tensor:
        """[b, max_sequence_length] the rope position of every slot: real tokens count from 0 in each row."""
        slots = torch.arange(self.max_sequence_length, device=self.pad_counts.device)
        return (slots.unsqueeze(0) - self.pad_counts.unsqueeze(1)).clamp_min(0)

    def attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """megatron's convention, True = masked: [b, 1, num_tokens, offset + num_tokens] hiding every pad key from
        the forward that starts at `sequence_len_offset`, except a pad query's own key; None when no slot so far is a
        pad. Causality is the attention mask type's job."""
        if not self.has_padding:
            return None
        start, end = self.sequence_len_offset, self.sequence_len_offset + num_tokens
        keys = torch.arange(end, device=self.pad_counts.device)
        pad_keys = keys.unsqueeze(0) < self.pad_counts.unsqueeze(1)  # [b, sk]
        own_key = keys.unsqueeze(0) == torch.arange(start, end, device=keys.device).unsqueeze(1)  # [sq, sk]
        return (pad_keys.unsqueeze(1) & ~own_key.unsqueeze(0)).unsqueeze(1)  # [b, 1, sq, sk]
