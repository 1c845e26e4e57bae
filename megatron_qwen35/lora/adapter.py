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
- replicated (the MoE router: its weight whole on every TP rank, reading this rank's tokens): no collective; under
  SP each rank's A and B gradients cover its sequence slice: marked `sequence_parallel` (summed over TP), as megatron
  marks the router's weight. The router is not called as a linear (TopKRouter.gating computes its logits), so the
  update joins the logits there (`_gating_with_update`) instead of through a forward hook.
- a routed expert's linear (the token dispatcher moves the tokens to it; expert TP is 1): no collective,
  and the adapter's parameters are expert parameters (`allreduce = False`: reduced over the expert data-parallel
  group), like the expert's weight. Expert tensor parallelism (ETP > 1) is refused (lora/apply.py).
- one adapter shared by a layer's routed experts (`share_adapter`, `--lora-experts shared`): no collective in the
  forward; each rank's gradient covers the tokens its local experts received, so its parameters are dense ones,
  reduced over data x context parallel ranks (expert-parallel ranks among them) and, under SP, summed over TP (each
  TP rank's experts received other tokens). It is one set of checkpoint entries for the layer, replicated.
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib

import torch
from megatron.core.tensor_parallel import mappings

from megatron_qwen35.lora.targets import COLUMN, REPLICATED, ROW


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one linear: `parts` named A's [rank, in (local)] and B's rows [out (local), rank]:
    parameters `A_{part}` and `B_{i}` (one per TP section)."""

    def __init__(self, *, parallel: str, parts: dict[str, int], row_part: torch.Tensor, sections: list[int],
                 in_features: int, rank: int, alpha: float, dropout: float, tp_group, sequence_parallel: bool,
                 expert: bool, dtype: torch.dtype, device):
        super().__init__()
        self.parallel, self.rank, self.scaling = parallel, rank, alpha / rank
        self.tp_group, self.sequence_parallel, self.expert = tp_group, sequence_parallel, expert
        self.part_names = list(parts)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        factory = dict(dtype=dtype, device=device)
        # Parameters of this module itself (`A_{part}`, `B_{i}`), not of a ParameterDict / ParameterList: megatron's
        # DDP waits for a parameter's all-gather (--overlap-param-gather) in the forward pre-hook of the module that
        # owns it, which a container, never called, would not run (the first update would land a step late).
        for p in self.part_names:
            self.register_parameter(f"A_{p}", torch.nn.Parameter(torch.empty(rank, in_features, **factory)))
        for i, n in enumerate(sections):
            self.register_parameter(f"B_{i}", torch.nn.Parameter(torch.zeros(n, rank, **factory)))
        self.sections = len(sections)
        # which part's h each local output row reads (-1: a row of a part not adapted): a [rows, parts x rank] mask
        block = torch.zeros(len(row_part), len(self.part_names) * rank, dtype=dtype, device=device)
        for i, name in enumerate(self.part_names):
            block[(row_part == parts[name]).to(device), i * rank:(i + 1) * rank] = 1
        self.register_buffer("block", block, persistent=False)
        # one part reading every row (most linears): B is used as it is, without the mask (the forward's hot path)
        # (a model built on the meta device for its key schema only never runs)
        self.masked = (len(self.part_names) > 1 or row_part.is_meta
                       or not bool((row_part == parts[self.part_names[0]]).all()))

    @torch.no_grad()
    def initialise(self, name: str, seed: int, tp_rank: int, tp_size: int) -> None:
        """peft's initialisation (A kaiming-uniform over the whole, unsplit A; B zero: the update starts at 0), drawn
        from a generator keyed by the adapter's global name and `seed`, so that every parallel layout draws the same
        numbers; a row-parallel A keeps this rank's columns."""
        split = self.parallel == ROW and not self.expert
        if self.block.is_meta:  # a model built for its key schema only (convert/megatron_keys.py)
            return
        for part, a in self.A.items():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}.{part}".encode()))
            whole = torch.empty(a.shape[0], a.shape[1] * (tp_size if split else 1), dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=g)
            a.copy_(whole[:, tp_rank * a.shape[1]:(tp_rank + 1) * a.shape[1]] if split else whole)
        for b in self.B:
            b.zero_()

    @property
    def A(self) -> dict[str, torch.nn.Parameter]:
        """Each adapted part's A [rank, in (local)]."""
        return {p: getattr(self, f"A_{p}") for p in self.part_names}

    @property
    def B(self) -> list[torch.nn.Parameter]:
        """B's TP sections [rows (local), rank], in the linear's row order."""
        return [getattr(self, f"B_{i}") for i in range(self.sections)]

    def weight_B(self) -> torch.Tensor:
        """This rank's B rows in the linear's local order [out, parts x rank] (zero outside each row's part)."""
        b = torch.cat(self.B, dim=0) if self.sections > 1 else self.B[0]
        return b.repeat(1, len(self.part_names)) * self.block if self.masked else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.parallel == COLUMN:
            if self.sequence_parallel and not self.expert:
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                                  group=self.tp_group)
            h = torch.cat([torch.nn.functional.linear(x, self.A[p]) for p in self.part_names], dim=-1)
            if not self.expert:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            return torch.nn.functional.linear(h, self.weight_B()) * self.scaling
        h = torch.nn.functional.linear(x, self.A[self.part_names[0]])
        if self.parallel == REPLICATED:
            return torch.nn.functional.linear(h, self.weight_B()) * self.scaling
        if not self.expert:
            h = (mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel else mappings.reduce_from_tensor_model_parallel_region(h, self.tp_group))
        return torch.nn.functional.linear(h, self.weight_B()) * self.scaling


def linear_tp_group(linear: torch.nn.Module):
    """The tensor-parallel group megatron built `linear` for (an expert's: the expert tensor-parallel group). Megatron's
    Transformer Engine wrappers keep it as `_tp_group`; TE's own `tp_group` is None on an expert linear under expert
    parallelism, whose communication megatron does itself (read against megatron-core 0.19.2's
    extensions/transformer_engine.py, TELinear.__init__: `tp_group_for_te = None` where `explicit_expert_comm`, then
    `self._tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)`). The local backend's
    linears keep it as `tp_group`."""
    group = getattr(linear, "_tp_group", None)
    return group if group is not None else linear.tp_group


def adapter_input(linear, x: torch.Tensor) -> torch.Tensor:
    """What the adapted linear multiplies: its input, normalised first where the linear fuses the layer norm before
    it (Transformer Engine's LayerNormLinear: `layer_norm_weight`, read against TE 2.x's LayerNormLinear: RMSNorm in
    the language model, LayerNorm with `layer_norm_bias` in the vision tower, gamma + 1 with zero_centered_gamma,
    `eps`), as the local backend's separate norm module does."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return x
    normalization = getattr(linear, "normalization", "RMSNorm")
    gamma = weight + 1 if getattr(linear, "zero_centered_gamma", False) else weight
    x32 = x.float()
    if normalization == "LayerNorm":
        bias = getattr(linear, "layer_norm_bias", None)
        return torch.nn.functional.layer_norm(x32, (x.shape[-1],), gamma.float(),
                                              None if bias is None else bias.float(), linear.eps).to(x.dtype)
    if normalization != "RMSNorm":
        raise ValueError(f"LoRA on a {type(linear).__name__} with {normalization}: Qwen3.5 uses RMSNorm and LayerNorm")
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + linear.eps) * gamma.float()).to(x.dtype)


def _adapter_of(linear) -> LoRAAdapter:
    """The adapter that updates `linear`: its own (`lora`), or the one its holder shares with other experts."""
    return linear.__dict__.get("shared_lora_holder", linear).lora


def _add_update(linear, inputs, output):
    """Forward hook: the linear's (output, bias) plus the adapter's update of its input."""
    update = _adapter_of(linear)(adapter_input(linear, inputs[0]))
    if isinstance(output, tuple):
        return (output[0] + update.to(output[0].dtype), *output[1:])
    return output + update.to(output.dtype)


def _gating_with_update(router, input):
    """TopKRouter.gating with the adapter's update added to the logits (in the logits' dtype: --moe-router-dtype)."""
    logits = type(router).gating(router, input)
    adapter = router._modules.get("lora")  # None: hidden from a load (hidden_adapters)
    return logits if adapter is None else logits + adapter(input).to(logits.dtype)


def _sharded_state_dict(linear, prefix="", sharded_offsets=(), metadata=None):
    """The linear's own entries (without the adapter, which its class would save as replicated) and the adapter's:
    column-parallel B sections split over TP on rows, row-parallel A split on columns, the rest replicated."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    adapter = linear._modules.pop("lora", None)  # None: hidden from a load (hidden_adapters)
    try:
        entries = type(linear).sharded_state_dict(linear, prefix, sharded_offsets, metadata)
    finally:
        if adapter is not None:
            linear._modules["lora"] = adapter
    if adapter is None:
        return entries
    state = adapter.state_dict(prefix="", keep_vars=True)
    axis = ({f"B_{i}": 0 for i in range(adapter.sections)} if adapter.parallel == COLUMN
            else {f"A_{p}": 1 for p in adapter.part_names} if adapter.parallel == ROW else {})
    entries.update(make_sharded_tensors_for_checkpoint(state, f"{prefix}lora.", axis, sharded_offsets,
                                                       tp_group=linear_tp_group(linear),
                                                       dp_cp_group=(metadata or {}).get("dp_cp_group")))
    return entries


def attach_adapter(linear: torch.nn.Module, adapter: LoRAAdapter) -> None:
    """Make `adapter` the `lora` child of `linear`, added to its output, saved in its checkpoint entries, its
    parameters marked as megatron marks the linear's (for the gradient reductions and the gradient norm)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    linear.lora = adapter
    if adapter.parallel == REPLICATED:
        linear.gating = types.MethodType(_gating_with_update, linear)
    else:
        linear.register_forward_hook(_add_update)
    linear.sharded_state_dict = types.MethodType(_sharded_state_dict, linear)
    if adapter.expert:  # an expert's: one per expert as its weight is, reduced over the expert-DP group
        for p in adapter.parameters():
            for attr in ("allreduce", "tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(linear.weight, attr):
                    setattr(p, attr, getattr(linear.weight, attr))
        return
    if adapter.parallel == REPLICATED:  # whole on every TP rank: under SP each rank's gradient covers its slice
        for p in adapter.parameters():
            p.sequence_parallel = adapter.sequence_parallel
        return
    # split over TP (counted on every rank in the gradient norm): column-parallel B's rows, row-parallel A's columns
    for p in adapter.B if adapter.parallel == COLUMN else adapter.A.values():
        set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0 if adapter.parallel == COLUMN else 1,
                                             stride=1)
    if adapter.sequence_parallel and adapter.parallel != COLUMN:
        for b in adapter.B:
            b.sequence_parallel = True  # each rank's gradient covers its sequence slice: summed over TP


def share_adapter(experts: torch.nn.Module, name: str, adapter: LoRAAdapter, linears: list[torch.nn.Module], *,
                  tp_group, sequence_parallel: bool) -> None:
    """Make `adapter` update every linear of `linears` (the local routed experts' linear_fc1, or linear_fc2, of one
    layer), held by a module `name` of `experts` (so its parameters and checkpoint entries exist once), its
    parameters dense (see the module docstring); `tp_group` is the layer's tensor-parallel group."""
    if tp_group.size() > 1 and not sequence_parallel:
        raise ValueError("--lora-experts shared with tensor parallelism needs sequence parallelism (each TP rank's "
                         "experts then see other tokens, and their shared adapter's gradients are summed over TP): "
                         "add --sequence-parallel, as the recipes do")
    holder = torch.nn.Module()
    holder.lora = adapter
    experts.add_module(name, holder)
    for linear in linears:
        linear.__dict__["shared_lora_holder"] = holder  # not a child: the holder owns the adapter
        linear.register_forward_hook(_add_update)
    for p in adapter.parameters():
        p.sequence_parallel = sequence_parallel
    experts.shared_lora_tp_group = tp_group
    if "sharded_state_dict" not in experts.__dict__:
        experts.sharded_state_dict = types.MethodType(_experts_sharded_state_dict, experts)


def _experts_sharded_state_dict(experts, prefix="", sharded_offsets=(), metadata=None):
    """The experts' entries (megatron's SequentialMLP: each local expert's, under its global index), and each shared
    adapter's, replicated like a dense layer's tensors (one per layer, the same at every EP size)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    entries = type(experts).sharded_state_dict(experts, prefix, sharded_offsets, metadata)
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    for name, holder in experts.named_children():
        adapter = holder._modules.get("lora")
        if name == "local_experts" or not isinstance(adapter, LoRAAdapter):  # (None: hidden from a load)
            continue
        entries.update(make_sharded_tensors_for_checkpoint(
            adapter.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.lora.", {}, sharded_offsets,
            tp_group=experts.shared_lora_tp_group, dp_cp_group=metadata["dp_cp_group"]))
    return entries


@contextlib.contextmanager
def hidden_adapters(model: torch.nn.Module):
    """`model` without its adapters while megatron builds the state dict it loads from a checkpoint that has none."""
    linears = [m for m in model.modules() if isinstance(m._modules.get("lora"), LoRAAdapter)]
    adapters = [m._modules.pop("lora") for m in linears]
    try:
        yield
    finally:
        for m, a in zip(linears, adapters, strict=True):
            m._modules["lora"] = a


__all__ = ["LoRAAdapter", "linear_tp_group", "adapter_input", "attach_adapter", "share_adapter", "hidden_adapters"]
