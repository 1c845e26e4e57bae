"""Gated DeltaNet math: the gated delta rule and the short causal convolution.

Shape legend (used in the shape comments below):
    b batch, t tokens, h value heads, hk key heads, dk key dim, dv value dim, c channels, k conv kernel,
    n documents (== b without cu_seqlens), nc chunks, C chunk size (64), tp padded tokens.

Layout is FLA's batch-first one: q, k [b, t, hk, dk]; v [b, t, h, dv]; g, beta [b, t, h].
Grouped value heads: hk divides h, and value head i reads key head i // (h // hk) (what
`repeat_interleave(h // hk, dim=2)` of q and k would give). FLA reads the shared key heads in place; the torch
path l2-normalises them at hk heads and repeats them while laying them out chunk-major (one copy, no extra pass).

Two backends behind one API, chosen per call by `fla.kernel` from the input's device and the caller's choice
(`kernels`, "fla" or "torch"; the layer takes it from --gdn-kernels):
  * where Triton can run FLA's kernels (CUDA tensors, or any tensor while Triton's interpreter is enabled by
    runtime.triton_interpreter): FLA's Triton kernels, unless "torch" is chosen or deterministic=True; FLA that does
    not import there is an error naming why, never a quiet switch;
  * CPU tensors, "torch", deterministic: a pure-PyTorch chunked implementation, differentiable with autograd,
    computed in float32 and written to be fast on CPU (torch_chunk.py).

    common.py       what the PyTorch paths share (preparation, checks, document lengths, the activation)
    fla.py          FLA's kernels and the choice between them and PyTorch
    torch_chunk.py  the chunked gated delta rule and the causal conv in PyTorch
    decode.py       generation's conv and recurrence continued from saved states, in PyTorch
The token-by-token recurrence that both backends are held against lives with the tests (tests/gdn_reference.py).

Generation continues a sequence from the states its earlier tokens left: the prompt through
`chunk_gated_delta_rule(..., output_final_state=True)` and `causal_conv1d_with_state`, then each new token through
`fused_recurrent_gated_delta_rule` (recurrent state [b, h, dk, dv], fp32) and `causal_conv1d_with_state` (conv state
[b, c, k], the last k inputs: FLA's and transformers' cache layout).

The recurrence (per head, state S of shape [dk, dv]), exactly as transformers'
`torch_recurrent_gated_delta_rule` in models/qwen3_5/modeling_qwen3_5.py:
    q, k  <- l2norm(q), l2norm(k)         (if use_qk_l2norm)
    q     <- q * scale
    S     <- S * exp(g_t)
    delta  = (v_t - S^T k_t) * beta_t
    S     <- S + k_t delta^T
    o_t    = S^T q_t
"""

from __future__ import annotations

import torch

from megatron_qwen35.layers.gdn_ops import decode, fla, torch_chunk
from megatron_qwen35.layers.gdn_ops.common import CHUNK_SIZE
from megatron_qwen35.layers.gdn_ops.fla import KERNELS, FLAUnavailable

__all__ = [
    "CHUNK_SIZE",
    "KERNELS",
    "FLAUnavailable",
    "causal_conv1d",
    "causal_conv1d_with_state",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
]


def chunk_gated_delta_rule(
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
    kernels: str = "fla",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a whole sequence.

    q, k [b, t, hk, dk]; v [b, t, h, dv]; g [b, t, h] (log decay, <= 0); beta [b, t, h]; hk divides h.
    scale: query scale, default dk ** -0.5 (applied after the optional l2norm).
    initial_state / final state: [n, h, dk, dv] float32, n = b, or the number of documents with
    cu_seqlens ([n + 1] cumulative lengths, b == 1; the state restarts at every document).
    Returns o [b, t, h, dv] in v.dtype and the final state (None unless output_final_state).
    FLA's kernels where Triton runs them (unless `kernels="torch"` or deterministic); else float32 PyTorch.
    """
    fla_chunk = fla.kernel("chunk_gated_delta_rule", q, kernels=kernels, deterministic=deterministic)
    if fla_chunk is not None:
        return fla_chunk(  # takes hk < h as it is: value head i reads key head i // (h // hk)
            q, k, v, g, beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=cu_seqlens,
        )
    return torch_chunk.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
    )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    kernels: str = "fla",
    deterministic: bool = False,
) -> torch.Tensor:
    """Depthwise causal convolution without bias.

    x [b, t, c]; weight [c, k]; y[:, i, c] = act(sum_j weight[c, j] * x[:, i - (k-1) + j, c]), with zeros
    before the start of the sequence, or of each document when cu_seqlens ([n + 1], b == 1) is given.
    Returns y [b, t, c] in x.dtype. FLA's Triton conv where Triton runs it (unless deterministic).
    """
    fla_conv = fla.kernel("causal_conv1d", x, kernels=kernels, deterministic=deterministic)
    if fla_conv is not None:
        y, _ = fla_conv(x, weight, bias=None, activation=activation, cu_seqlens=cu_seqlens)
        return y
    return torch_chunk.torch_causal_conv1d(x, weight, cu_seqlens, activation)


def causal_conv1d_with_state(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    *,
    activation: str | None = "silu",
    kernels: str = "fla",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv1d` of tokens that continue a sequence whose last inputs `conv_state` holds.

    x [b, t, c]; weight [c, k]; conv_state [b, c, k]: the k inputs before x, oldest first, zeros before the sequence's
    first token (FLA's and transformers' cache layout). y[:, i] equals what `causal_conv1d` of the whole sequence
    gives the token at x[:, i]. Returns y [b, t, c] in x.dtype and the state after x [b, c, k] (a new tensor).
    FLA's kernels where Triton runs them (unless deterministic): its one-token update for t == 1, else its conv with
    an initial state.
    """
    if x.shape[1] == 1:
        fla_update = fla.kernel("causal_conv1d_update", x, kernels=kernels, deterministic=deterministic)
        if fla_update is not None:
            return fla_update(x, conv_state.clone(), weight=weight, activation=activation)  # shifts the clone in place
    fla_conv = fla.kernel("causal_conv1d", x, kernels=kernels, deterministic=deterministic)
    if fla_conv is not None:
        return fla_conv(x, weight, bias=None, initial_state=conv_state, output_final_state=True, activation=activation)
    return decode.torch_causal_conv1d_with_state(x, weight, conv_state, activation)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    kernels: str = "fla",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token from `initial_state`: generation's decode steps.

    Shapes as `chunk_gated_delta_rule`, one sequence per batch row (t >= 1 tokens, usually 1); initial_state
    [b, h, dk, dv] float32, or None for zeros. Returns o [b, t, h, dv] in v.dtype and the state after the last token
    [b, h, dk, dv] float32 (always: the next step starts from it). FLA's fused recurrent kernel where Triton runs it
    (unless deterministic); else PyTorch in float32.
    """
    if v.shape[1] == 0:
        raise ValueError("fused_recurrent_gated_delta_rule needs at least one token")
    fla_recurrent = fla.kernel("fused_recurrent_gated_delta_rule", q, kernels=kernels, deterministic=deterministic)
    if fla_recurrent is not None:
        # by keyword: FLA's fourth and fifth parameters are g and gk (per-key decay), its beta comes later
        return fla_recurrent(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                             output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)  # takes hk < h as it is
    return decode.torch_recurrent_steps(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
