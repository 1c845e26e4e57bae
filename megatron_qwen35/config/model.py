"""What a Qwen3.5 model is: `Qwen35Config` (the text model's shape) and `Qwen35VisionConfig` (its vision tower),
the one source of truth for a model's shape; presets.py names the public sizes, hf.py reads and writes Hugging Face's
config.json, megatron.py states the architecture in Megatron's terms."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The vision tokens: image and video pads and their delimiters. The model reads them, never learns to predict
        them: no loss is taken on one, in a VL sample's text or in an assistant turn of a chat."""
        return tuple(getattr(self, key) for key in VL_TOKEN_KEYS)


HF_VISION_KEYS = ("hidden_size", "intermediate_size", "depth", "num_heads", "out_hidden_size", "patch_size",
                   "temporal_patch_size", "spatial_merge_size", "in_channels", "num_position_embeddings",
                   "hidden_act")
VL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


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
