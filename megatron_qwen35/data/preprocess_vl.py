"""Vision-language samples (jsonl + image files) -> a dataset directory of safetensors shards, offline.

Input, one JSON object per line (paths relative to the jsonl file's folder, or to --media-dir, none leaving it;
"images" / "videos" may be left out when empty, other keys are ignored):

    {"text": "A red square <image> beside a video <video>", "images": ["img/a.png"],
     "videos": [["vid/f0.png", "vid/f1.png"]]}

A video is its frames in order, already sampled: a list of files, or {"frames": [...], "fps": 1.0} when they were
sampled at another rate than 2 per second (the timestamps the processor writes come from it). `<image>` and
`<video>` mark where each goes (megatron_qwen35/data/vl_processor.py: the convention and the processor).

Output directory (it appears only when complete: written as a hidden sibling and renamed at the end, as the
checkpoint converters do):

    index.json              format, the vision config and tokenizer it was made for, the processor's pixel limits,
                            the input files, the shards, and each per-sample maximum (tokens, patches, images, ...)
    shard_00000.safetensors a run of samples, each array concatenated over them with per-sample offsets:
        tokens int32 [T], token_offsets int64 [n + 1]                  (input_ids, ending with end-of-document)
        pixel_values float32 [P, patch_dim], pixel_offsets [n + 1]         (the processor's rows)
        image_grid_thw int64 [I, 3], image_offsets [n + 1]
        pixel_values_videos float32 [Pv, patch_dim], video_pixel_offsets [n + 1]
        video_grid_thw int64 [V, 3], video_offsets [n + 1]
        vision_extent int64 [n]   (index after a sample's last vision token, 0 without one: how far it may be cut)
        source int64 [n, 2]       (input file number in index.json, line number)
Sample k of a shard is tokens[token_offsets[k]:token_offsets[k + 1]], and so on.

Bad input is a ValueError naming the file and line (not JSON, a field of the wrong type, a placeholder count that
is not the number of images / videos, a missing or unreadable image).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.output_dir import output_directory, write_file
from megatron_qwen35.data.preprocess import check_inputs, json_object, numbered_lines
from megatron_qwen35.data.tokenizer import VISION_TOKENS, qwen35_tokenizer_for
from megatron_qwen35.data.vl_processor import (
    QWEN35_IMAGE_PIXELS,
    QWEN35_VIDEO_FPS,
    QWEN35_VIDEO_PIXELS,
    Qwen35VLProcessor,
    check_placeholders,
)
from megatron_qwen35.file_names import media_file

FORMAT = "qwen35-vl-samples/1"
INDEX = "index.json"
# the vision fields a dataset is tied to (the model that reads it must have the same)
VISION_FIELDS = ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "image_token_id",
                 "video_token_id", "vision_start_token_id", "vision_end_token_id")
# name in the shard -> (its offsets' name, the processor's key)
ARRAYS = {"tokens": ("token_offsets", "input_ids"), "pixel_values": ("pixel_offsets", "pixel_values"),
          "image_grid_thw": ("image_offsets", "image_grid_thw"),
          "pixel_values_videos": ("video_pixel_offsets", "pixel_values_videos"),
          "video_grid_thw": ("video_offsets", "video_grid_thw")}


@dataclasses.dataclass
class VLSample:
    """One jsonl line, checked: the text and the paths of its images and video frames (joined to the jsonl's
    directory)."""

    source: tuple[int, int]  # (input file number, line)
    where: str  # "file:line", for messages
    text: str
    images: list[Path]
    videos: list[tuple[list[Path], float]]  # (frames, fps)


def iter_vl_samples(path: Path, file_number: int = 0, media_dir: Path | None = None) -> Iterator[VLSample]:
    """The samples of one jsonl file, each checked (types, placeholder counts, files present)."""
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    for n, line in numbered_lines(path):
        if line.strip():
            yield _parse(path, n, line, file_number, path.parent if media_dir is None else Path(media_dir))


def _parse(path: Path, n: int, line: str, file_number: int, base: Path) -> VLSample:
    where = f"{path}:{n}"
    obj = json_object(path, n, line, "text")
    images = _paths(obj.get("images", []), base, where, "'images'")
    videos = []
    raw_videos = obj.get("videos", [])
    if not isinstance(raw_videos, list):
        raise ValueError(f"{where}: 'videos' is a JSON {type(raw_videos).__name__}, not a list of videos")
    for v, video in enumerate(raw_videos):
        fps = QWEN35_VIDEO_FPS
        if isinstance(video, dict):
            fps = video.get("fps", QWEN35_VIDEO_FPS)
            if isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0:
                raise ValueError(f"{where}: video {v}'s 'fps' is {fps!r}, not a positive number")
            video = video.get("frames")
        frames = _paths(video, base, where, f"video {v}'s frames")
        if not frames:
            raise ValueError(f"{where}: video {v} has no frames")
        videos.append((frames, float(fps)))
    try:
        check_placeholders(obj["text"], len(images), len(videos))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for what, files in [("image", images)] + [(f"video {v} frame", f) for v, (f, _) in enumerate(videos)]:
        for i, file in enumerate(files):
            if not file.is_file():
                raise ValueError(f"{where}: {what} {i} '{os.path.relpath(file, base)}' does not exist ({file})")
    return VLSample((file_number, n), where, obj["text"], images, videos)


def _paths(value, base: Path, where: str, what: str) -> list[Path]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where}: {what} must be a list of file paths (strings), got {json.dumps(value)[:80]}")
    return [media_file(base, p, source=f"{where}: {what}") for p in value]


def _open_image(file: Path, where: str, what: str):
    """The decoded image, as the processor receives it (it converts to RGB itself)."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # OSError: unidentified, truncated
        raise ValueError(f"{where}: {what} '{file.name}' is not a readable image ({file}: {e})") from None
    return image


_PROCESSOR: Qwen35VLProcessor | None = None


def _init_worker(cfg_dict: dict, hf_tokenizer_dir, image_pixels, video_pixels):
    global _PROCESSOR
    torch.set_num_threads(1)  # the workers share the cores
    cfg = Qwen35Config.from_dict(cfg_dict)
    _PROCESSOR = Qwen35VLProcessor(cfg.vision, qwen35_tokenizer_for(cfg, hf_tokenizer_dir),
                                   image_pixels=image_pixels, video_pixels=video_pixels)


def _process(sample: VLSample) -> tuple[VLSample, dict[str, torch.Tensor]]:
    images = [_open_image(f, sample.where, f"image {i}") for i, f in enumerate(sample.images)]
    videos = [[_open_image(f, sample.where, f"video {v} frame {i}") for i, f in enumerate(frames)]
              for v, (frames, _) in enumerate(sample.videos)]
    try:
        out = _PROCESSOR(sample.text, images, videos, [fps for _, fps in sample.videos])
    except ValueError as e:  # e.g. an aspect ratio over 200, a video of fewer frames than temporal_patch_size
        raise ValueError(f"{sample.where}: {e}") from None
    vision_ids = torch.tensor([getattr(_PROCESSOR.vision, f) for f in VISION_TOKENS])
    at = torch.isin(out["input_ids"], vision_ids).nonzero()
    out["vision_extent"] = torch.tensor(int(at[-1]) + 1 if len(at) else 0)
    return sample, out


# arrays aligned with the tokens, stored without offsets of their own (the SFT samples' loss mask)
TOKEN_ALIGNED = {"loss_mask": torch.uint8}
_SIZES = {"tokens": "input_ids", "image_patches": "pixel_values", "images": "image_grid_thw",
          "video_patches": "pixel_values_videos", "videos": "video_grid_thw"}


class ShardWriter:
    """Collects processed samples (the processor's keys: input_ids and the vision arrays a VL model has, plus any
    TOKEN_ALIGNED array) and writes them as shards of about `shard_bytes` each."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: list[tuple[VLSample, dict]] = []
        self.pending_bytes = 0
        self.shards: list[dict] = []
        self.maxima: dict[str, int] = {}
        self.totals: dict[str, int] = {"samples": 0}

    def add(self, sample, out: dict[str, torch.Tensor]):
        self.pending.append((sample, out))
        sizes = {k: len(out[key]) for k, key in _SIZES.items() if key in out}
        self.maxima = {k: max(self.maxima.get(k, 0), v) for k, v in sizes.items()}
        counted = {"samples": 1, "tokens": sizes["tokens"], **{k: sizes[k] for k in ("images", "videos") if k in sizes}}
        self.totals = {k: self.totals.get(k, 0) + v for k, v in counted.items()}
        self.pending_bytes += sum(t.numel() * t.element_size() for t in out.values())
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        tensors = {}
        for name, (offsets, key) in ARRAYS.items():
            if key not in self.pending[0][1]:
                continue  # a text model's samples hold no vision arrays
            parts = [o[key] for _, o in self.pending]
            tensors[name] = torch.cat(parts)
            tensors[offsets] = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
        for name, dtype in TOKEN_ALIGNED.items():
            if name in self.pending[0][1]:
                tensors[name] = torch.cat([o[name] for _, o in self.pending]).to(dtype)
        tensors["tokens"] = tensors["tokens"].to(torch.int32)  # 248320 ids fit; half the bytes of int64
        tensors["vision_extent"] = torch.stack([o["vision_extent"] for _, o in self.pending])
        tensors["source"] = torch.tensor([s.source for s, _ in self.pending])
        name = f"shard_{len(self.shards):05d}.safetensors"
        # serialised, then written by us: a full disk is an OSError (one error line), not safetensors' own error
        data = save({k: v.contiguous() for k, v in tensors.items()})
        write_file(self.directory, name, data, source="the shard writer")
        self.shards.append({"file": name, "samples": len(self.pending)})
        self.pending, self.pending_bytes = [], 0


def qwen35_preprocess_vl(inputs: list[Path], output_dir: Path, cfg: Qwen35Config, *, workers: int = 1,
                         hf_tokenizer_dir: str | None = None, image_pixels: tuple[int, int] = QWEN35_IMAGE_PIXELS,
                         video_pixels: tuple[int, int] = QWEN35_VIDEO_PIXELS,
                         shard_bytes: int = 1 << 30, overwrite: bool = False,
                         media_dir: Path | None = None) -> dict[str, int]:
    """Write OUTPUT_DIR (see the module docstring) for model `cfg`; returns counts (samples, tokens, images,
    videos, shards). `workers` processes decode and process the samples; the order is the input's. `media_dir`: the
    folder the rows' image and frame paths are relative to (default: each jsonl file's own)."""
    global _PROCESSOR
    if cfg.vision is None:
        raise ValueError(f"model '{cfg.name}' has no vision config: use tools/data/preprocess.py for text")
    inputs = [Path(p) for p in inputs]
    check_inputs(inputs)
    tokenizer = qwen35_tokenizer_for(cfg, hf_tokenizer_dir)
    processor = Qwen35VLProcessor(cfg.vision, tokenizer, image_pixels=image_pixels, video_pixels=video_pixels)
    read = [*inputs, *(p for p in (media_dir, hf_tokenizer_dir) if p is not None)]  # never replaced
    with output_directory(output_dir, overwrite=overwrite, inputs=read) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        samples = (s for i, path in enumerate(inputs) for s in iter_vl_samples(path, i, media_dir))
        with tqdm(unit=" samples", desc="processing") as bar:
            if workers > 1:
                init = (cfg.to_dict(), hf_tokenizer_dir, tuple(image_pixels), tuple(video_pixels))
                with Pool(workers, initializer=_init_worker, initargs=init) as pool:
                    for sample, out in pool.imap(_process, samples, chunksize=4):
                        writer.add(sample, out)
                        bar.update()
            else:
                _PROCESSOR = processor
                for sample, out in map(_process, samples):
                    writer.add(sample, out)
                    bar.update()
        writer.flush()
        if not writer.shards:
            raise ValueError(f"no samples found in {[str(p) for p in inputs]}")
        index = {"format": FORMAT, "model": cfg.name, "vocab_size": cfg.vocab_size,
                 "vision": {f: getattr(cfg.vision, f) for f in VISION_FIELDS}, "patch_dim": cfg.vision.patch_dim,
                 "tokenizer": type(tokenizer).__name__, "eod_id": tokenizer.eod_id,
                 "image_pixels": list(image_pixels), "video_pixels": list(video_pixels),
                 "inputs": [str(p.resolve()) for p in inputs], "shards": writer.shards,
                 "num_samples": writer.totals["samples"], "max": writer.maxima, "totals": writer.totals}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return {**writer.totals, "shards": len(writer.shards)}
