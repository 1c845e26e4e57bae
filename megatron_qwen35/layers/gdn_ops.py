"""Gated DeltaNet math: the gated delta rule and the short causal convolution.

Shape legend (used in the shape comments below):
    b batch, t tokens, h value heads, hk key heads, dk key dim, dv value dim, c channels, k conv kernel,
    n documents (== b without cu_seqlens), nc chunks, C chunk size (64), tp padded tokens.

Layout is FLA's batch-first one: q, k [b, t, hk, dk]; v [b, t, h, dv]; g, beta [b, t, h].
Grouped value heads: hk divides h, and value head i reads key head i // (h // hk) (what
`repeat_interleave(h // hk, dim=2)` of q and k would give). FLA reads the shared key heads in place; the torch
path l2-normalises them at hk heads and repeats them while laying them out chunk-major (one copy, no extra pass).

Two backends behind one API, chosen by `_fla_kernel`:
  * where Triton can run FLA's kernels (CUDA tensors, or any tensor while Triton's interpreter is enabled by
    runtime.triton_interpreter) and `fla` imports: FLA's Triton kernels;
  * anything else, and always with deterministic=True: a pure-PyTorch chunked implementation, differentiable
    with autograd, computed in float32 and written to be fast on CPU (see `_torch_chunk_gated_delta_rule`).

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

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_qwen35.runtime import triton_interpreter

CHUNK_SIZE = 64

__all__ = [
    "CHUNK_SIZE",
    "causal_conv1d",
    "causal_conv1d_with_state",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule",
]


# ----------------------------------------------------------------------------------------------
# FLA backend (imported lazily, only where Triton can run it, so that CPU runs never touch Triton)
# ----------------------------------------------------------------------------------------------


def _fla_kernel(load_kernel, x: torch.Tensor, deterministic: bool):
    """The FLA kernel `load_kernel()` returns, where Triton can run it on x; None means the torch path.

    Triton runs CUDA tensors, and any tensor while its interpreter is enabled (CPU tests of FLA's kernels).
    deterministic (megatron's config.deterministic_mode) keeps the torch path, as megatron's own GDN does: FLA's
    autotuner picks block sizes (chunk_o's BK, BV) by timing, and with them the summation order, so the last bits
    can differ from run to run.
    """
    if deterministic or not (x.is_cuda or triton_interpreter.triton_interpreter_enabled()):
        return None
    return load_kernel()


@functools.cache
def _fla_chunk_gated_delta_rule():
    """FLA's chunked kernel, or None when fla cannot be imported."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:  # ImportError, or Triton failing to initialise
        return None
    return fla_chunk


@functools.cache
def _fla_causal_conv1d():
    """FLA's causal conv (supports cu_seqlens), or None when fla cannot be imported."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv
    except Exception:
        return None
    return fla_conv


@functools.cache
def _fla_fused_recurrent_gated_delta_rule():
    """FLA's token-by-token kernel (one launch for the whole recurrence: decode steps), or None without fla."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except Exception:
        return None
    return fla_recurrent


@functools.cache
def _fla_causal_conv1d_update():
    """FLA's one-token conv step that shifts its cache in place, or None without fla."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d_update as fla_update
    except Exception:
        return None
    return fla_update


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _l2norm(x: torch.Tensor, scale: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """scale * l2norm(x), with transformers' / FLA's formula x * rsqrt(sum(x * x) + eps).

    The scale multiplies the small [..., 1] factor, saving a full pass over x.
    """
    return x * (torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) + eps) * scale)


def _doc_lengths(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> list[int]:
    """Validate cu_seqlens against a [1, t, ...] input and return the document lengths."""
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1, got {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != seq_len or any(a > b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to t={seq_len}, got {bounds}")
    return [b - a for a, b in itertools.pairwise(bounds)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (lets tests run an exact-arithmetic gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _value_heads_per_key_head(q: torch.Tensor, v: torch.Tensor) -> int:
    """h // hk for q [b, t, hk, dk] and v [b, t, h, dv]; hk must divide h."""
    hk, h = q.shape[2], v.shape[2]
    if h % hk:
        raise ValueError(f"the value heads ({h}) must be a multiple of the key heads ({hk})")
    return h // hk


def _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm):
    """Cast up to float32, optionally l2-normalise q/k, and fold the scale into q (at hk heads)."""
    dtype = _compute_dtype(v)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_qk_l2norm:
        return _l2norm(q, scale), _l2norm(k), v, g, beta
    return q * scale, k, v, g, beta


def _initial_state_rows(initial_state, n: int, h: int, dk: int, dv: int, like: torch.Tensor):
    """The initial state [n, h, dk, dv] in the compute dtype of `like`, zeros when not given."""
    if initial_state is None:
        return like.new_zeros(n, h, dk, dv)
    if initial_state.shape != (n, h, dk, dv):
        raise ValueError(f"initial_state must be {(n, h, dk, dv)}, got {tuple(initial_state.shape)}")
    return initial_state.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# Recurrent reference (token by token, elementwise; tests only)
# ----------------------------------------------------------------------------------------------


def _recurrent_scan(q, k, v, g, beta, state):
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
        o, final = _recurrent_scan(q, k, v, g, beta, state)
    else:
        lengths = _doc_lengths(cu_seqlens, b, t)
        states = _initial_state_rows(initial_state, len(lengths), h, dk, dv, v)
        # Run every document on its own: that is the definition of "state resets at boundaries".
        pieces = [x.split(lengths, dim=1) for x in (q, k, v, g, beta)]
        outs, finals = [], []
        for d, doc in enumerate(zip(*pieces, strict=True)):
            o_d, s_d = _recurrent_scan(*doc, states[d : d + 1])
            outs.append(o_d)
            finals.append(s_d)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)

    return o.to(out_dtype), (final if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Chunked PyTorch implementation
# ----------------------------------------------------------------------------------------------


@dataclass
class _ChunkLayout:
    """How tokens [b, t] map onto chunk-aligned padded tokens [b, tp], tp = nc * C.

    Every document is right-padded to a multiple of C so that no chunk straddles two documents.
    Padded tokens carry k = v = q = 0, beta = 0 and g = 0: they neither decay nor update the state.
    """

    chunk_size: int
    padded_len: int
    # Per document (n_docs entries): the half-open chunk range [start, end) it occupies.
    doc_chunks: list[tuple[int, int]]
    # Packed case only: padded position -> source token (t means "the zero row"), and token -> padded position.
    gather_index: torch.Tensor | None = None
    scatter_index: torch.Tensor | None = None

    @classmethod
    def for_batch(cls, t: int, chunk_size: int) -> _ChunkLayout:
        """One document per batch row: pad each row at its end."""
        nc = -(-t // chunk_size)
        return cls(chunk_size, nc * chunk_size, [(0, nc)])

    @classmethod
    def for_packed(cls, lengths: list[int], chunk_size: int, device) -> _ChunkLayout:
        """Documents packed in one row: pad every document separately (loops over documents, not tokens)."""
        total = sum(lengths)
        gather, scatter, doc_chunks = [], [], []
        token0, chunk0 = 0, 0
        for length in lengths:
            nc = -(-length // chunk_size)
            pad = nc * chunk_size - length
            scatter.append(torch.arange(length) + chunk0 * chunk_size)
            gather.append(torch.arange(token0, token0 + length))
            gather.append(torch.full((pad,), total))  # index `total` = the appended zero row
            doc_chunks.append((chunk0, chunk0 + nc))
            token0, chunk0 = token0 + length, chunk0 + nc
        return cls(
            chunk_size,
            chunk0 * chunk_size,
            doc_chunks,
            gather_index=torch.cat(gather).to(device),
            scatter_index=torch.cat(scatter).to(device),
        )

    def to_chunks(self, x: torch.Tensor, group: int = 1) -> torch.Tensor:
        """[b, t, hx, ...] -> chunk-major [nc, b*hx*group, C, ...] (padded, contiguous).

        Batch and heads are merged so that every per-chunk product below is a plain 3-D bmm. group > 1 repeats
        every head group times (key heads of grouped value heads) in the reshape's copy, not in a pass of its own.
        """
        if self.gather_index is None:
            pad = self.padded_len - x.shape[1]
            if pad:
                x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))  # pad dim 1 (tokens) on the right
        else:
            zero_row = x.new_zeros((x.shape[0], 1) + x.shape[2:])
            x = torch.cat([x, zero_row], dim=1).index_select(1, self.gather_index)  # [b, tp, h, ...]
        b, tp, hx = x.shape[:3]
        rest = x.shape[3:]
        nc, c = tp // self.chunk_size, self.chunk_size
        x = x.reshape(b, nc, c, hx, 1, *rest)  # [b, nc, C, hx, 1, ...]
        x = x.permute(1, 0, 3, 4, 2, *range(5, x.dim()))  # [nc, b, hx, 1, C, ...]
        x = x.expand(nc, b, hx, group, c, *rest)  # a view: head i of the result is head i // group of x
        return x.reshape(nc, b * hx * group, c, *rest)  # [nc, b*hx*group, C, ...] (copies)

    def from_chunks(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Chunk-major [nc, b*h, C, d] -> [b, t, h, d] (padding dropped)."""
        nc, bh, c, d = x.shape
        x = x.reshape(nc, b, bh // b, c, d).permute(1, 0, 3, 2, 4)  # [b, nc, C, h, d]
        x = x.reshape(b, nc * c, bh // b, d)  # [b, tp, h, d]
        if self.gather_index is None:
            return x[:, :t]
        return x.index_select(1, self.scatter_index)


class _UnitLowerInverse(torch.autograd.Function):
    """(I + strictly_lower(a))^-1 for a batch of square matrices; the diagonal and upper part of a are ignored.

    Forward is one batched triangular solve against the identity. Backward uses the closed form
    dT = -T dA T, i.e. grad_A = -strict_tril(T^T grad_T T^T): two batched matmuls, much cheaper on CPU
    than autograd's triangular solve with a transposed matrix.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        t_inv = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(t_inv)
        return t_inv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (t_inv,) = ctx.saved_tensors
        t_inv_t = t_inv.transpose(-1, -2)
        return -(t_inv_t @ grad @ t_inv_t).tril(-1)


def _intra_chunk_terms(q, k, v, g, beta):
    """Everything that does not depend on the recurrent state, batched over all chunks at once.

    Inputs chunk-major: q, k [nc, bh, C, dk]; v [nc, bh, C, dv]; g, beta [nc, bh, C] (bh = b*h).
    Returns
        u           [nc, bh, C, dv]  WY "pseudo values": T diag(beta) v
        w           [nc, bh, C, dk]  WY decayed keys that read the incoming state: T diag(beta exp(G)) k
        attn        [nc, bh, C, C]   causal intra-chunk attention (q k^T) * exp(G_i - G_j), j <= i
        q_decay     [nc, bh, C, dk]  q * exp(G): reads the state carried into the chunk
        k_decay     [nc, bh, C, dk]  k * exp(G_last - G): writes into the state leaving the chunk
        chunk_decay [nc, bh, 1, 1]   exp(G_last): state decay across a whole chunk
    where G = cumsum(g) inside the chunk and T = (I + strict_tril(diag(beta) k k^T * exp(G_i - G_j)))^-1.
    The per-token factors beta and exp(G) are applied to the [C, C] matrices rather than to the
    [C, d] operands: half the memory traffic for d = 128 (elementwise passes dominate on CPU).
    """
    c = q.shape[-2]
    g_cum = g.cumsum(dim=-1)  # [nc, bh, C]

    # Pairwise decay exp(G_i - G_j) for j <= i. Mask *before* exp: for j > i the exponent is >= 0 and
    # could overflow, and inf * 0 would poison the gradients.
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    pair_decay = (g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # [nc, bh, C, C]

    k_t = k.transpose(-1, -2)  # [nc, bh, dk, C]
    attn = (q @ k_t) * pair_decay
    # Row i of the WY system carries beta_i.
    t_inv = _UnitLowerInverse.apply((k @ k_t) * (pair_decay * beta.unsqueeze(-1)))  # [nc, bh, C, C]

    # Column j of T multiplies token j's beta_j (and exp(G_j) for the keys).
    g_exp = g_cum.exp()  # [nc, bh, C]
    t_beta = t_inv * beta.unsqueeze(-2)  # [nc, bh, C, C]
    u = t_beta @ v
    w = (t_beta * g_exp.unsqueeze(-2)) @ k

    g_last = g_cum[..., -1:]  # [nc, bh, 1]
    q_decay = q * g_exp.unsqueeze(-1)
    k_decay = k * (g_last - g_cum).exp().unsqueeze(-1)
    chunk_decay = g_last.exp().unsqueeze(-1)  # [nc, bh, 1, 1]
    return u, w, attn, q_decay, k_decay, chunk_decay


class _InterChunkScan(torch.autograd.Function):
    """The only sequential part: carry the state across chunks, with a hand-written backward.

    Per chunk i (state S_i [bh, dk, dv] entering it, a_i = chunk_decay[i]):
        v_i     = u_i - w_i S_i                      (delta rule: drop what S_i already predicts)
        S_{i+1} = a_i S_i + k_decay_i^T v_i
    Forward and backward loops each do just two bmms per chunk; every gradient that is not needed to
    continue the loop (du, dw, dk_decay, da) is computed afterwards with one batched op. Autograd
    through the loop would instead run four small matmuls plus bookkeeping per chunk.

    Inputs: u [nc, bh, C, dv]; w, k_decay [nc, bh, C, dk]; chunk_decay [nc, bh, 1, 1];
    init_states [n_docs, bh, dk, dv] (state entering each document); doc_chunks: per document its
    chunk range [first, last) -- the state resets at every document start.
    Outputs: states_in [nc, bh, dk, dv] (S_i), v_new [nc, bh, C, dv] (v_i), finals [n_docs, bh, dk, dv].
    """

    @staticmethod
    def forward(ctx, u, w, k_decay, chunk_decay, init_states, doc_chunks):
        states_in = u.new_empty(u.shape[:2] + init_states.shape[-2:])
        v_new = torch.empty_like(u)
        finals = torch.empty_like(init_states)
        for d, (first, last) in enumerate(doc_chunks):
            # slots[j] is the state entering chunk first + j; the last slot is the document's final state.
            # Each chunk writes its outgoing state straight into the next slot: no copy per chunk.
            slots = [states_in[i] for i in range(first, last)] + [finals[d]]
            slots[0].copy_(init_states[d])  # the state resets at every document start
            for j, i in enumerate(range(first, last)):
                torch.baddbmm(u[i], w[i], slots[j], alpha=-1, out=v_new[i])
                torch.baddbmm(slots[j] * chunk_decay[i], k_decay[i].transpose(-1, -2), v_new[i], out=slots[j + 1])
        ctx.doc_chunks = doc_chunks
        ctx.save_for_backward(w, k_decay, chunk_decay, states_in, v_new)
        return states_in, v_new, finals

    @staticmethod
    @once_differentiable
    def backward(ctx, d_states_in, d_v_new, d_finals):
        w, k_decay, chunk_decay, states_in, v_new = ctx.saved_tensors
        n_docs = len(ctx.doc_chunks)
        if d_states_in is None:
            d_states_in = torch.zeros_like(states_in)
        if d_v_new is None:
            d_v_new = torch.zeros_like(v_new)
        if d_finals is None:
            d_finals = states_in.new_zeros((n_docs,) + states_in.shape[1:])

        # Reverse loop over the state gradients dL/dS (mirror of the forward slots): d_states_out[i] is
        # dL/dS_{i+1}, the gradient of the state leaving chunk i, kept for the batched grads below.
        d_states_out = torch.empty_like(states_in)
        d_v_total = torch.empty_like(v_new)  # dL/dv_i, including v_i's effect on later chunks
        d_init = torch.empty_like(d_finals)
        for d, (first, last) in enumerate(ctx.doc_chunks):
            # slots[j] is dL/dS entering chunk first + j; the first slot is the initial-state gradient.
            slots = [d_init[d]] + [d_states_out[i] for i in range(first, last)]
            slots[-1].copy_(d_finals[d])
            for j, i in reversed(list(enumerate(range(first, last)))):
                grad_state = slots[j + 1]
                torch.baddbmm(d_v_new[i], k_decay[i], grad_state, out=d_v_total[i])
                # dL/dS_i = a_i dL/dS_{i+1} + (direct use of S_i) - w_i^T dL/dv_i
                grad_in = grad_state * chunk_decay[i] + d_states_in[i]
                torch.baddbmm(grad_in, w[i].transpose(-1, -2), d_v_total[i], alpha=-1, out=slots[j])

        d_u = d_v_total
        d_w = torch.matmul(d_v_total, states_in.transpose(-1, -2)).neg_()  # [nc, bh, C, dk]
        d_k_decay = v_new @ d_states_out.transpose(-1, -2)  # [nc, bh, C, dk]
        d_chunk_decay = (d_states_out * states_in).sum(dim=(-2, -1), keepdim=True)  # [nc, bh, 1, 1]
        return d_u, d_w, d_k_decay, d_chunk_decay, d_init, None


def _torch_chunk_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
    chunk_size: int = CHUNK_SIZE,
):
    """Chunked gated delta rule (WY representation, as in FLA / transformers) in PyTorch.

    Speed comes from doing all state-independent work (including the WY inverse) batched over every
    chunk, keeping the chunk loop to two bmms (forward and backward), and computing the output as one
    batched matmul pair after the loop.
    """
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    group = _value_heads_per_key_head(q, v)
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm)  # q, k still at hk heads

    if cu_seqlens is None:
        layout = _ChunkLayout.for_batch(t, chunk_size)
        init = _initial_state_rows(initial_state, b, h, dk, dv, v).reshape(1, b * h, dk, dv)  # [1, bh, dk, dv]
    else:
        lengths = _doc_lengths(cu_seqlens, b, t)
        layout = _ChunkLayout.for_packed(lengths, chunk_size, q.device)
        init = _initial_state_rows(initial_state, len(lengths), h, dk, dv, v)  # [n, h, dk, dv], b == 1

    # g and beta get a trailing singleton to share to_chunks with q/k/v: [b, t, h, 1] -> [nc, bh, C]
    qc, kc = (layout.to_chunks(x, group) for x in (q, k))  # [nc, bh, C, dk]: repeated for grouped value heads
    vc = layout.to_chunks(v)
    gc, betac = (layout.to_chunks(x.unsqueeze(-1)).squeeze(-1) for x in (g, beta))

    u, w, attn, q_decay, k_decay, chunk_decay = _intra_chunk_terms(qc, kc, vc, gc, betac)
    states_in, v_new, finals = _InterChunkScan.apply(u, w, k_decay, chunk_decay, init, layout.doc_chunks)

    # Intra-chunk attention plus the read of the incoming state, fused into one baddbmm over all chunks.
    o = torch.baddbmm(
        (attn @ v_new).flatten(0, 1), q_decay.flatten(0, 1), states_in.flatten(0, 1)
    ).view(v_new.shape)  # [nc, bh, C, dv]
    o = layout.from_chunks(o, b, t).to(out_dtype)  # [b, t, h, dv]

    final = finals.reshape(-1, h, dk, dv) if output_final_state else None  # [n, h, dk, dv]
    return o, final


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


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
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a whole sequence.

    q, k [b, t, hk, dk]; v [b, t, h, dv]; g [b, t, h] (log decay, <= 0); beta [b, t, h]; hk divides h.
    scale: query scale, default dk ** -0.5 (applied after the optional l2norm).
    initial_state / final state: [n, h, dk, dv] float32, n = b, or the number of documents with
    cu_seqlens ([n + 1] cumulative lengths, b == 1; the state restarts at every document).
    Returns o [b, t, h, dv] in v.dtype and the final state (None unless output_final_state).
    FLA's kernels where Triton runs them (unless deterministic); else the float32 PyTorch path.
    """
    fla_chunk = _fla_kernel(_fla_chunk_gated_delta_rule, q, deterministic)
    if fla_chunk is not None:
        return fla_chunk(  # takes hk < h as it is: value head i reads key head i // (h // hk)
            q, k, v, g, beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=cu_seqlens,
        )
    return _torch_chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
    )


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported activation {activation!r}")


def _torch_causal_conv1d(x, weight, cu_seqlens, activation):
    """Depthwise causal conv with F.conv1d; packed documents each get their own left zero padding."""
    b, t, c = x.shape
    kernel = weight.shape[-1]
    w = weight.to(x.dtype).unsqueeze(1)  # [c, 1, k] as F.conv1d wants for groups=c

    if cu_seqlens is None:
        x_ct = F.pad(x.transpose(1, 2), (kernel - 1, 0))  # [b, c, k - 1 + t]
        return _activate(F.conv1d(x_ct, w, groups=c).transpose(1, 2), activation)  # [b, t, c]

    # Insert k-1 zero rows before every document, run one "valid" conv over the whole stream, and pick
    # each token's output: token i of document d sits at i + d * (k-1) in the valid output.
    lengths = _doc_lengths(cu_seqlens, b, t)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [t]
    token_pos = torch.arange(t) + doc_id * (kernel - 1)  # padded position of each token, minus (k-1)
    padded_len = t + len(lengths) * (kernel - 1)
    gather = torch.full((padded_len,), t, dtype=torch.long)  # index t = the appended zero row
    gather[token_pos + kernel - 1] = torch.arange(t)
    zero_row = x.new_zeros(b, 1, c)
    x_pad = torch.cat([x, zero_row], dim=1).index_select(1, gather.to(x.device))  # [1, tp, c]
    y = F.conv1d(x_pad.transpose(1, 2), w, groups=c).transpose(1, 2)  # [1, tp - (k-1), c]
    return _activate(y.index_select(1, token_pos.to(x.device)), activation)  # [1, t, c]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    deterministic: bool = False,
) -> torch.Tensor:
    """Depthwise causal convolution without bias.

    x [b, t, c]; weight [c, k]; y[:, i, c] = act(sum_j weight[c, j] * x[:, i - (k-1) + j, c]), with zeros
    before the start of the sequence, or of each document when cu_seqlens ([n + 1], b == 1) is given.
    Returns y [b, t, c] in x.dtype. FLA's Triton conv where Triton runs it (unless deterministic).
    """
    fla_conv = _fla_kernel(_fla_causal_conv1d, x, deterministic)
    if fla_conv is not None:
        y, _ = fla_conv(x, weight, bias=None, activation=activation, cu_seqlens=cu_seqlens)
        return y
    return _torch_causal_conv1d(x, weight, cu_seqlens, activation)


# ----------------------------------------------------------------------------------------------
# Generation: the conv and the recurrence continued from the states the earlier tokens left
# ----------------------------------------------------------------------------------------------


def _torch_causal_conv1d_with_state(x, weight, conv_state, activation):
    """F.conv1d over [the last k-1 inputs before x | x]: the same products as `_torch_causal_conv1d` at every token."""
    kernel = weight.shape[-1]
    inputs = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [b, c, k + t], oldest first
    y = F.conv1d(inputs[..., 1:], weight.to(x.dtype).unsqueeze(1), groups=x.shape[-1])  # [b, c, t]
    return _activate(y.transpose(1, 2), activation), inputs[..., -kernel:].contiguous()


def causal_conv1d_with_state(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    *,
    activation: str | None = "silu",
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
        fla_update = _fla_kernel(_fla_causal_conv1d_update, x, deterministic)
        if fla_update is not None:
            return fla_update(x, conv_state.clone(), weight=weight, activation=activation)  # shifts the clone in place
    fla_conv = _fla_kernel(_fla_causal_conv1d, x, deterministic)
    if fla_conv is not None:
        return fla_conv(x, weight, bias=None, initial_state=conv_state, output_final_state=True, activation=activation)
    return _torch_causal_conv1d_with_state(x, weight, conv_state, activation)


def _torch_recurrent_steps(q, k, v, g, beta, scale, initial_state, use_qk_l2norm):
    """`_recurrent_scan`'s recurrence written for one token at a time: the state [b*h, dk, dv] is read by two batched
    vector-matrix products and written by one in-place rank-1 update, where the reference's elementwise form makes
    three [b, h, dk, dv] temporaries per token (the state dominates a decode step's memory traffic)."""
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
    fla_recurrent = _fla_kernel(_fla_fused_recurrent_gated_delta_rule, q, deterministic)
    if fla_recurrent is not None:
        # by keyword: FLA's fourth and fifth parameters are g and gk (per-key decay), its beta comes later
        return fla_recurrent(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                             output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)  # takes hk < h as it is
    return _torch_recurrent_steps(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
