"""Our megatron model against transformers' Qwen3.5, layer by layer and end to end, in fp32 on CPU."""

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict
from megatron_qwen35.hf_reference import reference_model
from megatron_qwen35.provider import qwen35_gpt_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

LOGIT_TOL = 1e-4  # fp32 through 4 layers; the two sides differ only in summation order


def _pair(preset: str, seed: int = 0):
    cfg = qwen35_preset(preset).replace(mtp_num_layers=0)  # transformers has no MTP head to compare with
    hf = reference_model(cfg, seed)
    ours = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(ours, cfg, hf.state_dict(), include_mtp=False)
    return cfg, hf, ours


def _tokens(cfg, batch=2, seq=70, seed=1):
    g = torch.Generator().manual_seed(seed)  # 70 tokens: more than one 64-token GDN chunk, not a multiple
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def _ours_logits(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_every_layer_output_matches_transformers(preset):
    """The residual stream after each decoder layer equals transformers' (fp32, max abs <= 1e-4)."""
    cfg, hf, ours = _pair(preset)
    ids = _tokens(cfg)
    got, want = [], []
    for layer in ours.decoder.layers:
        layer.register_forward_hook(lambda m, i, o: got.append(o[0].transpose(0, 1)))  # [s, b, h] -> [b, s, h]
    for layer in hf.model.layers:
        layer.register_forward_hook(lambda m, i, o: want.append(o if torch.is_tensor(o) else o[0]))
    with torch.no_grad():
        _ours_logits(ours, ids)
        hf(input_ids=ids)
    assert len(got) == len(want) == cfg.num_layers
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = (a - b).abs().max().item()
        assert err <= LOGIT_TOL * max(1.0, b.abs().max().item()), f"layer {i} ({cfg.layer_types[i]}): max abs {err}"


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_logits_match_transformers(preset):
    """Whole-model logits: max |delta| <= 1e-4 and the same argmax at every position."""
    cfg, hf, ours = _pair(preset)
    ids = _tokens(cfg)
    with torch.no_grad():
        a = _ours_logits(ours, ids)
        b = hf(input_ids=ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= LOGIT_TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_missed_norm_offset_would_show():
    """Guard on the test itself: perturbing one norm by +1 (the classic conversion bug) breaks parity."""
    cfg, hf, ours = _pair("tiny")
    ids = _tokens(cfg)
    with torch.no_grad():
        ours.decoder.layers[0].self_attention.out_norm.weight.add_(1.0)
        a = _ours_logits(ours, ids)
        b = hf(input_ids=ids).logits
    assert (a - b).abs().max().item() > 100 * LOGIT_TOL


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_config_transformers_writes_without_mrope_section_is_accepted_and_exact(moe):
    """transformers' own text configs carry no mrope_section unless given one (its model then uses [11, 11, 10], which
    does not sum to these heads' rotary dims): a config the reference runs is a config we run, to the same logits."""
    from megatron_qwen35.config import qwen35_config_from_hf
    from megatron_qwen35.hf_reference import modeling, randomize_

    m = modeling(moe)
    config_cls = m.Qwen3_5MoeTextConfig if moe else m.Qwen3_5TextConfig
    size = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48) \
        if moe else dict(intermediate_size=128)
    hf_config = config_cls(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                           linear_key_head_dim=16, linear_value_head_dim=16, **size)
    written = hf_config.to_dict()
    assert "mrope_section" not in (written.get("rope_parameters") or {})
    cfg = qwen35_config_from_hf(written).replace(mtp_num_layers=0)
    torch.manual_seed(0)
    hf = randomize_((m.Qwen3_5MoeForCausalLM if moe else m.Qwen3_5ForCausalLM)(hf_config).float().eval(), 0)
    ours = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(ours, cfg, hf.state_dict(), include_mtp=False)
    ids = _tokens(cfg)
    with torch.no_grad():
        a, b = _ours_logits(ours, ids), hf(input_ids=ids).logits
    assert (a - b).abs().max().item() <= LOGIT_TOL and torch.equal(a.argmax(-1), b.argmax(-1))
