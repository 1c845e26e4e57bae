"""The vision-language model against transformers' Qwen3_5(Moe)ForConditionalGeneration in fp32 on CPU: one batch
with two images and a two-frame video of different sizes, text around them, through the Megatron forward and
through load_model's call (transformers' inputs)."""

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict
from megatron_qwen35.convert.table import MULTIMODAL_PREFIX
from megatron_qwen35.hf_reference import reference_model
from megatron_qwen35.inference import Qwen35CausalLM
from megatron_qwen35.layers.rotary import mrope_position_ids, token_types
from megatron_qwen35.provider import qwen35_gpt_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

LOGIT_TOL = 1e-4


def _pair(preset: str, seed: int = 0):
    cfg = qwen35_preset(preset).replace(mtp_num_layers=0)  # transformers has no MTP head to compare with
    hf = reference_model(cfg, seed)
    ours = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(ours, cfg, hf.state_dict(), hf_prefix=MULTIMODAL_PREFIX, expert_layout="packed",
                       include_mtp=False)
    return cfg, hf, ours


def vl_batch(cfg, seed: int = 1):
    """Row 0: text, a 4x6-patch image (6 tokens), text, a two-frame 4x6 video (two runs of 6, frames separated by
    text as Qwen3.5's timestamps separate them), text; row 1: text, a 6x8-patch image (12 tokens), text. Random
    text tokens below the special ids; random pixels."""
    v = cfg.vision
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, v.image_token_id - 8, (n,), generator=g).tolist()

    def span(token, n):
        return [v.vision_start_token_id, *[token] * n, v.vision_end_token_id]

    row0 = text(5) + span(v.image_token_id, 6) + text(4) + span(v.video_token_id, 6) + text(2) \
        + span(v.video_token_id, 6) + text(3)
    row1 = text(3) + span(v.image_token_id, 12)
    row1 += text(len(row0) - len(row1))
    images, videos = torch.tensor([[1, 4, 6], [1, 6, 8]]), torch.tensor([[2, 4, 6]])
    rows = lambda grids: int(grids.prod(-1).sum())  # noqa: E731 - patches before merging
    return dict(input_ids=torch.tensor([row0, row1]),
                pixel_values=torch.randn(rows(images), v.patch_dim, generator=g), image_grid_thw=images,
                pixel_values_videos=torch.randn(rows(videos), v.patch_dim, generator=g), video_grid_thw=videos)


def _transformers_logits(hf, cfg, batch):
    with torch.no_grad():
        return hf(**batch, mm_token_type_ids=token_types(batch["input_ids"], cfg.vision)).logits


@pytest.mark.parametrize("preset", ["tiny-vl", "tiny-vl-moe"])
def test_vl_logits_match_transformers(preset):
    """Megatron's forward (the training path: positions from the rope index, vision keyword inputs) and load_model's
    call both equal transformers: max |delta logit| <= 1e-4 and the same argmax everywhere."""
    cfg, hf, ours = _pair(preset)
    batch = vl_batch(cfg)
    ids = batch["input_ids"]
    want = _transformers_logits(hf, cfg, batch)
    positions = mrope_position_ids(ids, cfg.vision, batch["image_grid_thw"], batch["video_grid_thw"])
    vision = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        trained = ours(ids, positions, None, **vision)
    called = Qwen35CausalLM(ours, cfg)(**batch)
    for got in (trained, called):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= LOGIT_TOL
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_text_only_calls_of_a_vl_model_match_transformers():
    cfg, hf, ours = _pair("tiny-vl")
    ids = vl_batch(cfg)["input_ids"] % (cfg.vision.image_token_id - 8)  # no vision tokens
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    got = Qwen35CausalLM(ours, cfg)(ids)
    assert (got - want).abs().max().item() <= LOGIT_TOL


def test_the_vision_features_matter():
    """Guard on the test itself: other pixels give other logits at and after the image (so a tower that did
    nothing, or features placed nowhere, would fail the parity above)."""
    cfg, hf, ours = _pair("tiny-vl")
    batch = vl_batch(cfg)
    model = Qwen35CausalLM(ours, cfg)
    a = model(**batch)
    b = model(**{**batch, "pixel_values": batch["pixel_values"] + 1.0})
    assert (a - b).abs().max().item() > 100 * LOGIT_TOL


def test_pad_tokens_that_do_not_match_the_features_are_named():
    cfg, hf, ours = _pair("tiny-vl")
    batch = vl_batch(cfg)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][1, 4] = 7  # one image pad token fewer in row 1
    with pytest.raises(ValueError, match="needs 12 tokens"):
        Qwen35CausalLM(ours, cfg)(**batch)


@pytest.mark.parametrize("preset", ["tiny-vl", "tiny-vl-moe"])
def test_generation_with_images_equals_transformers(preset):
    """A left-padded batch of two prompts, each with an image of its own size: greedy `generate` gives
    transformers' `generate` tokens (its rope deltas: new tokens continue after each row's largest position)."""
    from megatron_qwen35.inference import generate, left_padded

    cfg, hf, ours = _pair(preset)
    v, g = cfg.vision, torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, v.image_token_id - 8, (n,), generator=g).tolist()  # noqa: E731
    span = lambda n: [v.vision_start_token_id, *[v.image_token_id] * n, v.vision_end_token_id]  # noqa: E731
    ids, mask = left_padded([text(3) + span(6) + text(2), text(5) + span(12) + text(4)])
    grids = torch.tensor([[1, 4, 6], [1, 6, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), v.patch_dim, generator=g)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids,
                           mm_token_type_ids=token_types(ids, v), max_new_tokens=8, do_sample=False)
    got = generate(Qwen35CausalLM(ours, cfg), ids, 8, attention_mask=mask, pixel_values=pixels,
                   image_grid_thw=grids)
    assert torch.equal(got, want)


def _mtp_and_decoder_inputs(model, ids, positions, vision, **kwargs):
    """(the MTP layer's embedding input, the decoder's input) of one training forward, both [s, b, h]."""
    seen = {}
    layer = model.mtp.layers[0]
    concat = layer._concat_embeddings

    def concat_seen(hidden_states, decoder_input):
        seen["mtp"] = decoder_input.detach().clone()
        return concat(hidden_states, decoder_input)

    layer._concat_embeddings = concat_seen
    def decoder_seen(module, args, kwargs):
        seen["decoder"] = kwargs["hidden_states"].detach().clone()

    hook = model.decoder.register_forward_pre_hook(decoder_seen, with_kwargs=True)
    try:
        model(ids, positions, None, labels=ids, **vision, **kwargs).sum().backward()
    finally:
        hook.remove()
        del layer._concat_embeddings
    return seen["mtp"], seen["decoder"]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_mtp_reads_the_placed_vision_features(packed):
    """At every position the MTP layer embeds the next token as the decoder input has it (vision features at the
    image and video pads, which the batch's next-token positions include), and the token id 0 megatron rolls in at
    each sequence's (or packed document's) end; its loss trains the tower."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = qwen35_preset("tiny-vl")
    torch.manual_seed(0)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").train()
    batch = vl_batch(cfg)
    ids = batch["input_ids"]
    positions = mrope_position_ids(ids, cfg.vision, batch["image_grid_thw"], batch["video_grid_thw"])
    vision = {k: v for k, v in batch.items() if k != "input_ids"}
    kwargs, ends = {}, [ids.shape[1] - 1]
    if packed:  # the two rows as two documents of one packed sequence
        ids, positions = ids.reshape(1, -1), positions.reshape(3, 1, -1)
        cu = torch.tensor([0, batch["input_ids"].shape[1], ids.shape[1]], dtype=torch.int32)
        kwargs["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                      cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                                                      max_seqlen_q=int(cu[1]), max_seqlen_kv=int(cu[1]))
        ends = (cu[1:] - 1).tolist()
    mtp, decoder = _mtp_and_decoder_inputs(model, ids, positions, vision, **kwargs)
    next_token = torch.roll(decoder, -1, dims=0)
    at_end = torch.zeros(ids.shape[1], dtype=torch.bool)
    at_end[ends] = True
    assert torch.equal(mtp[~at_end], next_token[~at_end])
    id0 = model.embedding(input_ids=torch.zeros_like(ids), position_ids=None).detach()
    assert torch.equal(mtp[at_end], id0[at_end])
    is_vision = (ids == cfg.vision.image_token_id) | (ids == cfg.vision.video_token_id)
    assert torch.roll(is_vision, -1, dims=1).sum() > 20  # the check above covers vision positions
    token = model.embedding(input_ids=torch.roll(ids, -1, dims=1), position_ids=None).detach()
    assert (mtp - token).abs().amax(-1)[torch.roll(is_vision, -1, dims=1).t()].min() > 1e-3  # not the pads' embedding
