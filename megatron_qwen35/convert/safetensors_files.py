"""Hugging Face safetensors checkpoints: a lazy reader over `safetensors.safe_open` and a shard writer that puts
each tensor at its planned offset, from any thread, in any order.

Reading: each tensor through its own `safe_open`. The file is memory-mapped and the tensor is a view of the mapping:
no copy is made, and the pages leave the process with the tensor, so RSS stays bounded however large the shard.
Files, index and headers are checked on opening, so a missing, truncated or corrupt file is named before anything is
written.

Writing: `safetensors.torch.save_file` takes a whole state dict. Knowing every name, dtype and shape up front,
`SafetensorsShardWriter` writes each file's header first and each tensor at its offset (os.pwrite). Tensors sit in a
file in safetensors' own order (by alignment, then name) under the same header, so a file is byte-identical to what
`save_file` writes for the same tensors. The plan of files is either huggingface_hub's
`split_torch_state_dict_into_shards` (what transformers' save_pretrained uses) or a recorded source index.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_qwen35.checkpoint import CheckpointFileError
from megatron_qwen35.convert.file_bytes import FileRange, copy_ranges
from megatron_qwen35.convert.output_dir import create_file, start_writeback, write_file
from megatron_qwen35.file_names import plain_file_name

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where it is, its dtype and shape."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _data_offsets(path: Path) -> dict[str, int]:
    """Where each tensor's data starts in `path`: 8 + the header's length + its data_offsets[0] (safetensors'
    format). Read by hand because safe_open does not tell, and the import copies tensors file to file by offset;
    called after safe_open has validated the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _cut_off_tensor(path: Path) -> str:
    """The first tensor whose bytes lie beyond the end of `path` (to name it when safetensors refuses the file)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= size - 8 else {}
        ends = sorted((int(v["data_offsets"][1]), k) for k, v in header.items() if k != "__metadata__")
        return next(f" (tensor '{k}' ends at byte {8 + n + end}, the file has {size})"
                    for end, k in ends if 8 + n + end > size)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, StopIteration):
        return ""


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's entry, from safetensors' own validation of the header against the file."""
    try:
        with safe_open(path, framework="pt") as f:
            offsets = _data_offsets(path)
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                s = f.get_slice(name)
                out[name] = TensorEntry(path, SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape()), offsets[name])
            return out
    except SafetensorError as e:
        message = str(e)
        if "Incomplete" in message or "incomplete" in message or "not fully covered" in message:
            raise CheckpointFileError(f"{path}: truncated safetensors file{_cut_off_tensor(path)}") from None
        raise CheckpointFileError(f"{path}: corrupt safetensors header ({message})") from None


def index_weight_map(text: str, *, source: str | Path) -> dict[str, str]:
    """{tensor: shard file} of an index file's text, every file a plain name inside the index's folder (names read
    from a file are data: `file_names`); `source` names the file in errors."""
    try:
        weight_map = json.loads(text)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"{source}: malformed index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointFileError(f"{source}: malformed index (weight_map is not an object of tensor names)")
    for file in set(weight_map.values()):
        shard_file_name(file, source=f"{source} (weight_map)")
    return weight_map


def shard_file_name(name: object, *, source: str | Path) -> str:
    """A shard's name read from a file: a plain name (`file_names.plain_file_name`) of a .safetensors file, so a
    crafted one cannot take the place of the index, config.json or another side file an export writes."""
    name = plain_file_name(name, source=source)
    if not name.endswith(".safetensors"):
        raise CheckpointFileError(f"{source} names the shard {name!r}, which is not a .safetensors file")
    return name


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face checkpoint directory, read lazily by name; files checked on opening.

    Accepts `model.safetensors.index.json` + shards, or safetensors files without an index. Every file the index
    names must exist and hold the tensors the index places in it.
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint directory {self.directory} does not exist")
        self.entries: dict[str, TensorEntry] = {}
        self.index_text: str | None = None  # the index file verbatim, when there is one
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.index_text = index.read_text()
            weight_map = index_weight_map(self.index_text, source=index)
            files = sorted(set(weight_map.values()))
            for file in files:
                if not (self.directory / file).is_file():
                    raise CheckpointFileError(f"{index} names {file}, which is missing")
            headers = {file: _read_header(self.directory / file) for file in files}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise CheckpointFileError(f"{index} places tensor '{name}' in {file}, which does not hold it")
                self.entries[name] = headers[file][name]
            for file, header in headers.items():
                stray = sorted(set(header) - set(weight_map))
                if stray:
                    raise CheckpointFileError(f"{self.directory / file} holds tensor '{stray[0]}' that {index} "
                                              f"does not list")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory} holds no *.safetensors files and no {INDEX_NAME}")
            for file in files:
                if not file.is_file():
                    raise CheckpointFileError(f"{file} is not a file (a folder named like a shard)")
                for name, entry in _read_header(file).items():
                    if name in self.entries:
                        raise CheckpointFileError(f"tensor '{name}' appears in both {self.entries[name].file} "
                                                  f"and {file}")
                    self.entries[name] = entry

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise KeyError(f"Hugging Face checkpoint {self.directory} lacks tensor '{name}'")
        file = self.entries[name].file
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except SafetensorError as e:  # the file changed since it was checked
            raise CheckpointFileError(f"{file}: cannot read tensor '{name}' ({e})") from None

    def file_range(self, name: str) -> FileRange:
        """Where tensor `name`'s bytes lie (to copy them file to file)."""
        entry = self.entries[name]
        return FileRange(entry.file, entry.offset, entry.nbytes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def files(self) -> list[str]:
        return sorted({e.file.name for e in self.entries.values()})

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """Which file each tensor goes to, and the index to write beside them (None: one file, no index)."""

    files: dict[str, list[PlannedTensor]]
    index_text: str | None
    source: str = "the export's shard plan"  # where the file names come from, for errors

    @classmethod
    def split(cls, tensors: Sequence[PlannedTensor], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
              ) -> ShardPlan:
        """Shards as transformers' save_pretrained plans them (huggingface_hub), with its index."""
        from huggingface_hub import split_torch_state_dict_into_shards

        metas = {p.name: torch.empty(p.shape, dtype=p.dtype, device="meta") for p in tensors}
        split = split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size)
        by_name = {p.name: p for p in tensors}
        files = {f: [by_name[n] for n in names] for f, names in split.filename_to_tensors.items()}
        if not split.is_sharded:
            return cls(files, None)
        index = {"metadata": {"total_parameters": sum(math.prod(p.shape) for p in tensors), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        return cls(files, json.dumps(index, indent=2, sort_keys=True) + "\n")  # as save_pretrained writes it

    @classmethod
    def recorded(cls, tensors: Sequence[PlannedTensor], shards: Mapping[str, str], *,
                 source: str | Path = "the conversion record") -> ShardPlan:
        """The files of a recorded source: its index verbatim ({"index": text}) or its one file ({"file": name});
        `source` names where the record was read, for errors."""
        if "file" in shards:
            return cls({plain_file_name(shards["file"], source=source): list(tensors)}, None, str(source))
        weight_map = index_weight_map(shards["index"], source=source)
        if set(weight_map) != {p.name for p in tensors}:
            stray = sorted(set(weight_map) ^ {p.name for p in tensors})
            raise ValueError(f"the recorded source index does not list the model's tensors (first difference "
                             f"'{stray[0]}'); export with an explicit shard size")
        files: dict[str, list[PlannedTensor]] = {}
        for p in tensors:
            files.setdefault(weight_map[p.name], []).append(p)
        return cls(files, shards["index"], str(source))


def _file_layout(tensors: list[PlannedTensor]) -> tuple[bytes, dict[str, int]]:
    """The header bytes of one file and each tensor's data offset in it, in safetensors' own order and format."""
    ordered = sorted(tensors, key=lambda p: (-p.dtype.itemsize, p.name))
    header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
    for p in ordered:
        header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                          "data_offsets": [offset, offset + p.nbytes]}
        offsets[p.name] = offset
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    head = struct.pack("<Q", len(raw)) + raw
    return head, {n: len(head) + o for n, o in offsets.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class SafetensorsShardWriter:
    """Writes the tensors of `plan` into `directory`; `write` may be called from several threads, in any order.
    `close` checks that every planned tensor was written exactly once, then writes the index."""

    def __init__(self, directory: Path | str, plan: ShardPlan):
        self.directory = Path(directory)
        self.plan = plan
        self._where: dict[str, tuple[int, int, PlannedTensor]] = {}  # name: (fd, offset, planned)
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        for file, tensors in plan.files.items():
            head, offsets = _file_layout(tensors)
            fd = create_file(self.directory, file, source=plan.source)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, len(head) + sum(p.nbytes for p in tensors))
            self._where.update({p.name: (fd, offsets[p.name], p) for p in tensors})

    def _claim(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, int, PlannedTensor]:
        if name not in self._where:
            raise ValueError(f"tensor '{name}' is not in the export plan")
        fd, offset, p = self._where[name]
        if dtype != p.dtype or shape != p.shape:
            raise ValueError(f"export wrote '{name}' {dtype} {list(shape)} where the plan expected "
                             f"{p.dtype} {list(p.shape)}")
        with self._lock:
            if name in self._written:
                raise ValueError(f"export wrote tensor '{name}' twice")
            self._written.add(name)
        return fd, offset, p

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, offset, p = self._claim(name, tensor.dtype, tuple(tensor.shape))
        _pwrite_all(fd, _tensor_bytes(tensor), offset)
        start_writeback(fd, offset, p.nbytes)

    def copy(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], ranges: Sequence[FileRange]) -> None:
        """Tensor `name` (`dtype`, `shape`) from the file bytes that hold it, in order, copied file to file."""
        if sum(r.nbytes for r in ranges) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"file ranges of {sum(r.nbytes for r in ranges)} bytes for tensor '{name}' {dtype} "
                             f"{list(shape)}")
        fd, offset, p = self._claim(name, dtype, tuple(shape))
        copy_ranges(ranges, fd, offset)
        start_writeback(fd, offset, p.nbytes)

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Close the files after an error elsewhere; removing them is the caller's cleanup."""
        self._close_files()

    def close(self) -> None:
        self._close_files()
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise ValueError(f"export stopped before tensor '{missing[0]}' ({len(missing)} unwritten)")
        if self.plan.index_text is not None:
            write_file(self.directory, INDEX_NAME, self.plan.index_text.encode(), source=self.plan.source)


def write_safetensors(path: Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """One small safetensors file (test fixtures)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
