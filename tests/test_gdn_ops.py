"""Gated DeltaNet math (megatron_qwen35.layers.gdn_ops), CPU / torch backend.

Tolerances: the chunked and token-by-token forms are the same math in a different summation order, so
fp32 outputs agree to ~1e-6 for O(1) values; 1e-5 leaves headroom without hiding a real bug (a wrong
decay or a leaked state changes results at the 1e-2 level).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_qwen35.hf_reference import torch_chunk_gated_delta_rule
from megatron_qwen35.layers import gdn_ops
from megatron_qwen35.layers.gdn_ops import causal_conv1d, chunk_gated_delta_rule
from tests.gdn_reference import recurrent_gated_delta_rule

ATOL = 1e-5


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_inputs(b, t, h, dk, dv, *, seed=0, dtype=torch.float32, requires_grad=False):
    """q, k [b, t, h, dk]; v [b, t, h, dv]; g [b, t, h] <= 0; beta [b, t, h] in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen, dtype=dtype)
    k = torch.randn(b, t, h, dk, generator=gen, dtype=dtype)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen, dtype=dtype) + 2.0)  # mild decay, as in training
    beta = torch.rand(b, t, h, generator=gen, dtype=dtype)
    inputs = [q, k, v, g, beta]
    return [x.requires_grad_() for x in inputs] if requires_grad else inputs


def random_state(n, h, dk, dv, *, seed=1, dtype=torch.float32):
    return torch.randn(n, h, dk, dv, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads_of(fn, tensors):
    """Gradients of a fixed random-projection loss of fn's (output, final_state) w.r.t. tensors."""
    for x in tensors:
        x.grad = None
    out, state = fn()
    gen = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen)).sum()
    loss.backward()
    return [x.grad.clone() for x in tensors]


def assert_close(actual, expected, atol=ATOL, what="tensor"):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.0e}"


# ------------------------------------------------------------------------------------------------
# gated delta rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [100, 130])
def test_chunked_matches_transformers_torch_chunk_reference(t):
    """Same inputs (q/k l2norm on, initial state given), t not a multiple of the chunk size:
    output and final state equal transformers' torch_chunk_gated_delta_rule."""
    q, k, v, g, beta = make_inputs(2, t, 4, 32, 32)
    h0 = random_state(2, 4, 32, 32)
    ours, ours_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ref, ref_state = torch_chunk_gated_delta_rule()(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    assert ours.shape == (2, t, 4, 32) and ours_state.shape == (2, 4, 32, 32)
    assert_close(ours, ref)
    assert_close(ours_state, ref_state)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_recurrent_reference(with_initial_state):
    """The chunked form equals the token-by-token recurrence (dk != dv, several chunks, partial last chunk)."""
    q, k, v, g, beta = make_inputs(2, 150, 3, 16, 24)
    h0 = random_state(2, 3, 16, 24) if with_initial_state else None
    kwargs = dict(initial_state=h0, output_final_state=True)
    out, state = chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)
    ref, ref_state = recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    assert_close(out, ref)
    assert_close(state, ref_state)


def test_chunked_matches_recurrent_without_l2norm_and_custom_scale():
    """use_qk_l2norm=False and an explicit scale are honoured identically by both forms
    (keys pre-normalised by the caller, as the delta rule needs for stability)."""
    q, k, v, g, beta = make_inputs(1, 90, 2, 16, 16)
    k = F.normalize(k, dim=-1)
    kwargs = dict(scale=0.3, use_qk_l2norm=False, output_final_state=True)
    out, state = chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)
    ref, ref_state = recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    assert_close(out, ref)
    assert_close(state, ref_state)


def test_final_state_is_none_unless_requested():
    """output_final_state=False returns None for the state, as FLA does."""
    inputs = make_inputs(1, 10, 1, 8, 8)
    assert chunk_gated_delta_rule(*inputs)[1] is None
    assert recurrent_gated_delta_rule(*inputs)[1] is None


def test_low_precision_inputs_return_v_dtype_and_float32_state():
    """bf16 inputs: computation is fp32 inside, the output comes back in v.dtype, the state stays fp32."""
    q, k, v, g, beta = (x.bfloat16() for x in make_inputs(1, 70, 2, 16, 16))
    out, state = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    ref, ref_state = recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(out.float(), ref.float(), atol=1e-2)  # both round the same fp32 result to bf16
    assert_close(state, ref_state)


def test_chunked_gradients_match_recurrent_reference():
    """Autograd through the chunked form (incl. its hand-written backward) gives the same gradients
    w.r.t. q, k, v, g, beta and initial_state as autograd through the recurrence.
    Tolerance 1e-4: gradients accumulate over all later tokens and are O(10) here, so fp32 rounding
    in two different summation orders reaches a few 1e-6; a wrong term shows up at >= 1e-2."""
    inputs = make_inputs(1, 130, 2, 16, 16, requires_grad=True)
    h0 = random_state(1, 2, 16, 16).requires_grad_()
    tensors = inputs + [h0]
    kwargs = dict(initial_state=h0, output_final_state=True)
    ours = grads_of(lambda: chunk_gated_delta_rule(*inputs, **kwargs), tensors)
    ref = grads_of(lambda: recurrent_gated_delta_rule(*inputs, **kwargs), tensors)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], ours, ref, strict=True):
        assert_close(a, b, atol=1e-4, what=f"grad {name}")


def test_chunked_backward_passes_float64_gradcheck():
    """The analytic backward (WY inverse and inter-chunk scan Functions) matches finite differences in
    float64, across several chunks (chunk size 4) and a document boundary."""
    q, k, v, g, beta = make_inputs(1, 11, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = random_state(2, 1, 3, 2, dtype=torch.float64).requires_grad_()
    cu_seqlens = torch.tensor([0, 6, 11])

    def fn(q, k, v, g, beta, h0):
        return gdn_ops.torch_chunk.torch_chunk_gated_delta_rule(
            q, k, v, g, beta, None, h0, True, cu_seqlens, True, chunk_size=4
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0), fast_mode=True)


LENGTHS = [37, 64, 90]


def split_docs(x):
    return x.split(LENGTHS, dim=1)


def test_packed_sequences_equal_separate_runs():
    """With cu_seqlens the state restarts at each document (lengths not multiples of 64): outputs and
    per-document final states equal running every document on its own with its own initial state."""
    q, k, v, g, beta = make_inputs(1, sum(LENGTHS), 4, 16, 24)
    h0 = random_state(len(LENGTHS), 4, 16, 24)
    cu_seqlens = torch.tensor([0, 37, 101, 191], dtype=torch.int32)
    out, state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
    )
    assert state.shape == (len(LENGTHS), 4, 16, 24)
    docs = zip(*(split_docs(x) for x in (q, k, v, g, beta)), strict=True)
    for d, (doc, doc_out) in enumerate(zip(docs, split_docs(out), strict=True)):
        ref, ref_state = chunk_gated_delta_rule(*doc, initial_state=h0[d : d + 1], output_final_state=True)
        assert_close(doc_out, ref)
        assert_close(state[d : d + 1], ref_state)


def test_packed_recurrent_reference_equals_packed_chunked():
    """The reference also honours cu_seqlens, so the two backends agree on packed input."""
    inputs = make_inputs(1, sum(LENGTHS), 2, 16, 16)
    cu_seqlens = torch.tensor([0, 37, 101, 191])
    out, state = chunk_gated_delta_rule(*inputs, output_final_state=True, cu_seqlens=cu_seqlens)
    ref, ref_state = recurrent_gated_delta_rule(*inputs, output_final_state=True, cu_seqlens=cu_seqlens)
    assert_close(out, ref)
    assert_close(state, ref_state)


def test_packed_gradients_equal_separate_runs():
    """Gradients w.r.t. q, k, v, g, beta and the initial states are the same packed or separate."""
    inputs = make_inputs(1, sum(LENGTHS), 2, 16, 16, requires_grad=True)
    h0 = random_state(len(LENGTHS), 2, 16, 16).requires_grad_()
    tensors = inputs + [h0]
    cu_seqlens = torch.tensor([0, 37, 101, 191])

    packed = grads_of(
        lambda: chunk_gated_delta_rule(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens),
        tensors,
    )

    def separate():
        outs, states = [], []
        for d, doc in enumerate(zip(*(split_docs(x) for x in inputs), strict=True)):
            o, s = chunk_gated_delta_rule(*doc, initial_state=h0[d : d + 1], output_final_state=True)
            outs.append(o)
            states.append(s)
        return torch.cat(outs, dim=1), torch.cat(states)

    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], packed, grads_of(separate, tensors), strict=True):
        assert_close(a, b, atol=1e-4, what=f"grad {name}")  # same reason as in the recurrent gradient test


def test_cu_seqlens_requires_batch_one():
    """Packed input must be a single row, as in FLA."""
    inputs = make_inputs(2, 10, 1, 8, 8)
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(*inputs, cu_seqlens=torch.tensor([0, 4, 10]))


# ------------------------------------------------------------------------------------------------
# causal conv1d
# ------------------------------------------------------------------------------------------------


def naive_causal_conv1d(x, weight, activation):
    """Direct loop over tokens and taps: y[t] = act(sum_j w[:, j] * x[t - (k-1) + j]), zeros before 0."""
    b, t, c = x.shape
    kernel = weight.shape[1]
    y = torch.zeros(b, t, c, dtype=x.dtype)
    for i in range(t):
        for j in range(kernel):
            src = i - (kernel - 1) + j
            if src >= 0:
                y[:, i] += weight[:, j] * x[:, src]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_naive_loop(activation):
    """Depthwise causal conv with left zero padding, with and without the SiLU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 6, generator=gen)
    weight = torch.randn(6, 4, generator=gen)
    assert_close(causal_conv1d(x, weight, activation=activation), naive_causal_conv1d(x, weight, activation))


def test_packed_causal_conv1d_equals_separate_documents():
    """With cu_seqlens the left zero padding restarts at each document (no leakage across documents,
    including documents shorter than the kernel); values and gradients equal per-document runs."""
    lengths = [2, 9, 5]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(lengths), 6, generator=gen, requires_grad=True)
    weight = torch.randn(6, 4, generator=gen, requires_grad=True)
    cu_seqlens = torch.tensor([0, 2, 11, 16])

    packed = causal_conv1d(x, weight, cu_seqlens=cu_seqlens)
    separate = torch.cat([causal_conv1d(doc, weight) for doc in x.split(lengths, dim=1)], dim=1)
    assert_close(packed, separate)
    naive = torch.cat([naive_causal_conv1d(doc, weight, "silu") for doc in x.split(lengths, dim=1)], dim=1)
    assert_close(packed, naive)

    grad_out = torch.randn(packed.shape, generator=gen)
    packed_grads = torch.autograd.grad(packed, (x, weight), grad_out)
    separate_grads = torch.autograd.grad(separate, (x, weight), grad_out)
    for a, b in zip(packed_grads, separate_grads, strict=True):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# generation: continuing from saved states
# ------------------------------------------------------------------------------------------------


def test_conv_with_state_continues_the_whole_sequence():
    """A sequence cut into a 3-token prompt (shorter than the kernel) and then single tokens, each piece continuing
    from the state the previous one left, gives what causal_conv1d of the whole sequence gives, token for token;
    the state is always the last k inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=gen)
    weight = torch.randn(6, 4, generator=gen)
    whole = causal_conv1d(x, weight)
    state = torch.zeros(2, 6, 4)
    pieces = []
    for piece in [x[:, :3]] + list(x[:, 3:].split(1, dim=1)):
        y, state = gdn_ops.causal_conv1d_with_state(piece, weight, state)
        pieces.append(y)
    assert_close(torch.cat(pieces, dim=1), whole, atol=1e-6)
    assert torch.equal(state, x[:, -4:].transpose(1, 2))


@pytest.mark.parametrize("group", [1, 2])
def test_recurrent_steps_continue_the_chunked_prompt(group):
    """A 70-token prompt through the chunked kernel (its final state kept), then 10 tokens one at a time through
    fused_recurrent_gated_delta_rule, each from the state the previous left: outputs and the final state equal the
    token-by-token reference over all 80 tokens (grouped value heads too: 2 key heads for 4 value heads)."""
    q, k, v, g, beta = make_inputs(2, 80, 4, 16, 8)
    q, k = q[:, :, ::group], k[:, :, ::group]  # hk = 4 / group key heads
    h0 = random_state(2, 4, 16, 8)
    ref, ref_state = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    prompt = [x[:, :70] for x in (q, k, v, g, beta)]
    out, state = chunk_gated_delta_rule(*prompt, initial_state=h0, output_final_state=True)
    outs = [out]
    for i in range(70, 80):
        out, state = gdn_ops.fused_recurrent_gated_delta_rule(*(x[:, i:i + 1] for x in (q, k, v, g, beta)),
                                                              initial_state=state)
        outs.append(out)
    assert_close(torch.cat(outs, dim=1), ref, what="output")
    assert_close(state, ref_state, what="final state")
    assert state.dtype == torch.float32


def test_recurrent_steps_leave_the_given_state_untouched():
    """The caller's state is an input, never written: generation may keep it (e.g. to branch a prompt)."""
    q, k, v, g, beta = make_inputs(1, 1, 2, 8, 8)
    h0 = random_state(1, 2, 8, 8)
    kept = h0.clone()
    gdn_ops.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    assert torch.equal(h0, kept)


# ------------------------------------------------------------------------------------------------
# CUDA backend (FLA kernels); skipped on machines without a GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fla_backend_matches_torch_backend_on_packed_input():
    """On CUDA the public functions dispatch to FLA; results match the CPU torch path on packed input.
    Tolerance 2e-3: FLA's kernels may use TF32 tensor-core matmuls for fp32 inputs."""
    inputs = make_inputs(1, sum(LENGTHS), 4, 64, 64)
    h0 = random_state(len(LENGTHS), 4, 64, 64)
    cu_seqlens = torch.tensor([0, 37, 101, 191])
    kwargs = dict(output_final_state=True)
    cpu_out, cpu_state = chunk_gated_delta_rule(*inputs, initial_state=h0, cu_seqlens=cu_seqlens, **kwargs)
    gpu_out, gpu_state = chunk_gated_delta_rule(
        *(x.to("cuda") for x in inputs), initial_state=h0.to("cuda"), cu_seqlens=cu_seqlens.to("cuda"), **kwargs
    )
    assert_close(gpu_out.cpu(), cpu_out, atol=2e-3, what="output")
    assert_close(gpu_state.cpu(), cpu_state, atol=2e-3, what="final state")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(LENGTHS), 64, generator=gen)
    weight = torch.randn(64, 4, generator=gen)
    cpu_y = causal_conv1d(x, weight, cu_seqlens=cu_seqlens)
    gpu_y = causal_conv1d(x.to("cuda"), weight.to("cuda"), cu_seqlens=cu_seqlens.to("cuda"))
    assert_close(gpu_y.cpu(), cpu_y, atol=2e-3, what="conv")
