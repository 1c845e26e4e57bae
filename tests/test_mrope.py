"""Qwen3.5's interleaved mRoPE against transformers: the rope index of mixed text / image / video rows, and the
rotary angles of `InterleavedMRoPE` against `Qwen3_5TextRotaryEmbedding`, for any `mrope_section`."""

import types

import pytest
import torch

from megatron_qwen35.config import qwen35_preset
from megatron_qwen35.hf_reference import modeling, reference_config
from megatron_qwen35.layers.rotary import InterleavedMRoPE, frequency_axes, mrope_position_ids, token_types

VISION = qwen35_preset("tiny-vl").vision
IMG, VID, START, END = (VISION.image_token_id, VISION.video_token_id, VISION.vision_start_token_id,
                        VISION.vision_end_token_id)


def _transformers_rope_index(ids, image_grid_thw, video_grid_thw, attention_mask=None):
    """transformers' Qwen3_5Model.get_rope_index, on the token types its processor writes."""
    model_class = modeling(False).Qwen3_5Model
    owner = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=VISION.spatial_merge_size)))
    owner.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, owner)
    video = None if video_grid_thw is None else video_grid_thw.clone()  # transformers edits it in place
    positions, _ = model_class.get_rope_index(owner, ids, token_types(ids, VISION), image_grid_thw, video,
                                              attention_mask)
    return positions


def _mixed_batch():
    """Row 0: text, a 4x6 image (6 tokens), a two-frame 4x6 video (two runs of 6: frames are separated by text),
    text; row 1 left-padded: a 6x8 image (12 tokens) between text."""
    row0 = [1, 2, 3, START, *[IMG] * 6, END, 4, 5, START, *[VID] * 6, END, 7, START, *[VID] * 6, END, 9]
    row1 = [0, 0, 11, START, *[IMG] * 12, END, 12, 13, 14]
    row1 += [15] * (len(row0) - len(row1))
    ids = torch.tensor([row0, row1])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask, torch.tensor([[1, 4, 6], [1, 6, 8]]), torch.tensor([[2, 4, 6]])


def test_rope_index_equals_transformers_on_a_mixed_left_padded_batch():
    ids, mask, images, videos = _mixed_batch()
    got = mrope_position_ids(ids, VISION, images, videos, mask)
    assert torch.equal(got, _transformers_rope_index(ids, images, videos, mask))
    assert got[1, 0, 4:10].tolist() == [4, 4, 4, 5, 5, 5]  # the image's rows: height stream of the first image
    assert torch.equal(mrope_position_ids(ids[0], VISION, images[:1], videos), got[:, 0])  # one row, [3, s]


def test_text_only_positions_count_tokens():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(mrope_position_ids(ids, VISION), torch.arange(4).expand(3, 1, 4))


@pytest.mark.parametrize("change, message", [
    (dict(images=torch.tensor([[1, 4, 6]])), "only 1 image grids"),
    (dict(images=torch.tensor([[1, 4, 6], [1, 4, 8]])), "needs 8 tokens"),
    (dict(videos=torch.tensor([[3, 4, 6]])), "3 video frame grids were given"),
])
def test_grids_that_do_not_fit_the_tokens_are_named(change, message):
    ids, mask, images, videos = _mixed_batch()
    args = {"images": images, "videos": videos, **change}
    with pytest.raises(ValueError, match=message):
        mrope_position_ids(ids, VISION, args["images"], args["videos"], mask)


@pytest.mark.parametrize("sections", [(2, 1, 1), (11, 11, 10), (1, 3, 0)])
def test_rotary_angles_equal_transformers(sections):
    """cos / sin of our angles equal transformers' text rotary embedding for 3-stream positions, bitwise in fp32;
    any section split (transformers' slices clip to the dims that exist)."""
    cfg = qwen35_preset("tiny-vl").replace(mrope_section=sections)
    rotary = modeling(False).Qwen3_5TextRotaryEmbedding(reference_config(cfg).text_config)
    ids, mask, images, videos = _mixed_batch()
    positions = mrope_position_ids(ids, VISION, images, videos, mask)
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, rotary dim]
    angles = InterleavedMRoPE(cfg)(positions)  # [s, b, 1, rotary dim]
    got = angles[:, :, 0].transpose(0, 1)
    assert torch.equal(got.cos(), want_cos) and torch.equal(got.sin(), want_sin)


@pytest.mark.usefixtures("megatron_single_process")  # megatron's rope table on CPU (the runtime register)
def test_text_positions_give_plain_rope():
    """With one position per token on all three streams, the angles are 1-D rope's (megatron's `rope` table)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cfg = qwen35_preset("tiny-vl")
    table = RotaryEmbedding(cfg.head_dim, cfg.partial_rotary_factor, rotary_base=int(cfg.rope_theta),
                            use_cpu_initialization=True).get_emb(9)  # [9, 1, 1, d]
    angles = InterleavedMRoPE(cfg)(torch.arange(9).unsqueeze(0))
    assert torch.equal(angles, table)


def test_frequency_axes_interleave():
    cfg = qwen35_preset("9b")  # 32 frequencies, sections [11, 11, 10]
    axes = frequency_axes(cfg).tolist()
    assert axes[:6] == [0, 1, 2, 0, 1, 2] and axes[30:] == [0, 1] and axes.count(2) == 10 and axes.count(1) == 11
