"""Streaming checkpoint files: tensors are read and written one at a time, so memory does not grow with the model.

- `SafetensorsCheckpoint`: a lazy, validated view of Hugging Face safetensors (one file or an index of shards).
- `SafetensorsShardWriter`: sharded safetensors + model.safetensors.index.json, written in a planned order.
- `TorchDistWriter` / `TorchDistReader`: megatron-core's torch_dist format (torch DCP: `.metadata`, `__0_0.distcp`,
  megatron's `metadata.json`) written incrementally and read back region by region. megatron's own
  `dist_checkpointing.save` wants the whole state dict in memory; this writer does not.
- `output_directory`: build output in a temporary sibling directory, rename into place at the end.
- `Progress`: a tqdm bar counting bytes and tensors.
Nothing here unpickles arbitrary objects: tensors come from safetensors or `torch.load(weights_only=True)`, and
DCP's pickled `.metadata` goes through an allow-list of torch's checkpoint metadata classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import queue
import shutil
import struct
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_qwen35.checkpoint import CheckpointFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class WriteBehind:
    """Runs write jobs in order on one background thread while the caller reads and transforms the next tensors
    (reads and writes overlap instead of adding up). At most `budget` bytes wait to be written (a larger tensor
    waits alone), so memory stays bounded. An error in a job is raised by the next `submit` or by `close`."""

    def __init__(self, budget: int = 1024**3):
        self._budget, self._inflight, self._error = budget, 0, None
        self._jobs: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, nbytes = job
            try:
                if self._error is None:
                    fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            with self._room:
                self._inflight -= nbytes
                self._room.notify_all()

    def submit(self, fn, nbytes: int) -> None:
        with self._room:
            self._room.wait_for(lambda: self._error is not None or self._inflight == 0
                                or self._inflight + nbytes <= self._budget)
            if self._error is not None:
                raise self._error
            self._inflight += nbytes
        self._jobs.put((fn, nbytes))

    def close(self) -> None:
        """Wait for every job; raise the first error. Safe to call twice."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (absolute byte range)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors header against the file's size (a truncated file fails here, by name)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointFileError(f"{path}: truncated or corrupt safetensors file (header of {header_len} "
                                      f"bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, entries = 8 + header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: corrupt safetensors header entry for tensor '{name}': {info}") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise CheckpointFileError(f"{path}: tensor '{name}' claims {end - begin} bytes but shape {list(shape)} "
                                      f"{info['dtype']} needs {expected}")
        if base + end > size:
            raise CheckpointFileError(f"{path}: truncated safetensors file: tensor '{name}' ends at byte "
                                      f"{base + end}, file has {size}")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries


def _read_into(path: Path, start: int, nbytes: int, what: str) -> torch.Tensor:
    """`nbytes` raw bytes from `path` at `start` into a fresh uint8 tensor (plain reads: no mmap pages in RSS)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            view, done = memoryview(buf.numpy()), 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointFileError(f"{path}: truncated while reading {what} ({done} of {nbytes} bytes)")
                done += n
    return buf


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face checkpoint directory, read lazily by name; headers checked on open.

    Accepts `model.safetensors.index.json` + shards, or safetensors files without an index. Every file the index
    names must exist and hold the tensors the index places in it.
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint directory {self.directory} does not exist")
        self.entries: dict[str, TensorEntry] = {}
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFileError(f"{index}: malformed index ({e})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).is_file():
                    raise CheckpointFileError(f"{index} names {file}, which is missing")
            headers = {file: _read_header(self.directory / file) for file in sorted(set(weight_map.values()))}
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
                for name, entry in _read_header(file).items():
                    if name in self.entries:
                        raise CheckpointFileError(f"tensor '{name}' appears in both {self.entries[name].file} "
                                                  f"and {file}")
                    self.entries[name] = entry

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise KeyError(f"Hugging Face checkpoint {self.directory} lacks tensor '{name}'")
        e = self.entries[name]
        return _read_into(e.file, e.start, e.nbytes, f"tensor '{name}'").view(e.dtype).reshape(e.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsShardWriter:
    """Writes `plan`'s tensors, in plan order, into shards of at most `max_shard_bytes` (a bigger tensor gets its
    own shard) named like transformers' (`model-00001-of-00003.safetensors`) plus the index.

    Knowing every name, dtype and shape up front lets each shard's header go first and the data stream after it.
    """

    def __init__(self, directory: Path | str, plan: Sequence[PlannedTensor], *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        self._files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(self._files[i], p) for i, shard in enumerate(shards) for p in shard]
        self._shards = shards
        self._pos = 0
        self._handle = None
        self._current = None
        self._behind = WriteBehind()
        self.total_bytes = sum(p.nbytes for p in plan)

    def _open(self, file_index: int) -> None:
        if self._handle:
            self._handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for p in self._shards[file_index]:
            header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header so data starts 8-byte aligned
        self._handle = open(self.directory / self._files[file_index], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._current = self._files[file_index]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"tensor '{name}' is not in the export plan (all {len(self._queue)} already written)")
        file, p = self._queue[self._pos]
        if name != p.name or tensor.dtype != p.dtype or tuple(tensor.shape) != p.shape:
            raise ValueError(f"export wrote '{name}' {tensor.dtype} {list(tensor.shape)} where the plan expected "
                             f"'{p.name}' {p.dtype} {list(p.shape)}")
        self._pos += 1

        def job():
            if file != self._current:
                self._open(self._files.index(file))
            self._handle.write(_tensor_bytes(tensor))

        self._behind.submit(job, p.nbytes)

    def abort(self) -> None:
        """Stop after the queued writes (on an error elsewhere); files are left to the caller's cleanup."""
        with contextlib.suppress(BaseException):
            self._behind.close()
        if self._handle:
            self._handle.close()

    def close(self) -> None:
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise ValueError(f"export stopped before tensor '{missing}' ({len(self._queue) - self._pos} unwritten)")
        self._behind.close()
        if self._handle:
            self._handle.close()
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {p.name: file for file, p in self._queue}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors(path: Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """One small safetensors file (vision tensors carried beside a Megatron checkpoint; test fixtures)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# megatron-core torch_dist (torch DCP) checkpoints
# ---------------------------------------------------------------------------------------------------------------

DCP_METADATA = ".metadata"
DCP_DATA_FILE = "__0_0.distcp"
MEGATRON_FORMAT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}  # megatron's metadata.json


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage: give views (expert slices, fused sections) a storage of their
    own bytes. A contiguous view is re-wrapped without copying; anything else is copied."""
    t = t.detach()
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous() and not t.storage_offset():
        return t
    if not t.is_contiguous() or t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    raw = t.reshape(-1).view(torch.uint8).numpy()  # the view's bytes, shared
    return torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype).reshape(t.shape)


@contextlib.contextmanager
def _no_crc32():
    """torch.save without per-record CRC32 (a quarter of its time); torch.load reads such records the same."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class TorchDistWriter:
    """A megatron torch_dist checkpoint written one chunk at a time, as a one-rank megatron save lays it out:
    every tensor chunk `torch.save`d into one data file, objects as `torch.save([obj])` bytes, then `.metadata`
    (torch DCP) and `metadata.json` (megatron) on `finish()`."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._data = open(self.directory / DCP_DATA_FILE, "wb")
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._behind = WriteBehind()

    def _append(self, index: MetadataIndex, write, nbytes: int) -> None:
        """Queue `write(file)`; its byte range in the data file is recorded under `index` when it runs."""
        def job():
            start = self._data.tell()
            write(self._data)
            self._storage[index] = _StorageInfo(DCP_DATA_FILE, start, self._data.tell() - start)

        self._behind.submit(job, nbytes)

    def write_chunk(self, key: str, chunk: torch.Tensor, *, global_shape: Sequence[int],
                    offsets: Sequence[int]) -> None:
        """`chunk` is the block of global tensor `key` starting at `offsets` (its rank == the global rank)."""
        if chunk.dim() != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"chunk of '{key}' has rank {chunk.dim()}, global shape {list(global_shape)}")
        if any(o + s > g for o, s, g in zip(offsets, chunk.shape, global_shape, strict=True)):
            raise ValueError(f"chunk of '{key}' at {list(offsets)} size {list(chunk.shape)} overflows "
                             f"{list(global_shape)}")
        md = self._tensors.get(key)
        if md is None:
            md = self._tensors[key] = TensorStorageMetadata(
                TensorProperties.create_from_tensor(chunk), torch.Size(global_shape), [])
        elif md.size != torch.Size(global_shape) or md.properties.dtype != chunk.dtype:
            raise ValueError(f"chunks of '{key}' disagree: {md.size} {md.properties.dtype} vs "
                             f"{list(global_shape)} {chunk.dtype}")
        elif any(tuple(c.offsets) == tuple(offsets) for c in md.chunks):
            raise ValueError(f"the chunk of '{key}' at {list(offsets)} is written twice")
        md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), chunk.shape))

        def save(f):
            with _no_crc32():
                torch.save(_own_storage(chunk), f)

        self._append(MetadataIndex(key, torch.Size(offsets)), save, chunk.numel() * chunk.element_size())

    def write_object(self, unique_key: str, obj: Any) -> None:
        """A megatron ShardedObject (`key/shard_<offset>_<shape>`), serialised as megatron does: torch.save([obj])."""
        raw = io.BytesIO()
        torch.save([obj], raw)
        self._objects[unique_key] = BytesStorageMetadata()
        self._append(MetadataIndex(unique_key), lambda f: f.write(raw.getbuffer()), len(raw.getbuffer()))

    def abort(self) -> None:
        """Stop after the queued writes (on an error elsewhere); files are left to the caller's cleanup."""
        with contextlib.suppress(BaseException):
            self._behind.close()
        self._data.close()

    def finish(self, expected: Mapping[str, Sequence[int]] | None = None) -> None:
        """Write the metadata that makes the checkpoint readable; with `expected` ({key: global shape}), first check
        that exactly those tensors were written, each covered once by its chunks."""
        self._behind.close()
        self._data.close()
        if expected is not None:
            self._check_complete(expected)
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._objects}, storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.directory), save_id=str(uuid.uuid4())))
        metadata.version = "1.0.0"  # torch's CURRENT_DCP_VERSION for this layout
        with open(self.directory / DCP_METADATA, "wb") as f:
            pickle.dump(metadata, f)
        (self.directory / "metadata.json").write_text(json.dumps(MEGATRON_FORMAT))

    def _check_complete(self, expected: Mapping[str, Sequence[int]]) -> None:
        problems = [f"'{k}' was not written" for k in expected if k not in self._tensors]
        problems += [f"'{k}' is not a tensor of this model" for k in self._tensors if k not in expected]
        for key, md in self._tensors.items():
            if key in expected and md.size != torch.Size(expected[key]):
                problems.append(f"'{key}' has shape {list(md.size)}, the model's is {list(expected[key])}")
            elif sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
                problems.append(f"the chunks of '{key}' cover {sum(math.prod(c.sizes) for c in md.chunks)} of "
                                f"{math.prod(md.size)} elements")
        if problems:
            raise ValueError(f"{self.directory}: incomplete checkpoint, not finished: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | {
    ("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType",
                                                          "TensorWriteData")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: load only torch's checkpoint-metadata classes and dtypes from it."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class _FileRegion(io.RawIOBase):
    """A read-only, seekable window [start, start + length) of an open file (one torch.save record)."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, b):
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


class TorchDistReader:
    """Reads regions of the tensors in a torch_dist checkpoint directory (`iter_XXXXXXX`), one at a time."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        path = self.directory / DCP_METADATA
        if not path.is_file():
            raise CheckpointFileError(f"{self.directory} is not a torch_dist checkpoint: {DCP_METADATA} is missing")
        with open(path, "rb") as f:
            try:
                self.metadata: Metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError) as e:
                raise CheckpointFileError(f"{path}: unreadable checkpoint metadata ({e})") from None
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self._files: dict[str, Any] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _load_record(self, index: MetadataIndex, what: str) -> torch.Tensor:
        info = self.metadata.storage_data[index]
        if info.relative_path not in self._files:
            path = self.directory / info.relative_path
            if not path.is_file():
                raise CheckpointFileError(f"{self.directory}: data file {info.relative_path} is missing")
            self._files[info.relative_path] = open(path, "rb")
        try:
            return torch.load(_FileRegion(self._files[info.relative_path], info.offset, info.length),
                              map_location="cpu", weights_only=True)
        except Exception as e:  # a cut-off data file or flipped bytes: name what was being read
            raise CheckpointFileError(f"{self.directory / info.relative_path}: cannot read {what} ({e})") from None

    def read(self, key: str, offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The block of global tensor `key` at `offsets` of size `shape` (default: the whole tensor)."""
        if key not in self.tensors:
            raise KeyError(f"Megatron checkpoint {self.directory} lacks tensor '{key}'")
        md = self.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(md.size)
        shape = tuple(shape) if shape is not None else tuple(md.size)
        whole = [c for c in md.chunks if tuple(c.offsets) == offsets and tuple(c.sizes) == shape]
        if whole:  # the usual case: the region is one stored chunk, returned as loaded (no second copy)
            return self._load_record(MetadataIndex(key, whole[0].offsets), f"tensor '{key}'").reshape(shape)
        out = torch.empty(shape, dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, shape, chunk.offsets, chunk.sizes, strict=True)]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            data = self._load_record(MetadataIndex(key, chunk.offsets), f"tensor '{key}'")
            src, dst = data, out
            for d, (low, h) in enumerate(zip(lo, hi, strict=True)):
                src = src.narrow(d, low - chunk.offsets[d], h - low)
                dst = dst.narrow(d, low - offsets[d], h - low)
            dst.copy_(src)
            covered += math.prod(h - low for low, h in zip(lo, hi, strict=True))
            del data
        if covered != math.prod(shape):
            raise CheckpointFileError(f"{self.directory}: chunks of '{key}' cover {covered} of {math.prod(shape)} "
                                      f"elements of the region at {list(offsets)} size {list(shape)}")
        return out

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype


def warn_if_not_finite(names: Sequence[str], tensors: Sequence[torch.Tensor], where: Path | str) -> None:
    """NaN / Inf in a weight is carried as it is (transformers loads such files too), with a warning naming it: a
    diverged run or a corrupt file should not pass unnoticed, nor stop a conversion the reference would accept."""
    for name, tensor in zip(names, tensors, strict=True):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            warnings.warn(f"{where}: tensor '{name}' holds {bad} NaN / Inf value(s) of {tensor.numel()}; carried "
                          "as they are", stacklevel=2)


# ---------------------------------------------------------------------------------------------------------------
# Output directories and progress
# ---------------------------------------------------------------------------------------------------------------

def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary siblings of `out_dir` that a killed run left behind (its pid is in the name and no longer alive on
    this machine) are removed, each reported on stderr; any other is reported and kept."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = stale.name[len(f".{out_dir.name}.tmp-"):].split("-")[0]
        alive = True
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:  # another user's live process
                pass
        if alive:
            print(f"note: {stale} may belong to a conversion still running; left in place", file=sys.stderr)
        else:
            shutil.rmtree(stale, ignore_errors=True)
            print(f"note: removed {stale}, left by a conversion that was killed (pid {pid})", file=sys.stderr)


@contextlib.contextmanager
def output_directory(out_dir: Path | str, *, overwrite: bool = False, inputs: Sequence[Path | str] = ()
                     ) -> Iterator[Path]:
    """A temporary directory beside `out_dir`, renamed to `out_dir` only when the block succeeds.

    A failed or interrupted run leaves no directory at `out_dir` (a killed process leaves a `.NAME.tmp-PID-*`
    sibling, which the next run removes). `out_dir` equal to or containing one of `inputs` is refused even with
    `overwrite` (replacing it would delete the input). The result has the permissions the umask gives a new
    directory (a temporary directory is created 0700).
    """
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(f"output {out_dir} would replace the input {source}; choose another output directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output {out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


class Progress:
    """A tqdm bar over bytes with a running tensor count; silent when disabled."""

    def __init__(self, total_bytes: int, desc: str, *, enabled: bool = True):
        from tqdm import tqdm

        self.tensors = 0
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, dynamic_ncols=True)

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self._bar.update(nbytes)
        self._bar.set_postfix(tensors=self.tensors, refresh=False)

    def close(self) -> None:
        self._bar.close()


def iter_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
