"""Hugging Face's config.json <-> `Qwen35Config`: text-only (Qwen3_5(Moe)ForCausalLM) and vision-language
(Qwen3_5(Moe)ForConditionalGeneration) files; a required key that is missing raises, naming it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_qwen35.config.model import (
    HF_VISION_KEYS,
    MULTIMODAL_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    VL_TOKEN_KEYS,
    Qwen35Config,
    Qwen35VisionConfig,
)


def _text_section(hf: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The text part of a config.json and whether it is MoE; multimodal configs nest it under text_config."""
    model_type = hf.get("model_type")
    if model_type in MULTIMODAL_MODEL_TYPES:
        if "text_config" not in hf:
            raise ValueError(f"config.json of model_type '{model_type}' has no text_config")
        text = dict(hf["text_config"])
        text.setdefault("model_type", MULTIMODAL_MODEL_TYPES[model_type])
        if "tie_word_embeddings" in hf:  # the multimodal wrapper owns the tying flag
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        return text, model_type == "qwen3_5_moe"
    if model_type in TEXT_MODEL_TYPES:
        return hf, TEXT_MODEL_TYPES[model_type]
    raise ValueError(f"unknown model_type '{model_type}' in config.json; expected one of "
                     f"{sorted(TEXT_MODEL_TYPES) + sorted(MULTIMODAL_MODEL_TYPES)}")


def _required(d: dict[str, Any], key: str, *, count: bool = True):
    """A key the config must give; a count (layers, heads, widths) a positive whole number."""
    if key not in d:
        raise ValueError(f"config.json lacks required key '{key}'")
    if count and (type(d[key]) is not int or d[key] < 1):
        raise ValueError(f"config.json {key}={d[key]!r}: expected a positive whole number")
    return d[key]


def qwen35_config_from_hf(hf: dict[str, Any] | str | Path, *, name: str = "hf") -> Qwen35Config:
    """Our config from a Hugging Face config.json (a dict or a path to the file or its directory). A file that is
    not a config (not JSON, not an object, a field of the wrong kind) is a ValueError naming it."""
    source = "config.json"
    if not isinstance(hf, dict):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {path}")
        source = str(path)
        try:
            hf = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{source} holds a JSON {type(hf).__name__}, not a config object")
    try:
        return _config_from_hf(hf, name)
    except (TypeError, AttributeError) as e:  # a field of the wrong kind (a list where an object goes, ...)
        raise ValueError(f"{source}: a field of the wrong kind ({type(e).__name__}: {e})") from None


def _config_from_hf(hf: dict[str, Any], name: str) -> Qwen35Config:
    text, is_moe = _text_section(hf)
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act '{text['hidden_act']}' is not supported (Qwen3.5 uses silu)")
    if text.get("attention_bias", False):
        raise ValueError("config.json attention_bias=true is not supported (Qwen3.5 has no attention bias)")
    rope = dict(text.get("rope_parameters") or {})
    for legacy in ("rope_theta", "partial_rotary_factor", "mrope_section"):  # older files keep them at top level
        if legacy in text and legacy not in rope:
            rope[legacy] = text[legacy]
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_type '{rope['rope_type']}' is not supported")
    if "mrope_section" not in rope and "rope_scaling" in text and text["rope_scaling"]:
        rope["mrope_section"] = text["rope_scaling"].get("mrope_section")
    if rope.get("mrope_interleaved") is False:
        raise ValueError("config.json mrope_interleaved=false: Qwen3.5 uses interleaved mRoPE")
    kw: dict[str, Any] = dict(
        hidden_size=_required(text, "hidden_size"),
        num_layers=_required(text, "num_hidden_layers"),
        num_attention_heads=_required(text, "num_attention_heads"),
        num_query_groups=_required(text, "num_key_value_heads"),
        head_dim=_required(text, "head_dim"),
        vocab_size=_required(text, "vocab_size"),
        norm_epsilon=text.get("rms_norm_eps", 1e-6),
        linear_num_key_heads=_required(text, "linear_num_key_heads"),
        linear_num_value_heads=_required(text, "linear_num_value_heads"),
        linear_key_head_dim=_required(text, "linear_key_head_dim"),
        linear_value_head_dim=_required(text, "linear_value_head_dim"),
        linear_conv_kernel_dim=_required(text, "linear_conv_kernel_dim"),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        rope_theta=float(_required(rope, "rope_theta", count=False)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.25)),
        mrope_section=tuple(rope.get("mrope_section") or (11, 11, 10)),
        mtp_num_layers=int(text.get("mtp_num_hidden_layers", 0)),
        max_position_embeddings=text.get("max_position_embeddings", 262144),
        name=name,
    )
    if text.get("layer_types") is not None:
        kw["layer_types"] = tuple(text["layer_types"])
    elif "full_attention_interval" in text:
        kw["full_attention_interval"] = text["full_attention_interval"]
    if is_moe:
        kw.update(num_experts=_required(text, "num_experts"), moe_router_topk=_required(text, "num_experts_per_tok"),
                  moe_ffn_hidden_size=_required(text, "moe_intermediate_size"),
                  moe_shared_expert_intermediate_size=_required(text, "shared_expert_intermediate_size"),
                  router_aux_loss_coef=text.get("router_aux_loss_coef", 0.001))
    else:
        kw["ffn_hidden_size"] = _required(text, "intermediate_size")
    vision = hf.get("vision_config")
    if vision:
        kw["vision"] = _vision_from_hf(hf, vision)
    return Qwen35Config(**kw)


def _vision_from_hf(hf: dict[str, Any], vision: dict[str, Any]) -> Qwen35VisionConfig:
    """The vision tower of a VL config.json. A key the file omits takes the default of transformers' own
    `Qwen3_5VisionConfig` (read from the class, so the two cannot drift); the token ids come from the wrapper."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config, Qwen3_5VisionConfig

    known = {k: v for k, v in vision.items() if k in HF_VISION_KEYS or k == "rope_parameters"}
    full = Qwen3_5VisionConfig(**known)
    rope = full.rope_parameters or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"config.json vision_config rope_type '{rope['rope_type']}' is not supported "
                         "(Qwen3.5's vision tower uses axial 2-D rope)")
    for key in ("patch_size", "temporal_patch_size"):
        if not isinstance(getattr(full, key), int):
            raise ValueError(f"config.json vision_config {key}={getattr(full, key)!r}: Qwen3.5 uses square patches "
                             "given as one integer")
    wrapper_defaults = {f.name: f.default for f in dataclasses.fields(Qwen3_5Config) if f.name in VL_TOKEN_KEYS}
    return Qwen35VisionConfig(**{k: getattr(full, k) for k in HF_VISION_KEYS},
                              rope_theta=float(rope.get("rope_theta", 10000.0)),
                              **{k: hf.get(k, wrapper_defaults[k]) for k in VL_TOKEN_KEYS})


def _vision_to_hf(vision: Qwen35VisionConfig) -> dict[str, Any]:
    return {"model_type": "qwen3_5_vision", **{k: getattr(vision, k) for k in HF_VISION_KEYS},
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta}}


def qwen35_config_to_hf(cfg: Qwen35Config) -> dict[str, Any]:
    """A config.json that transformers loads: the VL wrapper (Qwen3_5(Moe)ForConditionalGeneration) for a model
    with a vision tower, else text-only (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM)."""
    text = _text_config_to_hf(cfg)
    if cfg.vision is None:
        return text
    text.pop("architectures")
    text.pop("tie_word_embeddings")
    wrapper, cls = ("qwen3_5_moe", "Qwen3_5Moe") if cfg.is_moe else ("qwen3_5", "Qwen3_5")
    return {"architectures": [f"{cls}ForConditionalGeneration"], "model_type": wrapper,
            "text_config": text, "vision_config": _vision_to_hf(cfg.vision),
            **{k: getattr(cfg.vision, k) for k in VL_TOKEN_KEYS},
            "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "bfloat16"}


def _text_config_to_hf(cfg: Qwen35Config) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["Qwen3_5MoeForCausalLM" if cfg.is_moe else "Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_moe_text" if cfg.is_moe else "qwen3_5_text",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads,
        "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "layer_types": list(cfg.layer_types),
        "full_attention_interval": cfg.full_attention_interval,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor,
                            "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mtp_num_hidden_layers": cfg.mtp_num_layers,
        "torch_dtype": "bfloat16",
    }
    if cfg.is_moe:
        hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                  moe_intermediate_size=cfg.moe_ffn_hidden_size,
                  shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                  router_aux_loss_coef=cfg.router_aux_loss_coef)
    else:
        hf["intermediate_size"] = cfg.ffn_hidden_size
    return hf
