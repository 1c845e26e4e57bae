"""Generation in PyTorch: the causal conv and the gated delta rule continued, token by token, from the states the
earlier tokens left (conv state [b, c, k], the last k inputs; recurrent state [b, h, dk, dv] float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_qwen35.layers.gdn_ops.common import (
    _activate,
    _initial_state_rows,
    _prepare_inputs,
    _value_heads_per_key_head,
)


def torch_causal_conv1d_with_state(x, weight, conv_state, activation):
    """F.conv1d over [the last k-1 inputs before x | x]: the same products as `torch_chunk.torch_causal_conv1d` at
    every token."""
    kernel = weight.shape[-1]
    inputs = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [b, c, k + t], oldest first
    y = F.conv1d(inputs[..., 1:], weight.to(x.dtype).unsqueeze(1), groups=x.shape[-1])  # [b, c, t]
    return _activate(y.transpose(1, 2), activation), inputs[..., -kernel:].contiguous()


def torch_recurrent_steps(q, k, v, g, beta, scale, initial_state, use_qk_l2norm):
    """The reference recurrence (tests/gdn_reference.py) written for one token at a time: the state [b*h, dk, dv]
    is read by two batched vector-matrix products and written by one in-place rank-1 update, where the reference's
    elementwise form makes three [b, h, dk, dv] temporaries per token (the state dominates a decode step's memory
    traffic)."""
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    group = _value_heads_per_key_head(q, v)
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)  # [b, t, h, dk]: t tokens, small
    state = _initial_state_rows(initial_state, b, h, dk, dv, v).reshape(b * h, dk, dv).clone()  # written in place
    outputs = []
    for i in range(t):
        q_i, k_i, v_i = q[:, i].reshape(b * h, 1, dk), k[:, i].reshape(b * h, 1, dk), v[:, i].reshape(b * h, 1, dv)
        state.mul_(g[:, i].exp().reshape(b * h, 1, 1))  # S <- S * exp(g)
        delta = (v_i - torch.bmm(k_i, state)) * beta[:, i].reshape(b * h, 1, 1)  # (v - S^T k) * beta: [bh, 1, dv]
        state.baddbmm_(k_i.transpose(1, 2), delta)  # S <- S + k delta^T
        outputs.append(torch.bmm(q_i, state).reshape(b, h, dv))  # o = S^T q
    return torch.stack(outputs, dim=1).to(out_dtype), state.reshape(b, h, dk, dv)
