"""Qwen3.5's vision tower as megatron-core modules (transformers' `Qwen3_5VisionModel`), one concept per file:

- `model.py`: `Qwen35VisionModel`, patch embedding + resampled positions -> megatron TransformerBlock (2-D rope,
  attention within each frame) -> merger
- `transformer_config.py`: `vision_transformer_config`, the tower's TransformerConfig (TP and precision only from the
  language model's)
- `grid.py`: where each patch sits (the processor's merge-block order); the frames that attention keeps to
- `patch_embed.py`: `Qwen35VisionPatchEmbed`, the Conv3d over C x T x P x P patches
- `position_embedding.py`: `Qwen35VisionPositionEmbedding`, the learned square table resampled to each grid
- `rotary.py`: `Qwen35VisionRotaryEmbedding`, axial 2-D rope angles in megatron's freqs layout
- `merger.py`: `Qwen35VisionPatchMerger`, LayerNorm, m x m patches joined, column / row parallel MLP
- `norms.py`: the local backend's LayerNorms in Transformer Engine's checkpoint layout

The block's ModuleSpec is in `specs/vision_specs.py`; the conversion rules are `convert/table.py`'s `vision_rules`.
The package imports none of its modules: `specs/vision_specs.py` takes the norms from here and `model.py` the spec
from there, so an eager import would be circular for whoever imports the spec first.
"""
