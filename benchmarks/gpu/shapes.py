"""The sizes each check runs at: real head sizes on a GPU, small ones for Triton's interpreter on two CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

from .environment import DEVICE


@dataclass(frozen=True)
class Shapes:
    """One machine's sizes (GPU or CPU below); SHAPES is the one this run uses."""

    tokens: int  # per kernel call in fla_vs_torch (plain: per sequence, 2 sequences)
    documents: tuple[int, ...]  # cu_seqlens of the packed call: no document a multiple of 64 tokens
    key_heads: int
    value_heads: int  # 2 value heads per key head, as every Qwen3.5 preset has
    head_dim: int
    model_tokens: int  # per sequence in bf16_forward and te_vs_local (batch 2)
    bf16_presets: tuple[str, ...]  # models of bf16_forward
    vl_preset: str  # the model of vision
    images: tuple[tuple[int, int, int], ...]  # vision's image grids (t, h, w in patches), one per batch row
    video: tuple[int, int, int]  # vision's video grid, in row 0 after its image


GPU = Shapes(tokens=2048, documents=(0, 700, 1500, 2048), key_heads=16, value_heads=32, head_dim=128,
             model_tokens=1024, bf16_presets=("tiny-moe", "9b-2layers"), vl_preset="tiny-vl-27b-vit",
             images=((1, 32, 48), (1, 64, 40)), video=(2, 32, 32))  # 1536, 2560 and 2048 patches
CPU = Shapes(tokens=128, documents=(0, 45, 110, 128), key_heads=2, value_heads=4, head_dim=16,
             model_tokens=128, bf16_presets=("tiny-moe",), vl_preset="tiny-vl",
             images=((1, 4, 6), (1, 6, 8)), video=(2, 4, 6))
SHAPES = CPU if DEVICE.type == "cpu" else GPU
