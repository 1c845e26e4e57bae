"""The Qwen3.5 architecture: the public presets, Hugging Face config.json <-> ours, ours -> TransformerConfig.

`Qwen35Config` is the one source of truth for a model's shape. It is read from a preset name or a Hugging Face
`config.json`, written back to a `config.json`, and turned into megatron-core's `TransformerConfig` (which already
has every Qwen3.5 switch: attention_output_gate, moe_shared_expert_gate, layernorm_zero_centered_gamma, the
`linear_*` Gated DeltaNet fields, mtp_num_layers); rotary settings go to GPTModel through `layers/rotary.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

LINEAR_ATTENTION = "linear_attention"  # Hugging Face's name for a Gated DeltaNet layer
FULL_ATTENTION = "full_attention"

TEXT_MODEL_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}  # model_type -> is MoE
MULTIMODAL_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}


@dataclass(frozen=True)
class Qwen35VisionConfig:
    """The vision tower of a Qwen3.5 vision-language model, and the token ids that place its output in the text.

    Field names and defaults are transformers' `Qwen3_5VisionConfig`; the four token ids belong to the wrapper's
    `Qwen3_5Config` in config.json and live here because only a model with a vision tower has them.
    """

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    out_hidden_size: int  # the text model's hidden size: the merger writes into the token embeddings
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304  # a square grid of learned positions, resampled to each image
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        side = int(round(self.num_position_embeddings ** 0.5))
        if side * side != self.num_position_embeddings:
            problems.append(f"num_position_embeddings {self.num_position_embeddings} is not a square grid")
        if problems:
            raise ValueError("inconsistent Qwen3.5 vision config: " + "; ".join(problems))

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x frames x height x width (the processor's pixel_values rows)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


_HF_VISION_KEYS = ("hidden_size", "intermediate_size", "depth", "num_heads", "out_hidden_size", "patch_size",
                   "temporal_patch_size", "spatial_merge_size", "in_channels", "num_position_embeddings",
                   "hidden_act")
_HF_VL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class Qwen35Config:
    """Everything that fixes a Qwen3.5 text model's shape (and so its parameter count)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    linear_num_value_heads: int
    tie_word_embeddings: bool
    ffn_hidden_size: int | None = None  # dense MLP width; None for MoE models
    num_experts: int | None = None  # routed experts; None for dense models
    moe_router_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    vocab_size: int = 248320
    head_dim: int = 256  # attention head dim (kv_channels); not hidden/heads
    partial_rotary_factor: float = 0.25  # rope on the first 64 of 256 dims
    rope_theta: float = 1e7
    # interleaved t/h/w frequency split (vision), transformers' default when a config has none; any split is valid:
    # for text (one position for t, h and w) it changes nothing, and transformers' sections slice what exists
    mrope_section: tuple[int, ...] = (11, 11, 10)
    norm_epsilon: float = 1e-6
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4  # layer i is full attention when (i + 1) % 4 == 0
    layer_types: tuple[str, ...] | None = None  # explicit per-layer pattern; None derives it from the interval
    mtp_num_layers: int = 1  # public checkpoints carry one multi-token-prediction layer
    max_position_embeddings: int = 262144
    router_aux_loss_coef: float = 0.001
    vision: Qwen35VisionConfig | None = None  # None: a text-only model (Qwen3_5ForCausalLM)
    name: str = "custom"

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", tuple(
                FULL_ATTENTION if (i + 1) % self.full_attention_interval == 0 else LINEAR_ATTENTION
                for i in range(self.num_layers)))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
        if unknown:
            problems.append(f"unknown layer_types {unknown}")
        if self.is_moe:
            missing = [n for n in ("moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
                       if getattr(self, n) is None]
            if missing:
                problems.append(f"MoE model (num_experts={self.num_experts}) lacks {missing}")
        elif self.ffn_hidden_size is None:
            problems.append("dense model needs ffn_hidden_size")
        if self.num_attention_heads % self.num_query_groups:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_query_groups {self.num_query_groups}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append(f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                            f"linear_num_key_heads {self.linear_num_key_heads}")
        if problems:
            raise ValueError(f"inconsistent Qwen3.5 config '{self.name}': " + "; ".join(problems))

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes) -> Qwen35Config:
        """A copy with some fields changed; layer_types is re-derived when num_layers changes and none is given."""
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["mrope_section"] = list(self.mrope_section)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen35Config:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Qwen35Config fields {sorted(unknown)}")
        if d.get("vision") is not None:
            d["vision"] = Qwen35VisionConfig(**d["vision"])
        return cls(**d)


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

# The public sizes (DESIGN.md's table). Parameter counts are checked in tests/test_config.py.
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
    vision=dataclasses.replace(_TINY_VISION, **{f: getattr(Qwen35VisionConfig, f) for f in _HF_VL_TOKEN_KEYS}))


def qwen35_preset(name: str) -> Qwen35Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen3.5 preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config.json
# ---------------------------------------------------------------------------------------------------------------

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


def _required(d: dict[str, Any], key: str):
    if key not in d:
        raise ValueError(f"config.json lacks required key '{key}'")
    return d[key]


def qwen35_config_from_hf(hf: dict[str, Any] | str | Path, *, name: str = "hf") -> Qwen35Config:
    """Our config from a Hugging Face config.json (a dict or a path to the file or its directory)."""
    if not isinstance(hf, dict):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {path}")
        hf = json.loads(path.read_text())
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
        rope_theta=float(_required(rope, "rope_theta")),
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

    known = {k: v for k, v in vision.items() if k in _HF_VISION_KEYS or k == "rope_parameters"}
    full = Qwen3_5VisionConfig(**known)
    rope = full.rope_parameters or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"config.json vision_config rope_type '{rope['rope_type']}' is not supported "
                         "(Qwen3.5's vision tower uses axial 2-D rope)")
    for key in ("patch_size", "temporal_patch_size"):
        if not isinstance(getattr(full, key), int):
            raise ValueError(f"config.json vision_config {key}={getattr(full, key)!r}: Qwen3.5 uses square patches "
                             "given as one integer")
    wrapper_defaults = {f.name: f.default for f in dataclasses.fields(Qwen3_5Config) if f.name in _HF_VL_TOKEN_KEYS}
    return Qwen35VisionConfig(**{k: getattr(full, k) for k in _HF_VISION_KEYS},
                              rope_theta=float(rope.get("rope_theta", 10000.0)),
                              **{k: hf.get(k, wrapper_defaults[k]) for k in _HF_VL_TOKEN_KEYS})


def _vision_to_hf(vision: Qwen35VisionConfig) -> dict[str, Any]:
    return {"model_type": "qwen3_5_vision", **{k: getattr(vision, k) for k in _HF_VISION_KEYS},
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
            **{k: getattr(cfg.vision, k) for k in _HF_VL_TOKEN_KEYS},
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


# ---------------------------------------------------------------------------------------------------------------
# Megatron: the architecture in Megatron's terms, written once
# ---------------------------------------------------------------------------------------------------------------

def linear_attention_pattern(cfg: Qwen35Config) -> list[int]:
    """Megatron's per-layer pattern: 1 = Gated DeltaNet, 0 = full attention."""
    return [1 if t == LINEAR_ATTENTION else 0 for t in cfg.layer_types]


@dataclass(frozen=True)
class MegatronField:
    """One fact of the architecture as Megatron states it: the argument (`dest` of megatron.training's parser) and,
    where it has one, the TransformerConfig field it becomes; `value(cfg)` is what Qwen3.5 needs there."""

    dest: str
    value: Any  # Callable[[Qwen35Config], Any]
    config_field: str | None = ""  # "" = the same name as dest; None = not a TransformerConfig field (GPTModel's)
    moe_only: bool = False  # checked for MoE models only (megatron ignores these flags for dense ones)
    may_be_off: bool = False  # a run may turn it off (None or 0): a training aid beside the model, not its function

    @property
    def field(self) -> str | None:
        return self.dest if self.config_field == "" else self.config_field


def _fixed(value):
    return lambda cfg: value


_F = MegatronField
# Every Megatron argument that changes the model's function or shape. training/flags.py renders them as flags,
# refuses a parsed flag that differs, and qwen35_transformer_config / the provider's check read the config fields.
# Training knobs (dropout, init, aux-loss weight and type, dispatcher, recompute, precision) are not here.
MEGATRON_ARCHITECTURE: tuple[MegatronField, ...] = (
    _F("num_layers", lambda c: c.num_layers),
    _F("hidden_size", lambda c: c.hidden_size),
    _F("num_attention_heads", lambda c: c.num_attention_heads),
    _F("group_query_attention", _fixed(True), None),
    _F("num_query_groups", lambda c: c.num_query_groups),
    _F("kv_channels", lambda c: c.head_dim),  # 256, not hidden / heads
    _F("ffn_hidden_size", lambda c: c.moe_ffn_hidden_size if c.is_moe else c.ffn_hidden_size),
    _F("normalization", _fixed("RMSNorm")),
    _F("layernorm_epsilon", lambda c: c.norm_epsilon),
    _F("layernorm_zero_centered_gamma", _fixed(True)),  # Hugging Face's (1 + w) norms; w starts at zero
    _F("qk_layernorm", _fixed(True)),
    _F("attention_output_gate", _fixed(True)),  # q_proj's per-head [query | gate] half: out * sigmoid(gate)
    _F("swiglu", _fixed(True), "gated_linear_unit"),  # with activation_func = silu
    _F("add_bias_linear", _fixed(False)),
    _F("add_qkv_bias", _fixed(False)),
    _F("apply_residual_connection_post_layernorm", _fixed(False)),
    _F("position_embedding_type", _fixed("rope"), None),
    _F("rotary_percent", lambda c: c.partial_rotary_factor, None),  # rope on the first 64 of 256 dims
    _F("rotary_base", lambda c: int(c.rope_theta), None),
    _F("rotary_interleaved", _fixed(False)),  # rotate-half, as transformers (its "interleaved" is mRoPE's sections)
    _F("rotary_seq_len_interpolation_factor", _fixed(None), None),
    _F("use_rope_scaling", _fixed(False), None),
    _F("no_rope_freq", _fixed(None)),
    _F("window_size", _fixed(None)),
    _F("qk_l2_norm", _fixed(False)),
    _F("multi_latent_attention", _fixed(False)),
    _F("max_position_embeddings", lambda c: c.max_position_embeddings, None),
    _F("experimental_attention_variant", _fixed("gated_delta_net")),
    _F("linear_attention_freq", linear_attention_pattern),
    _F("linear_conv_kernel_dim", lambda c: c.linear_conv_kernel_dim),
    _F("linear_key_head_dim", lambda c: c.linear_key_head_dim),
    _F("linear_value_head_dim", lambda c: c.linear_value_head_dim),
    _F("linear_num_key_heads", lambda c: c.linear_num_key_heads),
    _F("linear_num_value_heads", lambda c: c.linear_num_value_heads),
    _F("vocab_size", lambda c: c.vocab_size, None),
    _F("make_vocab_size_divisible_by", _fixed(1), None),  # the checkpoint's vocabulary, unpadded
    _F("untie_embeddings_and_output_weights", lambda c: not c.tie_word_embeddings, None),
    # the multi-token-prediction layer trains beside the model (transformers' model never runs it): a run may leave it
    # out (--mtp-num-layers 0), e.g. to fine-tune a checkpoint saved without it
    _F("mtp_num_layers", lambda c: c.mtp_num_layers or None, may_be_off=True),
    _F("num_experts", lambda c: c.num_experts, "num_moe_experts"),
    _F("moe_router_topk", lambda c: c.moe_router_topk, moe_only=True),
    _F("moe_ffn_hidden_size", lambda c: c.moe_ffn_hidden_size, moe_only=True),
    _F("moe_shared_expert_intermediate_size", lambda c: c.moe_shared_expert_intermediate_size, moe_only=True),
    _F("moe_shared_expert_gate", _fixed(True), moe_only=True),  # sigmoid(x @ w) scales the shared expert
    _F("moe_layer_freq", _fixed(1), moe_only=True),  # every decoder layer is MoE
    # softmax over the top-k logits == transformers' softmax over all, top-k, renormalise
    _F("moe_router_pre_softmax", _fixed(False), moe_only=True),
    _F("moe_router_score_function", _fixed("softmax"), moe_only=True),
    _F("moe_router_topk_scaling_factor", _fixed(None), moe_only=True),
    _F("moe_router_num_groups", _fixed(None), moe_only=True),
    _F("moe_router_group_topk", _fixed(None), moe_only=True),
    _F("moe_router_enable_expert_bias", _fixed(False), moe_only=True),  # transformers' router has no bias
    _F("moe_latent_size", _fixed(None), moe_only=True),
)


def megatron_fields(cfg: Qwen35Config) -> tuple[MegatronField, ...]:
    """The MEGATRON_ARCHITECTURE rows that apply to `cfg` (the MoE rows only to MoE models)."""
    return tuple(f for f in MEGATRON_ARCHITECTURE if cfg.is_moe or not f.moe_only)


def qwen35_transformer_config(cfg: Qwen35Config, **overrides):
    """megatron-core's TransformerConfig for `cfg`; `overrides` set parallelism, precision, recompute, ...

    The architecture comes from MEGATRON_ARCHITECTURE; the rest are defaults for running it anywhere: fusions that
    need CUDA kernels (or Transformer Engine, for rope) are on only where they can run; users override any field.
    """
    from megatron.core.transformer import TransformerConfig

    from megatron_qwen35.runtime import transformer_engine_available

    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {f.field: f.value(cfg) for f in megatron_fields(cfg) if f.field is not None}
    kw.update(
        activation_func=F.silu,  # swiglu's activation (megatron.training sets it from --swiglu)
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=cuda,
        masked_softmax_fusion=cuda,
        persist_layer_norm=cuda,
        gradient_accumulation_fusion=False,
        # megatron's fused rope is TE's, and reads one position row: a VL model's positions differ per sample
        apply_rope_fusion=cuda and transformer_engine_available() and cfg.vision is None,
        use_cpu_initialization=not cuda,
    )
    if cfg.is_moe:
        kw.update(
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=cfg.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
        )
    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1:  # megatron requires it; p2p carries params_dtype
        kw.setdefault("pipeline_dtype", kw.get("params_dtype", torch.float32))
    if kw.get("virtual_pipeline_model_parallel_size"):  # as megatron.training: batched p2p mixes up PP2's messages
        kw.setdefault("overlap_p2p_comm", True)
        kw.setdefault("batch_p2p_comm", False)
    return TransformerConfig(**kw)

