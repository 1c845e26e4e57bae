"""Our Gated DeltaNet layer on its own: packed documents, output-norm recompute, tensor-parallel guards."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.specs.layer_specs import GDN, qwen35_layer_spec

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _gdn(**overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    cfg = qwen35_preset("tiny")
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, **overrides)
    spec = qwen35_layer_spec(GDN, False, tc, backend="local").submodules.self_attention
    torch.manual_seed(3)
    layer = build_module(spec, config=tc, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    with torch.no_grad():
        layer.out_norm.weight.normal_(0, 0.3)
        layer.A_log.uniform_(-1, 1)
        layer.dt_bias.normal_()
    return cfg, layer


def _packed(lengths):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def test_packed_documents_equal_separate_documents():
    """State and conv reset at document boundaries: a packed batch equals each document run alone (fp32, 1e-5)."""
    cfg, layer = _gdn()
    lengths = [37, 64, 90]  # across and inside 64-token chunks
    x = torch.randn(sum(lengths), 1, cfg.hidden_size, requires_grad=True)  # [t, 1, h]
    packed, _ = layer(x, None, packed_seq_params=_packed(lengths))
    packed.square().sum().backward()
    packed_grad = x.grad.clone()

    x.grad = None
    outs = [layer(doc, None)[0] for doc in torch.split(x, lengths, dim=0)]
    separate = torch.cat(outs, dim=0)
    separate.square().sum().backward()
    assert (packed - separate).abs().max().item() <= 1e-5
    assert (packed_grad - x.grad).abs().max().item() <= 1e-5


def test_packed_boundaries_must_cover_the_batch():
    cfg, layer = _gdn()
    with pytest.raises(ValueError, match="end at 30 but the batch has 40 tokens"):
        layer(torch.randn(40, 1, cfg.hidden_size), None, packed_seq_params=_packed([10, 20]))


def test_output_norm_recompute_changes_nothing():
    """Recomputing the gated output norm in backward gives the same output and gradients."""
    cfg, plain = _gdn()
    _, recomputed = _gdn(recompute_granularity="selective", recompute_modules=["gdn_norm_out"])
    assert recomputed.recompute_norm_out and not plain.recompute_norm_out
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(20, 2, cfg.hidden_size)
    grads = []
    for layer in (plain, recomputed):
        xi = x.clone().requires_grad_()
        out, _ = layer(xi, None)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, layer.in_proj.weight.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def _generate_through_layer(layer, prompt, steps, padding):
    """The layer as generation runs it: the (left-padded) prompt [s, b, h] once, then each of `steps` [n, b, h] as
    one token, its states kept in the inference context."""
    from megatron_qwen35.layers.inference_context import Qwen35InferenceContext

    context = Qwen35InferenceContext(padding, max_sequence_length=prompt.shape[0] + steps.shape[0])
    outs = []
    for piece in [prompt] + list(steps.split(1, dim=0)):
        outs.append(layer(piece, None, inference_context=context)[0])
        context.increment_sequence_len_offset(piece.shape[0])
    return torch.cat(outs, dim=0), context


def test_generation_continues_the_full_sequence_forward():
    """A 70-token prompt (more than one 64-token chunk) through the chunked kernel, then 6 tokens one at a time from
    the conv and recurrent states the context keeps under the layer's number: the outputs equal the layer's training
    forward over all 76 tokens (fp32, relative to the largest output: chunked and recurrent forms differ in summation
    order only, measured 3e-7; 1e-5 bound)."""
    cfg, layer = _gdn()
    x = torch.randn(76, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole, _ = layer(x, None)
        generated, context = _generate_through_layer(layer, x[:70], x[70:], torch.zeros(2, 70, dtype=torch.bool))
    assert (generated - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
    conv_state, recurrent_state = context.key_value_memory_dict[layer.layer_number]
    assert conv_state.shape == (2, layer.conv_dim_local_tp, 4) and recurrent_state.dtype == torch.float32


def test_left_padding_leaves_every_real_token_as_without_it():
    """Row 1 of a batch carries 9 pads before its 20-token prompt: its prompt and decode outputs equal the same
    tokens run alone, unpadded (the pads are zeroed at the input, so both states stay as without them), while
    random pads left unzeroed would change them (the guard that this test can fail). Relative to the largest output:
    measured 5e-7 with the pads zeroed, 1.0 without."""
    cfg, layer = _gdn()
    gen = torch.Generator().manual_seed(6)
    prompt, steps = (torch.randn(n, 2, cfg.hidden_size, generator=gen) for n in (29, 4))
    padding = torch.zeros(2, 29, dtype=torch.bool)
    padding[1, :9] = True
    with torch.no_grad():
        batch, _ = _generate_through_layer(layer, prompt, steps, padding)
        alone, _ = _generate_through_layer(layer, prompt[9:, 1:], steps[:, 1:], torch.zeros(1, 20, dtype=torch.bool))
        unmasked, _ = _generate_through_layer(layer, prompt, steps, torch.zeros(2, 29, dtype=torch.bool))
    scale = alone.abs().max().item()
    assert (batch[9:, 1:] - alone).abs().max().item() <= 1e-5 * scale
    assert (unmasked[9:, 1:] - alone).abs().max().item() > 0.1 * scale


def test_generation_needs_a_static_context_and_its_prompt_first():
    """Dynamic batching, or a decode step with no state from a prompt, is one clear error."""
    from megatron.core.inference.contexts import StaticInferenceContext

    cfg, layer = _gdn()

    class Dynamic:
        def is_static_batching(self):
            return False

    with pytest.raises(ValueError, match="static inference context"):
        layer(torch.randn(1, 1, cfg.hidden_size), None, inference_context=Dynamic())
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=8)
    context.sequence_len_offset = 3
    with pytest.raises(ValueError, match="run the prompt first"):
        layer(torch.randn(1, 1, cfg.hidden_size), None, inference_context=context)
