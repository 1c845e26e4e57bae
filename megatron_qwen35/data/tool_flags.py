"""The flags tools/data/preprocess_sft.py and tools/data/preprocess_vl.py share, defined once: the model the data is
for, the images' and videos' sizes and folder, the shards' size, and what each tool's function takes from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_qwen35.cli import positive_int
from megatron_qwen35.config import Qwen35Config, qwen35_config_from_hf, qwen35_preset
from megatron_qwen35.data.vl_processor import QWEN35_IMAGE_PIXELS, QWEN35_VIDEO_PIXELS


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--qwen35-preset or --hf-config (one of them): the model whose vocabulary and vision config the data is for."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--qwen35-preset", help="the model the data is for (its vocabulary and vision config)")
    model.add_argument("--hf-config", type=Path, help="or a Hugging Face config.json")


def model_config(a: argparse.Namespace) -> Qwen35Config:
    return qwen35_preset(a.qwen35_preset) if a.qwen35_preset else qwen35_config_from_hf(a.hf_config)


def add_media_flags(p: argparse.ArgumentParser) -> None:
    """The images' and videos' pixel bounds (the released processor's by default), their folder, the shards' size."""
    p.add_argument("--image-pixels", nargs=2, type=int, default=QWEN35_IMAGE_PIXELS, metavar=("MIN", "MAX"),
                   help="pixels an image is resized to lie within (default: the released processor's)")
    p.add_argument("--video-pixels", nargs=2, type=int, default=QWEN35_VIDEO_PIXELS, metavar=("MIN", "MAX"),
                   help="the same over all frames of a video")
    p.add_argument("--media-dir", type=Path, default=None,
                   help="the folder the rows' image / video paths are relative to (default: each --input file's "
                        "folder); no path may leave it")
    p.add_argument("--shard-mb", type=positive_int, default=1024, help="about this many MiB of arrays per shard")


def media_options(a: argparse.Namespace) -> dict:
    """The keyword arguments `add_media_flags`' flags give qwen35_preprocess_sft / qwen35_preprocess_vl."""
    return dict(image_pixels=tuple(a.image_pixels), video_pixels=tuple(a.video_pixels), media_dir=a.media_dir,
                shard_bytes=a.shard_mb << 20)


__all__ = ["add_model_flags", "model_config", "add_media_flags", "media_options"]
