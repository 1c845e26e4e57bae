"""Rotary position settings for GPTModel: the one place that chooses Qwen3.5's rope.

Qwen3.5 rotates the first `partial_rotary_factor` (25%) of each 256-dim head with theta 1e7, using interleaved
mRoPE sections [11, 11, 10] over (temporal, height, width) positions. For text all three position streams are the
same token index, so interleaved mRoPE reduces exactly to 1-D rope with rotate-half on those 64 dims, which is
megatron-core's `rope`. Vision inputs will need true mRoPE: that change belongs here.
"""

from megatron_qwen35.config import Qwen35Config


def qwen35_position_embedding_kwargs(cfg: Qwen35Config) -> dict:
    """GPTModel keyword arguments for the text model's positions."""
    return dict(
        position_embedding_type="rope",
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=int(cfg.rope_theta),
    )
