"""The public Qwen3.5 sizes (README.md's Sizes table) and the tiny test / demo shapes, by name."""

from __future__ import annotations

import dataclasses

from megatron_qwen35.config.model import VL_TOKEN_KEYS, Qwen35Config, Qwen35VisionConfig


def _dense(hidden, layers, heads, groups, ffn, v_heads, vit, tied, name):
    return Qwen35Config(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn, linear_num_value_heads=v_heads, vision=_vit(vit, hidden),
                        tie_word_embeddings=tied, name=name)


def _moe(hidden, layers, heads, groups, experts, topk, expert_ffn, shared_ffn, v_heads, vit, name):
    return Qwen35Config(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
                        num_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=expert_ffn,
                        moe_shared_expert_intermediate_size=shared_ffn, linear_num_value_heads=v_heads,
                        vision=_vit(vit, hidden), tie_word_embeddings=False, name=name)


def _vit(shape, text_hidden):
    hidden, ffn, depth, heads = shape
    return Qwen35VisionConfig(hidden_size=hidden, intermediate_size=ffn, depth=depth, num_heads=heads,
                              out_hidden_size=text_hidden)


# (width, MLP width, depth, heads) of the three ViTs of the family
_VIT_S, _VIT_M, _VIT_L = (768, 3072, 12, 12), (1024, 4096, 24, 16), (1152, 4304, 27, 16)

# The public sizes (README.md's Sizes table). Parameter counts are checked in tests/test_config.py.
PRESETS: dict[str, Qwen35Config] = {
    "0.8b": _dense(1024, 24, 8, 2, 3584, 16, _VIT_S, True, "0.8b"),
    "2b": _dense(2048, 24, 8, 2, 6144, 16, _VIT_M, True, "2b"),
    "4b": _dense(2560, 32, 16, 4, 9216, 32, _VIT_M, True, "4b"),
    "9b": _dense(4096, 32, 16, 4, 12288, 32, _VIT_L, False, "9b"),
    "27b": _dense(5120, 64, 24, 4, 17408, 48, _VIT_L, False, "27b"),
    "35b-a3b": _moe(2048, 40, 16, 2, 256, 8, 512, 512, 32, _VIT_L, "35b-a3b"),
    "122b-a10b": _moe(3072, 48, 32, 2, 256, 8, 1024, 1024, 64, _VIT_L, "122b-a10b"),
    "397b-a17b": _moe(4096, 60, 32, 2, 512, 10, 1024, 1024, 64, _VIT_L, "397b-a17b"),
}

# Tiny shapes for tests and the CPU demo: every feature of the real ones (GDN with grouped value heads, gated
# attention, partial rope, MoE with shared expert, MTP), small enough for two CPU cores.
_TINY = dict(vocab_size=512, head_dim=32, partial_rotary_factor=0.25, mrope_section=(2, 1, 1),
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             max_position_embeddings=4096)
PRESETS["tiny"] = Qwen35Config(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=128, tie_word_embeddings=True, name="tiny", **_TINY)
PRESETS["tiny-moe"] = Qwen35Config(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                                   num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                   moe_shared_expert_intermediate_size=48, tie_word_embeddings=False,
                                   name="tiny-moe", **_TINY)

# The CPU demo: tiny-moe's shape with the real 248320-token vocabulary, so it reads real tokenized text and its
# Hugging Face export generates real words.
PRESETS["tiny-demo"] = PRESETS["tiny-moe"].replace(vocab_size=248320, name="tiny-demo")


# Tiny vision-language models: a two-block ViT on 16-pixel patches with an 8 x 8 learned position grid (so every
# image's positions are resampled), its token ids inside the 512-token vocabulary.
_TINY_VISION = Qwen35VisionConfig(hidden_size=32, intermediate_size=64, depth=2, num_heads=2, out_hidden_size=64,
                                  num_position_embeddings=64, image_token_id=508, video_token_id=509,
                                  vision_start_token_id=510, vision_end_token_id=511)
PRESETS["tiny-vl"] = PRESETS["tiny"].replace(vision=_TINY_VISION, name="tiny-vl")
PRESETS["tiny-vl-moe"] = PRESETS["tiny-moe"].replace(vision=_TINY_VISION, name="tiny-vl-moe")
# The VL demo: tiny-vl-moe with the real vocabulary and the real image / video token ids.
PRESETS["tiny-vl-demo"] = PRESETS["tiny-vl-moe"].replace(
    vocab_size=248320, name="tiny-vl-demo",
    vision=dataclasses.replace(_TINY_VISION, **{f: getattr(Qwen35VisionConfig, f) for f in VL_TOKEN_KEYS}))


def qwen35_preset(name: str) -> Qwen35Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen3.5 preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
