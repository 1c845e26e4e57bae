"""The gated delta rule and the causal conv in PyTorch: the path of CPU tensors, and of CUDA tensors where FLA's kernels
are declined (--gdn-kernels torch, megatron's deterministic mode).

Speed comes from doing all state-independent work of the chunked WY form (the inverse included) batched over every
chunk, keeping the sequential chunk loop to two bmms forward and two backward (`_InterChunkScan`), and computing the
output as one batched matmul pair after the loop; everything in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_qwen35.layers.gdn_ops.common import (
    CHUNK_SIZE,
    _activate,
    _doc_lengths,
    _initial_state_rows,
    _prepare_inputs,
    _value_heads_per_key_head,
)


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


def torch_chunk_gated_delta_rule(
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


def torch_causal_conv1d(x, weight, cu_seqlens, activation):
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
