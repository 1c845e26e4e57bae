"""Qwen3.5's Gated DeltaNet token mixer as a megatron-core module that runs on any device.

Shape legend: s sequence, b batch, h value heads (local to this TP rank), hk key heads, dk / dv head dims.

Differs from megatron-core's `GatedDeltaNet`, whose parameters, tensor-parallel sharding and `sharded_state_dict`
(the fused in_proj split into named q/k/v/z/beta/alpha sections and the conv into q/k/v, so a checkpoint saved at
one TP size loads at another) we inherit unchanged:
- the forward sends every kernel (causal conv, gated delta rule, q/k L2 norm) through `gdn_ops`, which chooses
  FLA's Triton kernels for CUDA tensors and pure PyTorch elsewhere; megatron's calls FLA unconditionally;
- the gated output norm's weight is shared by all value heads, which tensor parallelism splits across ranks, so
  its gradient is summed over the TP group, by megatron's finalize_model_grads once per step (megatron sums it only
  under sequence parallelism);
- one mixing core (`_mix`) serves training (plain and packed) and generation; of megatron's forward only its
  extension points are used (`_setup_variant_attrs`, `_compute_g_and_beta`, `_apply_gated_norm`), and every upstream
  function this file depends on is fingerprinted (runtime/register.py's DEPENDENCIES);
- context parallelism goes through megatron's all-to-all to head parallelism (each rank runs the whole sequence for
  1/cp of the heads), then into natural token order by `context_parallel.load_balanced_positions`, which also
  knows packed (THD) batches, whose every document is spread over all CP ranks;
- it generates (megatron's raises NotImplementedError): given a static inference context, the prompt goes through the
  chunked kernel and the tokens after it through the recurrent one, continuing conv and recurrent states that the
  context keeps under this layer's number; prompts' left padding is zeroed at the input (`inference_context.py`).
Numerics follow transformers' `Qwen3_5GatedDeltaNet`: in_proj = [qkv | z | b | a], g = -exp(A_log) *
softplus(a + dt_bias) in fp32, beta = sigmoid(b), out = out_proj(rmsnorm(o) * w * silu(z)).
"""

from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.ssm.gated_delta_net.common import (
    _build_head_perm_for_split_sections,
    get_parameter_local_cp,
    tensor_a2a_cp2hp,
    tensor_a2a_hp2cp,
)

from megatron_qwen35.layers import gdn_ops
from megatron_qwen35.layers.context_parallel import load_balanced_positions, natural_order_index
from megatron_qwen35.layers.inference_context import Qwen35InferenceContext

# Parameters that stay fp32 whatever the model's precision: the released checkpoints store them so (serving engines
# assert an fp32 A_log) and the decay exp(A_log) * softplus(a + dt_bias) is computed in fp32 anyway.
FP32_PARAMETERS = ("A_log", "out_norm.weight")


class Qwen35GatedDeltaNet(GatedDeltaNet):
    """megatron-core's GatedDeltaNet parameters and checkpoint layout, with a device-agnostic forward and the
    FP32_PARAMETERS kept in fp32 under --bf16 / --fp16 (their parameters, gradients, optimizer state, checkpoints).

    `kernels`: "fla" (FLA's Triton kernels where Triton runs the tensors; an error where they do not import) or
    "torch" (the PyTorch path everywhere), the user's --gdn-kernels; CPU tensors always take the PyTorch path."""

    def __init__(self, *args, kernels: str = "fla", **kwargs):
        super().__init__(*args, **kwargs)
        if self.conv_bias:
            raise ValueError("Qwen3.5's Gated DeltaNet conv has no bias; conv_bias=True is not supported")
        if kernels not in gdn_ops.KERNELS:
            raise ValueError(f"unknown Gated DeltaNet kernels {kernels!r}; choose one of {gdn_ops.KERNELS}")
        self.kernels = kernels
        for name in FP32_PARAMETERS:  # megatron builds them in params_dtype; their initial values are exact in fp32
            param = self.get_parameter(name)
            param.data = param.data.float()
        if self.tp_size > 1:
            _reduce_grad_over_tp_once_per_step(self.out_norm.weight, self.tp_size)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, except that a cast to a 16-bit float (megatron's Float16Module calls module.bfloat16())
        leaves the FP32_PARAMETERS in fp32; moves to another device still apply to them."""
        fp32 = {name: self.get_parameter(name).data for name in FP32_PARAMETERS}
        super()._apply(fn, recurse)
        for name, data in fp32.items():
            param = self.get_parameter(name)
            if data.dtype == torch.float32 and param.dtype in (torch.bfloat16, torch.float16):
                param.data = data.to(param.device)
        return self

    def _setup_variant_attrs(self):
        super()._setup_variant_attrs()
        self.gated_delta_rule = gdn_ops.chunk_gated_delta_rule  # our dispatch, never megatron's FLA binding

    def forward(self, hidden_states, attention_mask, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, *, inference_params=None, **kwargs):
        """hidden_states [s(/tp under SP), b, hidden] -> (out [s(/tp), b, hidden], bias None)."""
        inference_context = inference_context if inference_context is not None else inference_params
        if inference_context is not None:
            return self._forward_inference(hidden_states, inference_context)
        qkvzba, _ = self.in_proj(hidden_states)  # [s(/cp), b, in_proj_dim / tp]; SP gathers the sequence here
        cp_positions = None
        if self.cp_size > 1:  # context -> head parallel: every rank gets the whole sequence of 1/cp of the heads
            head_perm = _build_head_perm_for_split_sections(self.in_proj_split_sections, self.cp_size,
                                                            qkvzba.device)
            qkvzba = tensor_a2a_cp2hp(qkvzba.index_select(-1, head_perm), seq_dim=0, head_dim=-1,
                                      cp_group=self.pg_collection.cp,
                                      undo_attention_load_balancing=False)  # ranks' tokens one after another
        seq_len, batch = qkvzba.shape[:2]
        cu_seqlens = _packed_cu_seqlens(packed_seq_params, seq_len, batch)
        if self.cp_size > 1:  # the recurrence needs natural order, per packed sequence
            cp_positions = load_balanced_positions(seq_len, self.cp_size, cu_seqlens, device=qkvzba.device)
            qkvzba = qkvzba.index_select(0, natural_order_index(cp_positions))
        core, gate, _ = self._mix(qkvzba.transpose(0, 1), cu_seqlens=cu_seqlens)  # [b, s, x] in

        norm = partial(self._gated_norm, batch=batch, seq_len=seq_len, cp_positions=cp_positions)
        if self.recompute_norm_out:
            # fp8 must be the config's (None or a recipe name): megatron reads `fp8 is not None`, so the default False
            # would ask for Transformer Engine's fp8 state even without TE.
            self.norm_out_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
            normed = self.norm_out_checkpoint.checkpoint(norm, core, gate)
        else:
            normed = norm(core, gate)
        out, out_bias = self.out_proj(normed)  # row-parallel: reduce (or reduce-scatter under SP)
        if self.recompute_norm_out:
            self.norm_out_checkpoint.discard_output_and_register_recompute(out)
        return out, out_bias

    def _mix(self, qkvzba, *, cu_seqlens=None, states=None):
        """The token mixing every forward shares, on in_proj's output [b, s, x] in natural token order: split, causal
        conv (SiLU), q / k / v heads, decay and beta (megatron's `_compute_g_and_beta`: fp32, since in bf16 the
        decay underflows), gated delta rule. Returns core [b, s, h, dv], the output gate z [b, s, h, dv] and, for
        generation (`states`: the conv state [b, c, k] and recurrent state [b, h, dk, dv] the earlier tokens left),
        the states after these tokens (None in training). Training runs the chunked kernels over whole (packed,
        `cu_seqlens`) sequences; generation continues from `states`, the prompt through the chunked kernel and a
        single token through the recurrent one."""
        batch, seq_len = qkvzba.shape[:2]
        qkv, gate, beta, alpha = torch.split(qkvzba, list(self.feat_dim_split), dim=-1)
        cp = self.pg_collection.cp
        kernel_choice = dict(kernels=self.kernels, deterministic=self.config.deterministic_mode)
        conv_weight = get_parameter_local_cp(self.conv1d.weight.squeeze(1), dim=0, cp_group=cp,
                                             split_sections=[self.qk_dim_local_tp, self.qk_dim_local_tp,
                                                             self.v_dim_local_tp])  # this rank's heads' channels
        if states is None:
            qkv = gdn_ops.causal_conv1d(qkv, conv_weight, cu_seqlens=cu_seqlens, activation="silu", **kernel_choice)
        else:
            qkv, conv_state = gdn_ops.causal_conv1d_with_state(qkv, conv_weight, states[0], activation="silu",
                                                               **kernel_choice)
        qk_dim, v_dim = self.qk_dim_local_tp // self.cp_size, self.v_dim_local_tp // self.cp_size
        query, key, value = torch.split(qkv, [qk_dim, qk_dim, v_dim], -1)
        query = query.reshape(batch, seq_len, -1, self.key_head_dim)  # [b, s, hk, dk]: FLA reads shared key heads
        key = key.reshape(batch, seq_len, -1, self.key_head_dim)
        value = value.reshape(batch, seq_len, -1, self.value_head_dim)  # [b, s, h, dv]
        g, beta = self._compute_g_and_beta(get_parameter_local_cp(self.A_log, dim=0, cp_group=cp),
                                           get_parameter_local_cp(self.dt_bias, dim=0, cp_group=cp), alpha, beta)
        gate = gate.reshape(batch, seq_len, -1, self.value_head_dim)
        rule = dict(use_qk_l2norm=self.use_qk_l2norm, **kernel_choice)
        if states is None:
            core, _ = self.gated_delta_rule(query, key, value, g, beta, cu_seqlens=cu_seqlens, **rule)
            return core, gate, None
        if seq_len == 1:
            core, recurrent_state = gdn_ops.fused_recurrent_gated_delta_rule(query, key, value, g, beta,
                                                                             initial_state=states[1], **rule)
        else:
            core, recurrent_state = self.gated_delta_rule(query, key, value, g, beta, initial_state=states[1],
                                                          output_final_state=True, **rule)
        return core, gate, (conv_state, recurrent_state)

    def _forward_inference(self, hidden_states, context):
        """One forward of generation: the prompt (`sequence_len_offset` 0) or the tokens after it, continuing the conv
        and recurrent states kept in megatron's static inference context under this layer's number (as megatron's
        Mamba layers keep theirs)."""
        if not context.is_static_batching():
            raise ValueError("Qwen35GatedDeltaNet generates with a static inference context (megatron's "
                             "StaticInferenceContext or megatron_qwen35's Qwen35InferenceContext); dynamic batching is "
                             "not supported")
        if self.cp_size > 1 or self.config.sequence_parallel:
            raise ValueError("Qwen35GatedDeltaNet generates without context or sequence parallelism; build the "
                             "inference model with context_parallel_size=1 and sequence_parallel=False")
        seq_len, batch = hidden_states.shape[:2]
        padding = context.padding(seq_len) if isinstance(context, Qwen35InferenceContext) else None  # [b, s]
        if padding is not None:  # transformers' apply_mask_to_padding_states: pads leave both states untouched
            hidden_states = hidden_states.masked_fill(padding.t().unsqueeze(-1), 0.0)
        states = self._inference_states(context, batch, hidden_states)
        qkvzba, _ = self.in_proj(hidden_states)  # [s, b, in_proj_dim / tp]
        core, gate, states = self._mix(qkvzba.transpose(0, 1), states=states)
        context.key_value_memory_dict[self.layer_number] = states
        normed = self._gated_norm(core, gate, batch=batch, seq_len=seq_len, cp_positions=None)
        return self.out_proj(normed)  # row-parallel: reduce over TP

    def _inference_states(self, context, batch: int, like: torch.Tensor):
        """(conv state [b, conv channels / tp, k] in the activations' dtype, recurrent state [b, h / tp, dk, dv] fp32):
        zeros at the start of a sequence (`sequence_len_offset` 0), else what the previous forward left."""
        if context.sequence_len_offset == 0:
            conv = like.new_zeros(batch, self.conv_dim_local_tp, self.conv_kernel_dim)
            recurrent = like.new_zeros(batch, self.num_v_heads_local_tp, self.key_head_dim, self.value_head_dim,
                                       dtype=torch.float32)
            return conv, recurrent
        if self.layer_number not in context.key_value_memory_dict:
            raise ValueError(f"Qwen35GatedDeltaNet layer {self.layer_number}: sequence_len_offset is "
                             f"{context.sequence_len_offset} but the inference context holds no state for this layer; "
                             "run the prompt first (sequence_len_offset 0)")
        conv, recurrent = context.key_value_memory_dict[self.layer_number]
        if conv.shape[0] != batch:
            raise ValueError(f"Qwen35GatedDeltaNet layer {self.layer_number}: the inference context holds states for "
                             f"{conv.shape[0]} sequences, this forward has {batch}")
        return conv, recurrent

    def _gated_norm(self, core, gate, *, batch, seq_len, cp_positions):
        """rmsnorm(core) * w * silu(gate) per value head, back to [s(/cp), b, h * dv]."""
        y = self._apply_gated_norm(core, gate)  # [b * s * h, dv]
        y = y.reshape(batch, seq_len, -1).transpose(0, 1).contiguous()
        if cp_positions is None:
            return y
        y = y.index_select(0, cp_positions.flatten())  # natural order -> the ranks' tokens one after another
        return tensor_a2a_hp2cp(y, seq_dim=0, head_dim=-1, cp_group=self.pg_collection.cp,
                                redo_attention_load_balancing=False)  # back to this rank's tokens


def _packed_cu_seqlens(packed_seq_params: PackedSeqParams | None, seq_len: int, batch: int):
    """Document boundaries of a packed (THD) batch, or None for ordinary [s, b] batches."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if batch != 1:
        raise ValueError(f"packed sequences (qkv_format='thd') need batch 1, got {batch}")
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if int(cu[-1]) != seq_len:
        raise ValueError(f"packed sequence boundaries end at {int(cu[-1])} but the batch has {seq_len} tokens")
    return cu


def _reduce_grad_over_tp_once_per_step(param: torch.nn.Parameter, tp_size: int) -> None:
    """`param` is shared by all value heads, which tensor parallelism splits: its gradient is the sum of the TP
    ranks' gradients. megatron's finalize_model_grads all-reduces the gradients of parameters marked
    `average_gradients_across_tp_domain` over TP, once per step together with the layer norms' (an average); each
    rank's gradient is scaled by the TP size on its way in (local, no communication), so the average is the sum.
    Not marked sequence parallel: megatron would then sum it a second time under SP."""
    param.average_gradients_across_tp_domain = True
    param.sequence_parallel = False
    param.register_hook(lambda grad: grad * tp_size)
