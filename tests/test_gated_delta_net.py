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
