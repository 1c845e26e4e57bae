"""A LoRA adapter on one Megatron linear, in megatron's tensor / sequence / expert parallel layout.

The adapter is a child module (`lora`) of the linear it adapts, added to the linear's output by a forward hook: the
linear stays the module megatron built (its class, its checkpoint names, its Transformer Engine state), and the
adapter adds `scaling * B (A dropout(x))` (peft's LoRA: scaling = alpha / rank). For a linear that fuses several
transformers modules (table in lora/targets.py), each part has its own A, and B holds the fused rows, each row
reading only its part's A: `h = [A_p x for every part p]`, `y = (B * block) h` with `block` selecting each row's part.

Parallel layout (as the wrapped linear's weight is split; collectives from megatron's tensor_parallel.mappings):
- column-parallel (output rows split over TP): A is whole on every rank; B is this rank's rows, stored per TP
  section (megatron splits GDN's in_proj and SwiGLU's fc1 section by section) so that each is one TP-split tensor in
  the checkpoint. Under SP the input is gathered with a backward that only splits (the adapter's input gradient is
  whole and equal on every rank); `h` goes through copy-to-TP (backward all-reduce: each rank's B rows contribute).
- row-parallel (input columns split): A is this rank's columns; `h` is all-reduced (under SP reduce-scattered, like
  the linear's output), B is whole. Under SP each rank's B gradient covers its sequence slice: B is marked
  `sequence_parallel`, so megatron's finalize_model_grads sums it over TP as it does the layer norms'.
- a routed expert's linear (megatron's `explicit_expert_comm`: the token dispatcher moves the tokens): no collective,
  and the adapter's parameters are expert parameters (`allreduce = False`: reduced over the expert data-parallel
  group), like the expert's weight. Expert tensor parallelism (ETP > 1) is refused (lora/apply.py).
"""

from __future__ import annotations

import math
import types

import torch
from megatron.core.tensor_parallel import mappings

from megatron_qwen35.lora.targets import COLUMN


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one linear: `parts` named A's [rank, in (local)] and B's rows [out (local), rank]."""

    def __init__(self, *, parallel: str, parts: dict[str, int], row_part: torch.Tensor, sections: list[int],
                 in_features: int, rank: int, alpha: float, dropout: float, tp_group, sequence_parallel: bool,
                 expert_comm: bool, dtype: torch.dtype, device):
        super().__init__()
        self.parallel, self.rank, self.scaling = parallel, rank, alpha / rank
        self.tp_group, self.sequence_parallel, self.expert_comm = tp_group, sequence_parallel, expert_comm
        self.part_names = list(parts)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        factory = dict(dtype=dtype, device=device)
        self.A = torch.nn.ParameterDict({p: torch.nn.Parameter(torch.empty(rank, in_features, **factory))
                                         for p in self.part_names})
        self.B = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n, rank, **factory)) for n in sections])
        # which part's h each local output row reads (-1: a row of a part not adapted): a [rows, parts x rank] mask
        block = torch.zeros(len(row_part), len(self.part_names) * rank, dtype=dtype, device=device)
        for i, name in enumerate(self.part_names):
            block[row_part == parts[name], i * rank:(i + 1) * rank] = 1
        self.register_buffer("block", block, persistent=False)
        for a in self.A.values():  # peft's default initialisation: A kaiming-uniform, B zero (the update starts at 0)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def weight_B(self) -> torch.Tensor:
        """This rank's B rows in the linear's local order [out, parts x rank] (zero outside each row's part)."""
        return torch.cat(list(self.B), dim=0).repeat(1, len(self.part_names)) * self.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.parallel == COLUMN:
            if self.sequence_parallel and not self.expert_comm:
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                                  group=self.tp_group)
            h = torch.cat([torch.nn.functional.linear(x, self.A[p]) for p in self.part_names], dim=-1)
            if not self.expert_comm:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            return torch.nn.functional.linear(h, self.weight_B()) * self.scaling
        h = torch.nn.functional.linear(x, self.A[self.part_names[0]])
        if not self.expert_comm:
            h = (mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel else mappings.reduce_from_tensor_model_parallel_region(h, self.tp_group))
        return torch.nn.functional.linear(h, self.weight_B()) * self.scaling


def _add_update(linear, inputs, output):
    """Forward hook: the linear's (output, bias) plus the adapter's update of its input."""
    update = linear.lora(inputs[0])
    if isinstance(output, tuple):
        return (output[0] + update.to(output[0].dtype), *output[1:])
    return output + update.to(output.dtype)


def _sharded_state_dict(linear, prefix="", sharded_offsets=(), metadata=None):
    """The linear's own entries (without the adapter, which its class would save as replicated) and the adapter's:
    column-parallel B sections split over TP on rows, row-parallel A split on columns, the rest replicated."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    adapter = linear._modules.pop("lora")
    try:
        entries = type(linear).sharded_state_dict(linear, prefix, sharded_offsets, metadata)
    finally:
        linear._modules["lora"] = adapter
    state = adapter.state_dict(prefix="", keep_vars=True)
    axis = ({f"B.{i}": 0 for i in range(len(adapter.B))} if adapter.parallel == COLUMN
            else {f"A.{p}": 1 for p in adapter.part_names})
    entries.update(make_sharded_tensors_for_checkpoint(state, f"{prefix}lora.", axis, sharded_offsets,
                                                       tp_group=linear.tp_group,
                                                       dp_cp_group=(metadata or {}).get("dp_cp_group")))
    return entries


def attach_adapter(linear: torch.nn.Module, adapter: LoRAAdapter) -> None:
    """Make `adapter` the `lora` child of `linear`, added to its output, saved in its checkpoint entries."""
    linear.lora = adapter
    linear.register_forward_hook(_add_update)
    linear.sharded_state_dict = types.MethodType(_sharded_state_dict, linear)
    if hasattr(linear.weight, "allreduce"):  # an expert's: reduced over the expert data-parallel group, as its weight
        for p in adapter.parameters():
            p.allreduce = linear.weight.allreduce
    if adapter.sequence_parallel and adapter.parallel != COLUMN and not adapter.expert_comm:
        for b in adapter.B:
            b.sequence_parallel = True  # each rank's gradient covers its sequence slice: summed over TP


__all__ = ["LoRAAdapter", "attach_adapter"]
