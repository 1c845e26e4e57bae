"""Presets, Hugging Face config.json translation, and every preset's size on the meta device."""

import json

import pytest
import torch

from megatron_qwen35.config import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    PRESETS,
    qwen35_config_from_hf,
    qwen35_config_to_hf,
    qwen35_preset,
    qwen35_transformer_config,
)

PUBLIC = ["0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b"]


def _nominal(name):
    """'35b-a3b' -> (35e9, 3e9); '0.8b' -> (0.8e9, None)."""
    total, _, active = name.partition("-a")
    return float(total[:-1]) * 1e9, (float(active[:-1]) * 1e9 if active else None)


def test_layer_pattern_is_three_gdn_then_attention():
    """Layer i is full attention exactly when (i + 1) % 4 == 0, for every public preset."""
    for name in PUBLIC:
        cfg = PRESETS[name]
        assert cfg.layer_types == tuple(FULL_ATTENTION if (i + 1) % 4 == 0 else LINEAR_ATTENTION
                                        for i in range(cfg.num_layers))


def test_shared_facts_of_the_family():
    for name in PUBLIC:
        cfg = PRESETS[name]
        assert (cfg.vocab_size, cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (248320, 256, 64, 1e7)
        assert (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_conv_kernel_dim) == (16, 128, 4)
        assert cfg.mrope_section == (11, 11, 10) and cfg.norm_epsilon == 1e-6
    assert [n for n in PUBLIC if PRESETS[n].tie_word_embeddings] == ["0.8b", "2b", "4b"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    """ours -> config.json -> ours is the identity (the VL wrapper's config.json for a model with a vision tower)."""
    cfg = PRESETS[name]
    hf = json.loads(json.dumps(qwen35_config_to_hf(cfg)))
    assert ("vision_config" in hf) == (cfg.vision is not None)
    assert qwen35_config_from_hf(hf, name=cfg.name) == cfg


def test_transformers_accepts_our_config_json():
    from transformers import AutoConfig

    for name in ["tiny", "tiny-moe", "35b-a3b"]:
        hf = qwen35_config_to_hf(PRESETS[name])
        loaded = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        assert loaded.get_text_config().layer_types == list(PRESETS[name].layer_types)


def test_multimodal_config_reads_text_config_and_tying():
    """The wrapper owns the tying flag; a vision_config that omits keys takes transformers' defaults (patch 16,
    merge 2, the 48 x 48 position grid, ...) and the token ids are the wrapper's defaults."""
    hf = qwen35_config_to_hf(PRESETS["0.8b"])
    hf["text_config"]["tie_word_embeddings"] = False
    del hf["text_config"]["model_type"]
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        del hf[key]
    hf["vision_config"] = {"hidden_size": 768, "intermediate_size": 3072, "depth": 12, "num_heads": 12,
                           "out_hidden_size": 1024}
    assert qwen35_config_from_hf(hf, name="0.8b") == PRESETS["0.8b"]


def test_a_vision_config_the_tower_cannot_run_is_named():
    hf = qwen35_config_to_hf(PRESETS["tiny-vl"])
    hf["vision_config"]["num_heads"] = 3
    with pytest.raises(ValueError, match="hidden_size 32 is not a multiple of num_heads 3"):
        qwen35_config_from_hf(hf)


def test_full_attention_interval_without_layer_types():
    hf = qwen35_config_to_hf(PRESETS["tiny"])
    del hf["layer_types"]
    hf["full_attention_interval"] = 2
    assert qwen35_config_from_hf(hf).layer_types == (LINEAR_ATTENTION, FULL_ATTENTION) * 2


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"layer_types": ["linear_attention"]}, "layer_types has 1 entries for 4 layers"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads 3 is not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"intermediate_size": None}, "intermediate_size=None: expected a positive whole number"),
    ({"num_attention_heads": "x"}, "num_attention_heads='x': expected a positive whole number"),
    ({"rope_parameters": [1]}, r"a field of the wrong kind \(TypeError"),
])
def test_bad_hf_config_names_the_culprit(change, message):
    hf = {**qwen35_config_to_hf(PRESETS["tiny"]), **change}
    with pytest.raises(ValueError, match=message):
        qwen35_config_from_hf(hf)


def test_missing_required_key_is_named():
    hf = qwen35_config_to_hf(PRESETS["tiny-moe"])
    del hf["num_experts_per_tok"]
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        qwen35_config_from_hf(hf)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown Qwen3.5 preset '7b'"):
        qwen35_preset("7b")


def _transformers_vision_parameters(cfg) -> int:
    from megatron_qwen35.hf_reference import modeling, reference_config

    if cfg.vision is None:
        return 0
    with torch.device("meta"):
        tower = modeling(cfg.is_moe).Qwen3_5VisionModel(reference_config(cfg).vision_config) if not cfg.is_moe else \
            modeling(True).Qwen3_5MoeVisionModel(reference_config(cfg).vision_config)
    return sum(p.numel() for p in tower.parameters())


@pytest.mark.parametrize("name", PUBLIC)
def test_preset_builds_on_meta_with_its_public_size(name, megatron_single_process):
    """Language-model parameters (no MTP, no ViT) within 7% of the name; MoE active parameters within 20%; the
    vision tower exactly transformers' for the same config."""
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = PRESETS[name]
    tc = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, perform_initialization=False)
    with torch.device("meta"):
        model = qwen35_gpt_model(cfg, tc, backend="local")
    text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("mtp.", "vision_model.")))
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_model."))
    assert vision == _transformers_vision_parameters(cfg)
    total, active = _nominal(name)
    assert abs(text - total) / total <= 0.07, f"{name}: {text / 1e9:.3f}B parameters"
    if active is not None:
        idle_experts = cfg.num_experts - cfg.moe_router_topk
        inactive = cfg.num_layers * idle_experts * 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
        assert abs(text - inactive - active) / active <= 0.20, f"{name}: {(text - inactive) / 1e9:.2f}B active"


def test_transformer_config_carries_the_architecture():
    tc = qwen35_transformer_config(PRESETS["35b-a3b"])
    assert tc.attention_output_gate and tc.qk_layernorm and tc.layernorm_zero_centered_gamma
    assert tc.moe_shared_expert_gate and tc.num_moe_experts == 256 and tc.moe_router_topk == 8
    assert tc.kv_channels == 256 and tc.linear_num_value_heads == 32 and tc.mtp_num_layers == 1
    assert tc.linear_attention_freq == [0 if (i + 1) % 4 == 0 else 1 for i in range(40)]


def test_contradicting_transformer_config_is_refused(megatron_single_process):
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match="num_query_groups=4 .model 'tiny' needs 2"):
        qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, num_query_groups=4), backend="local")
