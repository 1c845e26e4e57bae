"""Activation recompute changes no number: the same loss and every gradient of tiny-moe (MTP included) with the
recipes' selective modules (core_attn: our core attention; gdn_norm_out: our GDN; moe_act needs grouped GEMM, which
the local backend lacks, so the whole MoE layer, "moe", stands in for it) and with megatron's full recompute."""

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config

RECOMPUTE = {
    "selective (recipes)": dict(recompute_granularity="selective",
                                recompute_modules=["core_attn", "gdn_norm_out", "moe"]),
    "full uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def _loss_and_grads(state, **recompute):
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset("tiny-moe")
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32, **recompute),
                             backend="local")
    if state is not None:
        model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=g)
    loss = model(ids[:, :-1], torch.arange(32).expand(2, -1), None, labels=ids[:, 1:]).mean()
    loss.backward()  # the MTP and MoE aux losses ride on the graph
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_changes_nothing(name, megatron_single_process):
    torch.manual_seed(0)
    plain, want_loss, want = _loss_and_grads(None)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in plain.state_dict().items()}
    _, loss, got = _loss_and_grads(state, **RECOMPUTE[name])
    assert torch.equal(loss, want_loss)
    assert set(got) == set(want)
    for n, g in want.items():
        assert torch.allclose(got[n], g, rtol=0, atol=1e-6 * g.abs().max().item()), n
