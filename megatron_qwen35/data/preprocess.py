"""Tokenize jsonl or plain text into Megatron's indexed dataset (.bin/.idx), in parallel, with a progress bar.

Documents: one per jsonl line (the `json_key` field), or for plain text one per blank-line-separated paragraph.
Each document ends with the end-of-document token, so GPTDataset can pack documents and mask across them.
The output appears only when complete: files are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_qwen35.convert.output_dir import new_parents
from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

_TOKENIZER: Qwen35Tokenizer | None = None


def check_inputs(inputs) -> None:
    """Every input file exists, checked before any output or progress bar appears (the rows are read lazily, by
    workers; the text, vision-language and chat preprocessing all start with it)."""
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input {path} does not exist")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is named with its number and byte offset."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None


def json_object(path: Path, n: int, line: str, json_key: str, kind: type = str) -> dict:
    """One jsonl line: an object whose `json_key` is a `kind` (a string), or a ValueError naming the file and line
    (the text, vision-language and chat preprocessing all read their lines through it)."""
    try:
        obj = json.loads(line.rstrip("\r\n"))  # a line cut off mid-object fails at its end, not on the next line
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.pos + 1})") from None
    if "\\ud" in line.lower():  # an escaped surrogate: a pair decodes to one character, a lone one to no text
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}:{n}: holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), which is no "
                             "text the tokenizer can read") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object with a '{json_key}' field")
    if json_key not in obj:
        raise ValueError(f"{path}:{n}: has no '{json_key}' field (it has {sorted(obj)[:5]})")
    if not isinstance(obj[json_key], kind):
        expected = {str: "a string", list: "a list"}.get(kind, kind.__name__)
        raise ValueError(f"{path}:{n}: '{json_key}' is a JSON {type(obj[json_key]).__name__}, not {expected}")
    return obj


def iter_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """Documents of a .jsonl file (one object per line) or of a plain text file (paragraphs)."""
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        for n, line in numbered_lines(path):
            if line.strip():
                yield json_object(path, n, line, json_key)[json_key]
    else:
        paragraph: list[str] = []
        for _, line in numbered_lines(path):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def _init_worker(hf_tokenizer_dir):
    global _TOKENIZER
    _TOKENIZER = Qwen35Tokenizer(hf_tokenizer_dir)


def _encode(text: str) -> tuple[list[int], int]:
    ids = _TOKENIZER.encode(text) + [_TOKENIZER.eod_id]
    return ids, len(text.encode("utf-8"))


def tokenize_to_indexed(inputs: list[Path], output_prefix: Path, *, workers: int = 1, json_key: str = "text",
                        hf_tokenizer_dir: str | None = None) -> dict[str, int]:
    """Write OUTPUT_PREFIX.bin/.idx; returns counts (documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    output_prefix = Path(output_prefix)
    check_inputs(inputs)
    global _TOKENIZER
    # The tokenizer loads here first: a folder it refuses is one error before any output exists (a worker's
    # initializer that raises has the pool start another worker, forever); one worker is this process
    _TOKENIZER = Qwen35Tokenizer(hf_tokenizer_dir)
    tmp_bin, tmp_idx = (Path(f"{output_prefix}.tmp{os.getpid()}{s}") for s in (".bin", ".idx"))
    docs = tokens = 0
    with new_parents(output_prefix), _removed_on_exit(tmp_bin, tmp_idx):
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=np.int32)  # 248320 ids do not fit in uint16
        pool = Pool(workers, initializer=_init_worker, initargs=(hf_tokenizer_dir,)) if workers > 1 else None
        with pool or contextlib.nullcontext(), tqdm(unit="B", unit_scale=True, desc="tokenizing") as bar:
            for path in inputs:
                documents = iter_documents(Path(path), json_key)
                for ids, nbytes in (pool.imap(_encode, documents, chunksize=16) if pool else map(_encode, documents)):
                    builder.add_document(ids, [len(ids)])
                    docs, tokens = docs + 1, tokens + len(ids)
                    bar.update(nbytes)
        if docs == 0:
            raise ValueError(f"no documents found in {[str(p) for p in inputs]}")
        builder.finalize(str(tmp_idx))
        tmp_bin.rename(f"{output_prefix}.bin")
        tmp_idx.rename(f"{output_prefix}.idx")
    return {"documents": docs, "tokens": tokens}


@contextlib.contextmanager
def _removed_on_exit(*paths: Path):
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
