"""The vision tower (layers/vision) against transformers' Qwen3_5VisionModel, in fp32 on CPU, and its conversion rules.

Inputs: one image (4 x 6 patches) and one two-frame video (6 x 4 patches) in one call, as transformers' processor
packs them; neither grid is square, so a swapped row / column shows, and both are resampled from the 8 x 8 table.
"""

import pytest
import torch

from megatron_qwen35.config import qwen35_config_to_hf, qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import (
    export_hf_vision_state_dict,
    load_hf_vision_state_dict,
    megatron_named_tensors,
)
from megatron_qwen35.convert.table import (
    MULTIMODAL_PREFIX,
    TEXT_ONLY_PREFIX,
    VISION_PREFIX,
    HFLayout,
    qwen35_rules,
    vision_rules,
)
from megatron_qwen35.hf_reference import randomize_
from megatron_qwen35.layers.vision.grid import patch_positions
from megatron_qwen35.layers.vision.model import Qwen35VisionModel

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOL = 1e-5  # fp32, relative to the largest entry: the two sides differ in summation order only (seen: ~1e-7)
GRID = torch.tensor([[1, 4, 6], [2, 6, 4]])  # (t, h, w) in patches: an image and a two-frame video


def reference_tower(cfg, seed: int = 0):
    """transformers' Qwen3_5VisionModel for cfg.vision, fp32, eval, every weight random: LayerNorm scales around 1
    and shifts away from 0 (a dropped bias shows), the patch features and the position table both of unit scale (so
    a wrong resampling shows against the patches)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionConfig, Qwen3_5VisionModel

    hf_config = qwen35_config_to_hf(cfg)["vision_config"]
    hf_config.pop("model_type")
    torch.manual_seed(seed)
    model = randomize_(Qwen3_5VisionModel(Qwen3_5VisionConfig(**hf_config)).float().eval(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
        conv = model.patch_embed.proj.weight
        conv.copy_(torch.randn(conv.shape, generator=g) / conv[0].numel() ** 0.5)
        model.pos_embed.weight.copy_(torch.randn(model.pos_embed.weight.shape, generator=g))
    return model


def _tower(cfg, *, tensor_parallel: int = 1):
    config = qwen35_transformer_config(cfg, params_dtype=torch.float32, tensor_model_parallel_size=tensor_parallel)
    return Qwen35VisionModel(cfg.vision, config, backend="local").eval()


def _pair(seed: int = 0):
    cfg = qwen35_preset("tiny-vl")
    hf = reference_tower(cfg, seed)
    ours = _tower(cfg)
    load_hf_vision_state_dict(ours, cfg, hf.state_dict())
    return cfg, hf, ours


def _pixels(cfg, grid=GRID, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=g)


def _max_rel_err(got, want) -> float:
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def test_every_block_and_the_merged_output_match_transformers():
    """Each block's output and the merged tokens (pooler_output) equal transformers' within 1e-5 of their scale."""
    cfg, hf, ours = _pair()
    pixels = _pixels(cfg)
    got, want = [], []
    for layer in ours.decoder.layers:
        layer.register_forward_hook(lambda m, i, o: got.append(o[0].squeeze(1)))  # [N, 1, H] -> [N, H]
    for block in hf.blocks:
        block.register_forward_hook(lambda m, i, o: want.append(o))
    with torch.no_grad():
        merged = ours(pixels, GRID)
        reference = hf(pixels, grid_thw=GRID).pooler_output
    assert len(got) == len(want) == cfg.vision.depth
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert _max_rel_err(a, b) <= TOL, f"block {i}: {_max_rel_err(a, b)}"
    assert merged.shape == reference.shape == (int(GRID.prod(-1).sum()) // 4, cfg.vision.out_hidden_size)
    assert _max_rel_err(merged, reference) <= TOL


@pytest.mark.parametrize("grid", [GRID, torch.tensor([[1, 10, 12], [1, 2, 16]])], ids=["downsampled", "upsampled"])
def test_resampled_position_table_is_transformers_bit_for_bit(grid):
    """The 8 x 8 table resampled to each grid (smaller and larger than the table, not square), in merge-block
    order: the same taps, weights and sums as transformers' get_vision_interpolation_indices_and_weights."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    _, hf, ours = _pair()
    taps, weights = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=hf.num_grid_per_side,
                                                                  mode="bilinear", align_corners=True,
                                                                  spatial_merge_size=2)
    with torch.no_grad():
        want = (hf.pos_embed(taps) * weights[:, :, None]).sum(1)
        got = ours.pos_embed(patch_positions(grid, 2, device=torch.device("cpu")))
    assert torch.equal(got, want)


def test_images_in_one_call_equal_each_alone():
    """Attention stays inside each frame: the image's and the video's tokens are those each gives alone."""
    cfg, _, ours = _pair()
    pixels = _pixels(cfg)
    with torch.no_grad():
        together = ours(pixels, GRID)
        image = ours(pixels[:24], GRID[:1])
        video = ours(pixels[24:], GRID[1:])
    assert _max_rel_err(together, torch.cat([image, video])) <= TOL


def _error_with(monkeypatch_fn) -> float:
    cfg, hf, ours = _pair()
    pixels = _pixels(cfg)
    monkeypatch_fn(ours, hf)
    with torch.no_grad():
        return _max_rel_err(ours(pixels, GRID), hf(pixels, grid_thw=GRID).pooler_output)


def test_a_qkv_loaded_in_transformers_order_would_show():
    """Guard on the parity test: HF's qkv rows ([q | k | v] over all heads) copied without the per-head regrouping
    break it."""
    def verbatim_qkv(ours, hf):
        with torch.no_grad():
            for layer, block in zip(ours.decoder.layers, hf.blocks, strict=True):
                layer.self_attention.linear_qkv.weight.copy_(block.attn.qkv.weight)
                layer.self_attention.linear_qkv.bias.copy_(block.attn.qkv.bias)
    assert _error_with(verbatim_qkv) > 100 * TOL


def test_a_rope_with_rows_and_columns_swapped_would_show(monkeypatch):
    """Guard on the parity test: rotating the first quarter by the column and the second by the row breaks it."""
    from megatron_qwen35.layers.vision.rotary import Qwen35VisionRotaryEmbedding

    forward = Qwen35VisionRotaryEmbedding.forward
    monkeypatch.setattr(Qwen35VisionRotaryEmbedding, "forward", lambda self, rows, cols: forward(self, cols, rows))
    assert _error_with(lambda ours, hf: None) > 100 * TOL


def test_rules_name_every_tensor_and_round_trip_bit_for_bit():
    """The vision rules cover transformers' state dict and the tower's tensors exactly, and HF -> Megatron -> HF
    gives every tensor back bit for bit (under its own names and under the VL wrapper's `model.visual.`)."""
    cfg, hf, ours = _pair()
    want = hf.state_dict()
    rules = vision_rules(cfg, hf_prefix="", megatron_prefix="")
    assert {n for r in rules for n in r.hf} == set(want)
    assert {n for r in rules for n in r.megatron} == set(megatron_named_tensors(ours))
    back = export_hf_vision_state_dict(ours, cfg)
    assert set(back) == set(want)
    for name, tensor in want.items():
        assert torch.equal(back[name], tensor), name
    prefixed = {VISION_PREFIX + k: v for k, v in want.items()}
    reloaded = _tower(cfg)
    load_hf_vision_state_dict(reloaded, cfg, prefixed)
    back = export_hf_vision_state_dict(reloaded, cfg, hf_prefix=VISION_PREFIX)
    assert set(back) == set(prefixed) and all(torch.equal(back[k], v) for k, v in prefixed.items())


def test_the_multimodal_table_holds_the_tower_and_the_text_only_table_does_not():
    """qwen35_rules / HFLayout.rules of a VL model map `model.visual.*` to `vision_model.*` under the VL wrapper's
    prefix, and a text-only checkpoint's names hold no tower."""
    cfg = qwen35_preset("tiny-vl")
    tower = vision_rules(cfg)
    multimodal = qwen35_rules(cfg, hf_prefix=MULTIMODAL_PREFIX)
    assert multimodal[-len(tower):] == tower
    assert all(r.megatron[0].startswith("vision_model.") and r.hf[0].startswith(VISION_PREFIX) for r in tower)
    assert len(tower) == 3 + 12 * cfg.vision.depth + 6
    layout_rules = HFLayout(prefix=MULTIMODAL_PREFIX).rules(cfg)  # the decoder's, the tower's, then MTP's
    assert all(r in layout_rules for r in tower)
    text_only = qwen35_rules(cfg, hf_prefix=TEXT_ONLY_PREFIX)
    assert not any(r.megatron[0].startswith("vision_model.") for r in text_only)
    assert len(multimodal) == len(text_only) + len(tower)


def test_a_stray_or_missing_tower_tensor_is_named():
    """Loading checks names both ways: an unknown tensor and a missing one are each named."""
    cfg, hf, ours = _pair()
    state = dict(hf.state_dict())
    with pytest.raises(KeyError, match="blocks.0.attn.extra"):
        load_hf_vision_state_dict(ours, cfg, {**state, "blocks.0.attn.extra": torch.zeros(1)})
    del state["merger.norm.bias"]
    with pytest.raises(KeyError, match="merger.norm.bias"):
        load_hf_vision_state_dict(ours, cfg, state)


def test_a_grid_the_merger_cannot_tile_is_named():
    cfg, _, ours = _pair()
    grid = torch.tensor([[1, 4, 5]])
    with pytest.raises(ValueError, match=r"grid_thw\[0\] = \[1, 4, 5\]"):
        ours(torch.zeros(20, cfg.vision.patch_dim), grid)
