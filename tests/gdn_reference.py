"""The gated delta rule one token at a time, elementwise, in float32: the definition both of megatron_qwen35's backends
(the chunked PyTorch path and FLA's kernels) are held against. Slow; tests only (layers/gdn_ops has the fast paths).

The recurrence per head (state S [dk, dv]), exactly transformers' `torch_recurrent_gated_delta_rule`:
    q, k <- l2norm(q), l2norm(k) (if use_qk_l2norm); q <- q * scale; S <- S * exp(g_t);
    delta = (v_t - S^T k_t) * beta_t; S <- S + k_t delta^T; o_t = S^T q_t
"""

from __future__ import annotations

import torch

from megatron_qwen35.layers.gdn_ops.common import (
    _doc_lengths,
    _initial_state_rows,
    _prepare_inputs,
    _value_heads_per_key_head,
)


def recurrent_scan(q, k, v, g, beta, state):
    """Token-by-token gated delta rule on prepared fp32 inputs.

    q, k [b, t, h, dk]; v [b, t, h, dv]; g, beta [b, t, h]; state [b, h, dk, dv].
    Returns o [b, t, h, dv] and the final state [b, h, dk, dv].
    """
    outputs = []
    for i in range(q.shape[1]):
        q_t, k_t, v_t = q[:, i], k[:, i], v[:, i]  # [b, h, dk|dv]
        state = state * g[:, i].exp()[..., None, None]
        kv_mem = (state * k_t.unsqueeze(-1)).sum(dim=-2)  # S^T k: [b, h, dv]
        delta = (v_t - kv_mem) * beta[:, i].unsqueeze(-1)
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outputs.append((state * q_t.unsqueeze(-1)).sum(dim=-2))  # S^T q: [b, h, dv]
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule, one token at a time in float32 (slow; for tests).

    Same arguments and results as `chunk_gated_delta_rule`.
    """
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    group = _value_heads_per_key_head(q, v)
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)  # [b, t, h, dk]: plain, for tests

    if cu_seqlens is None:
        state = _initial_state_rows(initial_state, b, h, dk, dv, v)
        o, final = recurrent_scan(q, k, v, g, beta, state)
    else:
        lengths = _doc_lengths(cu_seqlens, b, t)
        states = _initial_state_rows(initial_state, len(lengths), h, dk, dv, v)
        # Run every document on its own: that is the definition of "state resets at boundaries".
        pieces = [x.split(lengths, dim=1) for x in (q, k, v, g, beta)]
        outs, finals = [], []
        for d, doc in enumerate(zip(*pieces, strict=True)):
            o_d, s_d = recurrent_scan(*doc, states[d : d + 1])
            outs.append(o_d)
            finals.append(s_d)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)

    return o.to(out_dtype), (final if output_final_state else None)
