"""FLA's real Triton kernels, run on CPU under Triton's interpreter, against gdn_ops' torch path.

What runs on a GPU (FLA's chunk_gated_delta_rule and causal_conv1d) is held here against the torch path every other
CPU test uses: the whole Qwen35GatedDeltaNet layer (plain, packed THD, CP2) and the grouped-heads kernel call.
The FLA side runs in a freshly spawned interpreter (tests/parallel/harness.py) that enables Triton's interpreter before
anything imports triton and makes gdn_ops' torch path raise, so every GDN kernel there is FLA's; the torch side runs
here.

Tolerance: both sides compute in fp32, in a different summation order (FLA's blocked Triton dots and its own WY
solve), so they differ by rounding: measured 1e-8..1e-6 absolute, at most 1.2e-5 of the tensor's largest entry (the
A_log and dt_bias grads, sums over every token with cancellation; about 1e-6 elsewhere). 1e-4 of the largest entry
leaves headroom; a wrong kernel argument is off by more than 1e-2 of it (measured on the layer: a scale 10% off
3e-2, the conv across document boundaries 0.5, value heads reading the wrong key heads 1.5).
The imports below must not import triton: a spawned process imports this file before it enables the interpreter.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_qwen35.layers import gdn_ops
from megatron_qwen35.runtime import triton_interpreter
from tests.parallel.harness import run_distributed

TOL = 1e-4  # of the largest |entry| of the expected tensor
SEQ = 100  # tokens: more than one 64-token chunk, and the interpreter stays at a few seconds a run


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: max abs error {err:.2e} > {TOL:.0e} x largest |entry| {scale:.2g}"


def _fla_kernels_only() -> None:
    """In a fresh process: Triton's interpreter on, and gdn_ops' torch path refused, so every GDN kernel is FLA's."""
    triton_interpreter.enable_triton_interpreter()

    def refuse(*args, **kwargs):
        raise AssertionError("gdn_ops took its torch path although Triton's interpreter is enabled")

    gdn_ops.torch_chunk.torch_chunk_gated_delta_rule = refuse
    gdn_ops.torch_chunk.torch_causal_conv1d = refuse
    gdn_ops.decode.torch_causal_conv1d_with_state = refuse
    gdn_ops.decode.torch_recurrent_steps = refuse


# ------------------------------------------------------------------------------------------------
# The whole layer: FLA branch (spawned process) vs torch branch (here), same weights and input
# ------------------------------------------------------------------------------------------------


def _layer_forward_backward(state, x, w, lengths=None):
    """A fresh tiny fp32 layer with `state`: its output for x [s, b, hidden] and the gradients of sum(out * w)."""
    from tests.test_gated_delta_net import _gdn, _packed

    _, layer = _gdn()
    layer.load_state_dict(state)
    x = x.clone().requires_grad_()
    out, _ = layer(x, None, packed_seq_params=_packed(lengths) if lengths else None)
    (out * w).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def _layer_on_fla(rank, world, state, x, w, lengths):
    _fla_kernels_only()
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel()
    return _layer_forward_backward(state, x, w, lengths)


def _assert_layer_results_equal(fla, torch_path) -> None:
    (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) = fla, torch_path
    _assert_close(out, ref_out, "output")
    _assert_close(x_grad, ref_x_grad, "input grad")
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        _assert_close(grads[name], ref, f"grad {name}")


@pytest.mark.slow
@pytest.mark.parametrize("batch, lengths", [(2, None), (1, [37, 63])], ids=["plain", "packed_thd"])
def test_layer_on_fla_kernels_equals_torch_path(megatron_single_process, batch, lengths):
    """The tiny layer (2 key heads, 4 value heads) through FLA's kernels gives the torch path's output, input grad
    and every parameter's grad, for a plain [s, b] batch and for packed documents of 37 and 63 tokens (a boundary
    inside the first chunk, neither length a multiple of 64)."""
    from tests.test_gated_delta_net import _gdn

    assert not triton_interpreter.triton_interpreter_enabled()  # this process runs the torch path
    cfg, layer = _gdn()
    state = {k: (v.clone() if v is not None else None) for k, v in layer.state_dict().items()}  # None: _extra_state
    gen = torch.Generator().manual_seed(7)
    seq = sum(lengths) if lengths else SEQ
    x, w = (torch.randn(seq, batch, cfg.hidden_size, generator=gen) for _ in range(2))
    expected = _layer_forward_backward(state, x, w, lengths)
    (fla,) = run_distributed(_layer_on_fla, 1, state, x, w, lengths, fresh_interpreter=True)
    _assert_layer_results_equal(fla, expected)


def _cp_rank_on_fla(rank, world, state):
    _fla_kernels_only()
    from tests.parallel.test_gdn_context_parallel import _cp_rank

    return _cp_rank(rank, world, state)


@pytest.mark.slow
def test_context_parallel_layer_on_fla_kernels_equals_single_process_torch_path(megatron_single_process):
    """CP2 through FLA's kernels (each rank runs the whole sequence for half the heads: 1 key head, 2 value heads)
    gives the single process's torch-path output and input grad on each rank's tokens, and parameter grads that
    sum over CP to the single process's."""
    from tests.parallel.test_gdn_context_parallel import CP, _inputs, _load_balanced
    from tests.test_gated_delta_net import _gdn

    cfg, layer = _gdn()
    x, w = _inputs(cfg.hidden_size)
    x.requires_grad_()
    y, _ = layer(x, None)
    (y * w).sum().backward()
    state = {k: (v.clone() if v is not None else None) for k, v in layer.state_dict().items()}
    results = run_distributed(_cp_rank_on_fla, CP, state, fresh_interpreter=True)
    for rank, (y_r, x_grad_r, _) in enumerate(results):
        _assert_close(y_r, _load_balanced(y.detach(), rank), f"rank {rank} output")
        _assert_close(x_grad_r, _load_balanced(x.grad, rank), f"rank {rank} input grad")
    for name, p in layer.named_parameters():
        _assert_close(sum(r[2][name] for r in results), p.grad, f"grad {name} summed over CP")


# ------------------------------------------------------------------------------------------------
# The kernel call with grouped value heads
# ------------------------------------------------------------------------------------------------


def _grouped_inputs():
    """hk = 2 key heads for h = 6 value heads, dk 16 != dv 8; three packed documents; a given initial state."""
    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, SEQ, 2, 16, generator=gen) for _ in range(2))  # [b, t, hk, dk]
    v = torch.randn(1, SEQ, 6, 8, generator=gen)  # [b, t, h, dv]
    g = F.logsigmoid(torch.randn(1, SEQ, 6, generator=gen) + 2.0)  # [b, t, h]
    beta = torch.rand(1, SEQ, 6, generator=gen)
    h0 = torch.randn(3, 6, 16, 8, generator=gen)  # [n, h, dk, dv]
    cu_seqlens = torch.tensor([0, 30, 71, SEQ], dtype=torch.int32)
    return [q, k, v, g, beta, h0], cu_seqlens


def _grouped_rule_forward_backward(inputs, cu_seqlens):
    """gdn_ops.chunk_gated_delta_rule's output and final state, and the gradients of a fixed random projection
    of both with respect to q, k, v, g, beta and the initial state."""
    inputs = [x.clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = inputs
    out, final = gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(13)
    loss = (out * torch.randn(out.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    loss.backward()
    return [out.detach(), final.detach()] + [x.grad for x in inputs]


def _grouped_rule_on_fla(rank, world, inputs, cu_seqlens):
    _fla_kernels_only()
    return _grouped_rule_forward_backward(inputs, cu_seqlens)


@pytest.mark.slow
def test_fla_grouped_value_heads_equal_torch_path():
    """FLA's chunk_gated_delta_rule given q, k with fewer heads than v (2 key heads, 6 value heads) equals our torch
    path: output, final state and every input gradient, across document boundaries."""
    inputs, cu_seqlens = _grouped_inputs()
    expected = _grouped_rule_forward_backward(inputs, cu_seqlens)
    (fla,) = run_distributed(_grouped_rule_on_fla, 1, inputs, cu_seqlens, fresh_interpreter=True)
    names = ["output", "final state", "grad q", "grad k", "grad v", "grad g", "grad beta", "grad initial state"]
    for name, a, b in zip(names, fla, expected, strict=True):
        _assert_close(a, b, name)


def test_torch_path_grouped_value_heads_mean_repeat_interleave():
    """The torch path given hk < h equals the same call with q and k repeat_interleave'd to h heads (value head i
    reads key head i // (h // hk)), gradients included (summed over the value heads a key head serves): exact up
    to fp32 rounding (1e-7 measured), since the repeat only moves where the same products are formed."""
    inputs, cu_seqlens = _grouped_inputs()
    grouped = _grouped_rule_forward_backward(inputs, cu_seqlens)
    q, k = (x.repeat_interleave(3, dim=2) for x in inputs[:2])  # [b, t, h, dk]
    repeated = _grouped_rule_forward_backward([q, k] + inputs[2:], cu_seqlens)
    for name, a, b in zip(["output", "final state"], grouped[:2], repeated[:2], strict=True):
        _assert_close(a, b, name)
    for name, grad, repeated_grad in zip(["q", "k"], grouped[2:4], repeated[2:4], strict=True):
        _assert_close(grad, repeated_grad.unflatten(2, (2, 3)).sum(3), f"grad {name}")


# ------------------------------------------------------------------------------------------------
# Generation: a prompt, then one token at a time from the saved conv and recurrent states
# ------------------------------------------------------------------------------------------------


def _generation_inputs():
    """x [b, t, c] for the conv (c = 2 * hk * dk + h * dv) and its weight; g, beta for 2 key / 4 value heads."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 72, 2 * 2 * 16 + 4 * 8, generator=gen)
    weight = torch.randn(x.shape[-1], 4, generator=gen) * 0.5
    g = F.logsigmoid(torch.randn(2, 72, 4, generator=gen) + 2.0)
    beta = torch.rand(2, 72, 4, generator=gen)
    return x, weight, g, beta


def _generate_states(x, weight, g, beta, prompt_len=68):
    """The GDN kernels as generation calls them: the prompt with states out, then each token from the states."""
    conv_state, state, outs = torch.zeros(x.shape[0], x.shape[-1], weight.shape[-1]), None, []
    for start, end in [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, x.shape[1])]:
        y, conv_state = gdn_ops.causal_conv1d_with_state(x[:, start:end], weight, conv_state)
        q, k, v = y.split([32, 32, 32], dim=-1)
        q, k, v = q.unflatten(-1, (2, 16)), k.unflatten(-1, (2, 16)), v.unflatten(-1, (4, 8))
        if end - start > 1:
            o, state = gdn_ops.chunk_gated_delta_rule(q, k, v, g[:, start:end], beta[:, start:end],
                                                      initial_state=state, output_final_state=True)
        else:
            o, state = gdn_ops.fused_recurrent_gated_delta_rule(q, k, v, g[:, start:end], beta[:, start:end],
                                                                initial_state=state)
        outs.append(o)
    return torch.cat(outs, dim=1), conv_state, state


def _generate_states_on_fla(rank, world, *inputs):
    _fla_kernels_only()
    return _generate_states(*inputs)


@pytest.mark.slow
def test_fla_generation_kernels_equal_torch_path():
    """FLA's conv with initial and final state, its one-token conv update, its chunked kernel from an initial state
    and its fused recurrent kernel -- what generation runs on a GPU -- give the torch path's outputs, conv state and
    recurrent state over a 68-token prompt and 4 decode steps (grouped value heads)."""
    inputs = _generation_inputs()
    expected = _generate_states(*inputs)
    (fla,) = run_distributed(_generate_states_on_fla, 1, *inputs, fresh_interpreter=True)
    for name, a, b in zip(["output", "conv state", "recurrent state"], fla, expected, strict=True):
        _assert_close(a, b, name)


# ------------------------------------------------------------------------------------------------
# Backend choice (no Triton needed)
# ------------------------------------------------------------------------------------------------


def test_fla_kernel_chosen_under_interpreter_unless_the_torch_path_is_chosen(monkeypatch):
    """With the interpreter (faked) on, a CPU tensor goes to FLA, except with kernels='torch' (--gdn-kernels torch) or
    deterministic=True (megatron's deterministic_mode, which its own GDN honours with its torch path); with it off, a
    CPU tensor always takes the torch path."""
    from megatron_qwen35.layers.gdn_ops import fla

    cpu = torch.zeros(1)
    monkeypatch.setattr(triton_interpreter, "triton_interpreter_enabled", lambda: True)
    monkeypatch.setattr(fla, "_load", lambda name: (f"fla {name}", None))
    assert fla.kernel("causal_conv1d", cpu, kernels="fla", deterministic=False) == "fla causal_conv1d"
    assert fla.kernel("causal_conv1d", cpu, kernels="fla", deterministic=True) is None
    assert fla.kernel("causal_conv1d", cpu, kernels="torch", deterministic=False) is None
    monkeypatch.setattr(triton_interpreter, "triton_interpreter_enabled", lambda: False)
    assert fla.kernel("causal_conv1d", cpu, kernels="fla", deterministic=False) is None


def test_fla_that_does_not_import_where_it_would_run_is_an_error_naming_why(monkeypatch):
    """No quiet switch to the (slower) torch path: the import failure is named, with the explicit way out; choosing
    the torch path (or deterministic mode) computes there."""
    from megatron_qwen35.layers.gdn_ops import fla

    monkeypatch.setattr(triton_interpreter, "triton_interpreter_enabled", lambda: True)
    monkeypatch.setattr(fla, "_load", lambda name: (None, ImportError("libcuda.so.1: cannot open shared object")))
    (q, k, v, g, beta, _), _ = _grouped_inputs()
    x, weight = torch.randn(1, 20, 6), torch.randn(6, 4)
    with pytest.raises(fla.FLAUnavailable, match=r"chunk_gated_delta_rule does not import on this machine "
                                                 r"\(ImportError: libcuda.so.1.*--gdn-kernels torch"):
        gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta)
    with pytest.raises(fla.FLAUnavailable, match="causal_conv1d does not import"):
        gdn_ops.causal_conv1d(x, weight)
    assert gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta, kernels="torch")[0].shape == v.shape
    assert gdn_ops.chunk_gated_delta_rule(q, k, v, g, beta, deterministic=True)[0].shape == v.shape
    assert gdn_ops.causal_conv1d(x, weight, kernels="torch").shape == x.shape


def test_installed_triton_and_fla_are_the_releases_the_interpreter_adaptations_were_written_for():
    """A version bump fails here: re-check Autotuner._bench and FunctionRewriter.rewrite_ast (replaced in
    runtime/triton_interpreter.py) and whether FLA's kernels still need int32 loop indices, then update WRITTEN_FOR."""
    from importlib.metadata import version

    installed = {name: version(name) for name in triton_interpreter.WRITTEN_FOR}
    assert installed == triton_interpreter.WRITTEN_FOR


def test_enable_refuses_a_triton_imported_without_the_interpreter(monkeypatch):
    """Kernels defined before TRITON_INTERPRET=1 stay compiled ones: enabling then is an error that says so."""
    monkeypatch.setitem(sys.modules, "triton", object())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton was imported before enable_triton_interpreter"):
        triton_interpreter.enable_triton_interpreter()
