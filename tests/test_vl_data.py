"""The vision-language data pipeline: the processor against transformers' Qwen3VLProcessor, the preprocessing tool's
output and its refusals, the fixed-shape dataset and the unpadding of a collated batch, the embedded demo set."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_qwen35.config import qwen35_preset
from megatron_qwen35.data.tokenizer import qwen35_tokenizer_for
from megatron_qwen35.data.vl_processor import Qwen35VLProcessor

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "vl"
SMALL = dict(image_pixels=(1024, 16384), video_pixels=(4096, 65536))  # the demo's limits: 48-128 px stay small
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _tool(name):
    sys.path.insert(0, str(REPO / "tools" / "data"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _noise(width, height, seed):
    """An image of random pixels: every resampling difference shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_processor(tmp_path, cfg, tokenizer, image_pixels, video_pixels):
    """transformers' Qwen3VLProcessor with the image / video processors AutoImageProcessor / AutoVideoProcessor load
    from Qwen3.5's released preprocessor configs (their pixel limits replaced), around our tokenizer."""
    from transformers import AutoImageProcessor, AutoVideoProcessor, BatchEncoding, PreTrainedTokenizerBase
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    v = cfg.vision
    common = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
              "merge_size": v.spatial_merge_size, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "Qwen2VLImageProcessorFast",
         "size": {"shortest_edge": image_pixels[0], "longest_edge": image_pixels[1]}}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "min_frames": 4, "max_frames": 768,
         "do_sample_frames": True, "size": {"shortest_edge": video_pixels[0], "longest_edge": video_pixels[1]}}))

    class ProcessorTokenizer(PreTrainedTokenizerBase):
        """Our tokenizer behind what Qwen3VLProcessor calls: __call__, convert_tokens_to_ids, init_kwargs."""

        def __init__(self):  # not the base's: it sets up a vocabulary, and this wrapper has none
            self.init_kwargs = {}

        def __call__(self, text, **kwargs):
            return BatchEncoding({"input_ids": [tokenizer.encode(t) for t in text]})

        def convert_tokens_to_ids(self, token):
            (i,) = tokenizer.encode(token)
            return i

    return Qwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(tmp_path),
                            tokenizer=ProcessorTokenizer(),
                            video_processor=AutoVideoProcessor.from_pretrained(tmp_path))


@pytest.mark.parametrize("preset, pixels", [("tiny-vl", SMALL), ("tiny-vl-demo", {})])
def test_processor_equals_transformers_qwen3vl_processor(tmp_path, preset, pixels):
    """Two images and two videos of different sizes (an odd frame count, another frame rate): input_ids, pixel
    values and grids equal transformers' Qwen3VLProcessor's exactly (the same processors and tokenizer: bitwise);
    for the real vocabulary with the released pixel limits (images upscaled to >= 256x256)."""
    cfg = qwen35_preset(preset)
    tokenizer = qwen35_tokenizer_for(cfg)
    ours = Qwen35VLProcessor(cfg.vision, tokenizer, **pixels)
    image_pixels = pixels.get("image_pixels", (65536, 16777216))
    video_pixels = pixels.get("video_pixels", (4096, 25165824))
    reference = _reference_processor(tmp_path, cfg, tokenizer, image_pixels, video_pixels)
    assert type(reference.image_processor).__name__ == "Qwen2VLImageProcessor"  # the torchvision backend
    images = [_noise(100, 70, 0), _noise(61, 150, 1)]
    videos = [[_noise(80, 64, 10 + k) for k in range(5)], [_noise(48, 112, 20 + k) for k in range(2)]]
    fps = [2.0, 0.7]
    got = ours("Look: <image> and <image>, then <video> and <video> end.", images, videos, fps)
    want = reference(
        text="Look: <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>, "
             "then <|vision_start|><|video_pad|><|vision_end|> and <|vision_start|><|video_pad|><|vision_end|> end.",
        images=images, videos=videos, do_sample_frames=False, return_tensors="pt",
        video_metadata=[{"total_num_frames": len(v), "fps": f, "frames_indices": list(range(len(v)))}
                        for v, f in zip(videos, fps, strict=True)])
    assert got["input_ids"][-1] == tokenizer.eod_id
    assert got["input_ids"][:-1].tolist() == want["input_ids"][0].tolist()
    for key in VISION_KEYS:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert got["image_grid_thw"].tolist() != [[1, 0, 0]] * 2 and got["video_grid_thw"][0, 0] == 3  # 5 frames -> 3
    text = tokenizer.decode(got["input_ids"].tolist())
    assert all(f"<{t} seconds>" in text for t in ("0.2", "1.2", "2.0", "0.7"))  # (0 + 0.5) / 2 = 0.25 -> 0.2


def test_byte_tokenizer_keeps_special_ids():
    """The tiny presets' byte tokenizer: bytes below 256, end of document 256, the vision tokens at the preset's ids,
    and decode inverts encode."""
    cfg = qwen35_preset("tiny-vl")
    tok = qwen35_tokenizer_for(cfg)
    text = "héllo <|vision_start|><|image_pad|><|vision_end|> x<|video_pad|><|endoftext|>"
    ids = tok.encode(text)
    v = cfg.vision
    assert [i for i in ids if i >= 256] == [v.vision_start_token_id, v.image_token_id, v.vision_end_token_id,
                                            v.video_token_id, 256]
    assert tok.decode(ids) == text and max(ids) < cfg.vocab_size


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """data/vl preprocessed for tiny-vl with the demo's small pixel limits."""
    from megatron_qwen35.data.preprocess_vl import qwen35_preprocess_vl

    out = tmp_path_factory.mktemp("vl") / "demo"
    qwen35_preprocess_vl([DEMO / "captions.jsonl"], out, qwen35_preset("tiny-vl"), **SMALL)
    return out


def test_preprocessed_samples_equal_the_processor(demo_dir):
    """Each stored sample is the processor's output for its jsonl line, bitwise (tokens stored as int32)."""
    from megatron_qwen35.data.preprocess_vl import _open_image
    from megatron_qwen35.data.vl_dataset import Qwen35VLSamples

    cfg = qwen35_preset("tiny-vl")
    processor = Qwen35VLProcessor(cfg.vision, qwen35_tokenizer_for(cfg), **SMALL)
    samples = Qwen35VLSamples(demo_dir)
    lines = (DEMO / "captions.jsonl").read_text().splitlines()
    assert len(samples) == len(lines) == 24
    for i in (0, 18, 21, 23):  # one image, two images, a video, an image and a video
        obj = json.loads(lines[i])
        images = [_open_image(DEMO / p, "", "") for p in obj.get("images", [])]
        videos = [[_open_image(DEMO / p, "", "") for p in v] for v in obj.get("videos", [])]
        want = processor(obj["text"], images, videos)
        got = samples[i]
        assert torch.equal(got["tokens"], want["input_ids"])
        for key in VISION_KEYS:
            assert torch.equal(got[key], want[key]), (i, key)
        assert samples.where(i).endswith(f"captions.jsonl:{i + 1})")


def test_preprocess_with_workers_writes_the_same(demo_dir, tmp_path):
    """Two worker processes write the same arrays as one."""
    from safetensors.torch import load_file

    from megatron_qwen35.data.preprocess_vl import qwen35_preprocess_vl

    qwen35_preprocess_vl([DEMO / "captions.jsonl"], tmp_path / "w2", qwen35_preset("tiny-vl"), workers=2, **SMALL)
    one, two = (load_file(d / "shard_00000.safetensors") for d in (demo_dir, tmp_path / "w2"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def _bad_inputs(tmp_path):
    """(name, jsonl lines, the bad line's number, words the message must hold)."""
    (tmp_path / "ok.png").write_bytes((DEMO / "images" / "00_red_circle.png").read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = json.dumps({"text": "<image>a red circle", "images": ["ok.png"]})
    return [
        ("bad json", [good, '{"text": "<image>", "images": ["ok.png"]'], 2, "not valid JSON"),
        ("text not a string", [good, good, json.dumps({"text": ["a"], "images": []})], 3, "not a string"),
        ("missing image", [json.dumps({"text": "<image>", "images": ["nope.png"]})], 1, "'nope.png' does not exist"),
        ("too few placeholders", [good, json.dumps({"text": "two", "images": ["ok.png"]})], 2,
         "0 <image> placeholders for 1 images"),
        ("too many videos", [json.dumps({"text": "<video>", "videos": [["ok.png", "ok.png"], ["ok.png"]]})], 1,
         "1 <video> placeholders for 2 videos"),
        ("unreadable image", [good, json.dumps({"text": "<image>", "images": ["broken.png"]})], 2,
         "'broken.png' is not a readable image"),
        ("vision token in text", [json.dumps({"text": "<|image_pad|>"})], 1, "holds the vision token"),
        ("one-frame video", [good, json.dumps({"text": "<video>", "videos": [["ok.png"]]})], 2,
         "video 0 has 1 frame(s)"),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_is_one_error_line_naming_file_and_line(tmp_path, capsys, workers):
    """Each kind of bad input: exit code 2, one `error:` line with file:line and the reason, no output directory
    and no temporary left beside it."""
    tool = _tool("preprocess_vl")
    for name, lines, bad_line, words in _bad_inputs(tmp_path):
        jsonl = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        jsonl.write_text("\n".join(lines) + "\n")
        out = tmp_path / "out" / name.replace(" ", "_")
        rc = tool.main(["--input", str(jsonl), "--output-dir", str(out), "--qwen35-preset", "tiny-vl",
                        "--image-pixels", "1024", "16384", "--workers", str(workers)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2, name
        assert len(err) == 1 and f"{jsonl}:{bad_line}:" in err[0] and words in err[0], (name, err)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), name


def _dataset(demo_dir, seq_length, indices=None, **limits):
    from megatron_qwen35.data.vl_dataset import LIMITS, Qwen35VLDataset, Qwen35VLSamples

    samples = Qwen35VLSamples(demo_dir)
    limits = {**{k: samples.index["max"][k] for k in LIMITS}, **limits}
    indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
    return Qwen35VLDataset(samples, indices, seq_length, len(indices), limits=limits,
                           vision=qwen35_preset("tiny-vl").vision)


def test_dataset_slots_have_fixed_shapes_masks_and_positions(demo_dir):
    """Every slot: the documented shapes; tokens / labels the sample shifted by one, then padding; loss mask 0 at
    vision labels and padding; positions equal mrope_position_ids of the padded row with its attention mask."""
    from megatron_qwen35.layers.rotary import mrope_position_ids

    S = 256
    ds = _dataset(demo_dir, S)
    v, D = ds.vision, ds.samples.patch_dim
    vision_ids = [v.image_token_id, v.video_token_id, v.vision_start_token_id, v.vision_end_token_id]
    for i in range(len(ds.samples)):
        slot, raw = ds.slot(i), ds.samples[i]
        assert {k: tuple(t.shape) for k, t in slot.items()} == {
            "tokens": (S,), "labels": (S,), "loss_mask": (S,), "position_ids": (3, S),
            "pixel_values": (64, D), "image_grid_thw": (2, 3), "pixel_values_videos": (48, D), "video_grid_thw": (1, 3)}
        n = len(raw["tokens"]) - 1
        assert torch.equal(slot["tokens"][:n], raw["tokens"][:-1])
        assert torch.equal(slot["labels"][:n], raw["tokens"][1:])
        assert (slot["tokens"][n:] == 256).all() and (slot["labels"][n:] == 256).all()
        want_mask = torch.tensor([0.0 if int(t) in vision_ids else 1.0 for t in raw["tokens"][1:]])
        assert torch.equal(slot["loss_mask"][:n], want_mask) and not slot["loss_mask"][n:].any()
        attention = (torch.arange(S) < n).long()
        want = mrope_position_ids(slot["tokens"][None], v, raw["image_grid_thw"], raw["video_grid_thw"],
                                  attention[None])[:, 0]
        assert torch.equal(slot["position_ids"], want)
        for key in VISION_KEYS:
            rows = len(raw[key])
            assert torch.equal(slot[key][:rows], raw[key]) and not slot[key][rows:].any(), (i, key)
    assert ds.slot(23)["loss_mask"].sum() < ds.slot(23)["tokens"].ne(256).sum()  # vision labels are masked


def test_unpad_of_a_collated_batch_is_the_samples_concatenated(demo_dir):
    """A collated batch of two slots (two images and no video; one image and a video) unpads to the samples' images
    and videos concatenated in batch order; a modality absent from the batch is None. Its shapes and dtypes are
    what qwen35_vl_batch_shapes says from the index alone."""
    from megatron_qwen35.data.vl_dataset import qwen35_vl_batch_shapes, qwen35_vl_unpad

    ds = _dataset(demo_dir, 256)
    batch = torch.utils.data.default_collate([ds.slot(18), ds.slot(23)])
    assert batch["pixel_values"].shape == (2, 64, ds.samples.patch_dim)
    pixels, grids, video_pixels, video_grids = qwen35_vl_unpad(batch)
    a, b = ds.samples[18], ds.samples[23]
    assert torch.equal(pixels, torch.cat([a["pixel_values"], b["pixel_values"]]))
    assert torch.equal(grids, torch.cat([a["image_grid_thw"], b["image_grid_thw"]])) and len(grids) == 3
    assert torch.equal(video_pixels, b["pixel_values_videos"]) and torch.equal(video_grids, b["video_grid_thw"])
    shapes = qwen35_vl_batch_shapes(demo_dir, 256, 2)
    assert {k: (tuple(t.shape), t.dtype) for k, t in batch.items()} == shapes
    images_only = torch.utils.data.default_collate([ds.slot(0), ds.slot(18)])
    assert qwen35_vl_unpad(images_only)[2:] == (None, None)


def test_long_samples_cut_only_text_and_oversized_samples_name_themselves(demo_dir):
    """A sequence shorter than a sample keeps its vision tokens and cuts the text after them; a sample whose vision
    tokens reach past the sequence, or whose vision rows exceed the slot's limits, is an error naming its file and
    line when the dataset is built."""
    ds = _dataset(demo_dir, 64, indices=range(23))  # sample 23's video ends at token 142
    raw, slot = ds.samples[0], ds.slot(0)  # 82 tokens, its image's tokens 0-5
    assert torch.equal(slot["tokens"], raw["tokens"][:64]) and torch.equal(slot["labels"], raw["tokens"][1:65])
    assert slot["loss_mask"][6:].all() and slot["position_ids"][0, -1] == 63 - 2  # 4 pads (2x2) take 2 positions
    with pytest.raises(ValueError, match=r"sample 23 \(.*captions.jsonl:24\) has vision tokens up to position 141"):
        _dataset(demo_dir, 128)
    with pytest.raises(ValueError, match=r"sample 18 \(.*captions.jsonl:19\) has 2 images, more than the 1"):
        _dataset(demo_dir, 256, images=1)


def test_build_vl_datasets_splits_wraps_and_checks_the_model(demo_dir):
    """Megatron's --split bookends, each dataset as long as asked (wrapping around, a new seeded order each epoch,
    the same on every call), None where none is asked or the split gives none, batched by a DataLoader worker; a
    model with other vision ids is refused."""
    import dataclasses

    from megatron_qwen35.data.vl_dataset import build_vl_datasets

    vision = qwen35_preset("tiny-vl").vision
    train, valid, test = build_vl_datasets(demo_dir, 256, [50, 5, 0], vision=vision, split="75,25,0")
    assert test is None and (len(train), len(valid)) == (50, 5)
    # evaluation on: megatron asks for test samples too, which a split of no test share leaves without a dataset
    assert build_vl_datasets(demo_dir, 256, [50, 5, 5], vision=vision, split="75,25,0")[2] is None
    assert list(train.indices) == list(range(18)) and list(valid.indices) == list(range(18, 24))
    first = [int(train[i]["tokens"][1]) for i in range(36)]
    again = build_vl_datasets(demo_dir, 256, [50, 5, 0], vision=vision, split="75,25,0")[0]
    assert first == [int(again[i]["tokens"][1]) for i in range(36)]
    epochs = [sorted(train.indices[train._order(e)].tolist()) for e in (0, 1)]
    assert epochs[0] == epochs[1] == list(range(18)) and (train._order(0) != train._order(1)).any()
    assert train[0]["pixel_values"].shape == valid[0]["pixel_values"].shape  # shared limits
    loaded = next(iter(torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)))  # pickled into a worker
    assert torch.equal(loaded["tokens"], torch.stack([train[i]["tokens"] for i in range(4)]))
    other = dataclasses.replace(vision, image_token_id=500)
    with pytest.raises(ValueError, match="image_token_id"):
        build_vl_datasets(demo_dir, 256, [1, 0, 0], vision=other)


def test_demo_set_is_what_the_script_draws(tmp_path):
    """tools/data/make_vl_demo.py regenerates data/vl: the same files, the same captions byte for byte, the same
    pixels; and the set stays small."""
    _tool("make_vl_demo").make_demo(tmp_path)
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file() and p.name != "README.md")
    assert ours == committed
    assert (tmp_path / "captions.jsonl").read_bytes() == (DEMO / "captions.jsonl").read_bytes()
    for name in ours:
        if name.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(DEMO / name))), name
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 300_000
