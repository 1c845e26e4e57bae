"""megatron-core's torch_dist checkpoint files, written chunk by chunk and read region by region.

Why not megatron's or torch's own functions:
- `megatron.core.dist_checkpointing.save` and `torch.distributed.checkpoint.save` take the whole state dict in memory;
  a 397B model does not fit. `TorchDistWriter` appends one chunk at a time, from several threads, each into its own
  data file.
- megatron's `load` hands back whole tensors of a sharded state dict built from a model; the exporter needs one
  expert's slice of a fused group or one section of a fused projection. `TorchDistReader` reads just the records
  that cover a region, and reads a record's bytes straight into the caller's tensor (one copy, no unpickling of
  data: `torch.load(map_location="meta")` gives the record's dtype, shape and strides, `zipfile` its data offset).

The format mirrors what a one-rank `dist_checkpointing.save` writes with megatron-core 0.19.2 on torch 2.13
(tests/test_convert.py compares the two on the same model):
- data files `__0_{i}.distcp`: one `torch.save` record per tensor chunk (a tensor owning exactly its bytes, as DCP's
  FileSystemWriter clones views) and `torch.save([obj])` bytes per ShardedObject;
- `.metadata`: a pickled `torch.distributed.checkpoint.metadata.Metadata` with version "1.0.0" (torch's
  CURRENT_DCP_VERSION) whose `storage_data` gives each record's file, offset and length;
- `metadata.json`: megatron's `{"sharded_backend": "torch_dist", "sharded_backend_version": 1}`.
Nothing here unpickles arbitrary objects: records go through `torch.load(weights_only=True)` and `.metadata` through
an allow-list of torch's checkpoint-metadata classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import struct
import threading
import uuid
import zipfile
from collections.abc import Mapping, Sequence
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
from megatron_qwen35.convert.file_bytes import FileBytes, FileRange, copy_ranges, covering
from megatron_qwen35.convert.output_dir import start_writeback
from megatron_qwen35.file_names import plain_file_name

DCP_METADATA = ".metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION in torch 2.13
MEGATRON_FORMAT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}  # megatron-core 0.19.2


class _CopyingWriter(io.RawIOBase):
    """What torch.save writes into, at `position` of `fd`: every write goes there, except the one of `data`'s
    bytes (torch.save hands over the storage's memory as it is, CRC32 off), which is copied from `ranges` instead
    (the same bytes; `data`'s memory is never read, so it may be a placeholder never filled)."""

    def __init__(self, fd: int, position: int, data: torch.Tensor, ranges: Sequence[FileRange]):
        self.fd, self.position, self.ranges = fd, position, ranges
        self._address, self._nbytes = data.data_ptr(), data.numel() * data.element_size()
        self.copied = 0  # bytes taken from the ranges

    def writable(self):
        return True

    def tell(self):
        return self.position

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if len(view) == self._nbytes and _address(view) == self._address and not self.copied:
            self.copied = copy_ranges(self.ranges, self.fd, self.position)
        else:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], self.position + done)
        self.position += len(view)
        return len(view)


def _address(view: memoryview) -> int:
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0] if len(view) else 0


def data_file_name(i: int) -> str:
    return f"__0_{i}.distcp"  # rank 0's i-th file, as DCP names them


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
    """torch.save without per-record CRC32 (a quarter of its time); torch.load reads such records the same.
    The option is process-wide, so it is switched once around a whole write, not per record."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class TorchDistWriter:
    """A torch_dist checkpoint written one chunk at a time into `files` data files. Writes to different files may
    run on different threads at once (each file has its own lock); `finish()` writes the metadata that makes the
    checkpoint readable, after checking it is complete."""

    def __init__(self, directory: Path | str, *, files: int = 1):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._data = [open(self.directory / data_file_name(i), "wb") for i in range(files)]
        self._file_locks = [threading.Lock() for _ in range(files)]
        self._lock = threading.Lock()  # the metadata below
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._crc = _no_crc32()
        self._crc.__enter__()

    def _append(self, file: int, index: MetadataIndex, write) -> None:
        with self._file_locks[file]:
            f = self._data[file]
            start = f.tell()
            write(f)
            f.flush()
            info = _StorageInfo(data_file_name(file), start, f.tell() - start)
            start_writeback(f.fileno(), start, info.length)
        with self._lock:
            self._storage[index] = info

    def write_chunk(self, key: str, chunk: torch.Tensor, *, global_shape: Sequence[int], offsets: Sequence[int],
                    file: int = 0, source: Sequence[FileBytes] = (), placeholder: bool = False) -> None:
        """`chunk` is the block of global tensor `key` starting at `offsets` (its rank == the global rank). Where
        its memory lies in `source`, its bytes are copied from those files (`file_bytes`); a `placeholder` chunk's
        memory was never filled, so `source` must cover it."""
        if chunk.dim() != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"chunk of '{key}' has rank {chunk.dim()}, global shape {list(global_shape)}")
        if any(o + s > g for o, s, g in zip(offsets, chunk.shape, global_shape, strict=True)):
            raise ValueError(f"chunk of '{key}' at {list(offsets)} size {list(chunk.shape)} overflows "
                             f"{list(global_shape)}")
        ranges = covering(source, chunk) if source else None
        if ranges is None and placeholder:
            raise ValueError(f"the chunk of '{key}' at {list(offsets)} is a placeholder that its file ranges do not "
                             "cover")
        with self._lock:
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
        data = _own_storage(chunk)
        index = MetadataIndex(key, torch.Size(offsets))
        if ranges is None:
            self._append(file, index, lambda f: torch.save(data, f))
            return

        def copy(f) -> None:  # the record as torch.save writes it, its data copied file to file
            out = _CopyingWriter(f.fileno(), f.tell(), data, ranges)
            torch.save(data, out)
            if out.copied != data.numel() * data.element_size():  # torch.save changed how it hands over the data
                raise RuntimeError(f"the record of '{key}' was not written from its file ranges")
            f.seek(out.position)

        self._append(file, index, copy)

    def write_object(self, unique_key: str, obj: Any) -> None:
        """A megatron ShardedObject (`key/shard_<offset>_<shape>`), serialised as megatron does: torch.save([obj])."""
        raw = io.BytesIO()
        torch.save([obj], raw)
        with self._lock:
            self._objects[unique_key] = BytesStorageMetadata()
        self._append(0, MetadataIndex(unique_key), lambda f: f.write(raw.getbuffer()))

    def _close_files(self) -> None:
        for f in self._data:
            f.close()
        if self._crc is not None:
            self._crc.__exit__(None, None, None)
            self._crc = None

    def abort(self) -> None:
        """Close the files after an error elsewhere; removing them is the caller's cleanup."""
        self._close_files()

    def finish(self, expected: Mapping[str, Sequence[int]] | None = None) -> None:
        """Write the metadata that makes the checkpoint readable; with `expected` ({key: global shape}), first check
        that exactly those tensors were written, each covered once by its chunks."""
        self._close_files()
        if expected is not None:
            self._check_complete(expected)
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._objects}, storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.directory), save_id=str(uuid.uuid4())))
        metadata.version = DCP_VERSION
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
    """A read-only, seekable window [start, start + length) of a file descriptor (one torch.save record). Reads
    are positional (os.pread), so several threads may read regions of one file at once."""

    def __init__(self, fd: int, start: int, length: int):
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

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
        got = os.preadv(self._fd, [memoryview(b)[:n]], self._start + self._pos)
        self._pos += got
        return got


class TorchDistReader:
    """Reads regions of the tensors in a torch_dist checkpoint directory (`iter_XXXXXXX`); safe to use from
    several threads at once."""

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
        for info in self.metadata.storage_data.values():  # names read from a file are data (file_names.py)
            plain_file_name(info.relative_path, source=path)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, relative_path: str) -> int:
        with self._lock:
            if relative_path not in self._fds:
                path = self.directory / relative_path
                if not path.is_file():
                    raise CheckpointFileError(f"{self.directory}: data file {relative_path} is missing")
                self._fds[relative_path] = os.open(path, os.O_RDONLY)
            return self._fds[relative_path]

    def _load_record(self, index: MetadataIndex, what: str) -> torch.Tensor:
        info = self.metadata.storage_data[index]
        region = _FileRegion(self._fd(info.relative_path), info.offset, info.length)
        try:
            return torch.load(region, map_location="cpu", weights_only=True)
        except Exception as e:  # a cut-off data file or flipped bytes: name what was being read
            raise CheckpointFileError(f"{self.directory / info.relative_path}: cannot read {what} ({e})") from None

    def _record_data(self, index: MetadataIndex, what: str) -> tuple[FileRange, torch.Tensor] | None:
        """(where the record's data lies, its tensor on the meta device) when the record is one contiguous tensor
        owning its storage, stored uncompressed (what DCP and TorchDistWriter write); else None."""
        info = self.metadata.storage_data[index]
        fd = self._fd(info.relative_path)
        try:
            meta = torch.load(_FileRegion(fd, info.offset, info.length), map_location="meta", weights_only=True)
            members = [m for m in zipfile.ZipFile(_FileRegion(fd, info.offset, info.length)).infolist()
                       if m.filename.split("/")[-2:-1] == ["data"]]
        except Exception as e:  # noqa: BLE001 - a cut-off data file or flipped bytes: name what was being read
            raise CheckpointFileError(f"{self.directory / info.relative_path}: cannot read {what} ({e})") from None
        nbytes = meta.numel() * meta.element_size()
        if (not isinstance(meta, torch.Tensor) or len(members) != 1 or not meta.is_contiguous()
                or meta.storage_offset() or meta.untyped_storage().nbytes() != nbytes
                or members[0].compress_type != zipfile.ZIP_STORED or members[0].file_size != nbytes):
            return None
        local = os.pread(fd, 30, info.offset + members[0].header_offset)  # the member's local header
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.offset + members[0].header_offset + 30 + name_len + extra_len
        return FileRange(self.directory / info.relative_path, start, nbytes), meta

    def _read_record_into(self, index: MetadataIndex, out: torch.Tensor, what: str) -> None:
        """Fill `out` (contiguous, the record's dtype and shape) with the record's data."""
        found = self._record_data(index, what)
        if found is None or found[1].dtype != out.dtype or found[1].shape != out.shape:
            out.copy_(self._load_record(index, what))
            return
        fd, offset = self._fd(self.metadata.storage_data[index].relative_path), found[0].offset
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                info = self.metadata.storage_data[index]
                raise CheckpointFileError(f"{self.directory / info.relative_path}: cannot read {what} (the file "
                                          f"ends {len(view) - done} bytes early)")
            done += n

    def file_ranges(self, key: str, offsets: Sequence[int], shape: Sequence[int]) -> list[FileRange] | None:
        """Where the data of global tensor `key`'s block at `offsets` of size `shape` lies, in order (to copy it
        file to file), when stored records of plain bytes tile the block as consecutive runs of its bytes: one
        record, or records split along its leading dimension as tensor / expert parallel ranks save them. Else None
        (a block split along its rows' length is read through memory)."""
        md = self.tensors.get(key)
        if md is None:
            return None
        offsets, shape = tuple(offsets), tuple(shape)
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        found = []
        for chunk in md.chunks:
            lo = [c - o for c, o in zip(chunk.offsets, offsets, strict=True)]
            size = tuple(chunk.sizes)
            if any(a + n <= 0 or a >= s for a, n, s in zip(lo, size, shape, strict=True)):
                continue  # outside the block
            if any(a < 0 or a + n > s for a, n, s in zip(lo, size, shape, strict=True)):
                return None  # a record reaching outside the block
            first = next((d for d, n in enumerate(size) if n != 1), len(size) - 1)
            if any(size[d] != shape[d] for d in range(first + 1, len(size))):
                return None  # not one run of the block's bytes
            found.append((sum(a * st for a, st in zip(lo, strides, strict=True)), chunk))
        found.sort(key=lambda f: f[0])
        ranges, at = [], 0
        for start, chunk in found:
            if start != at:
                return None
            record = self._record_data(MetadataIndex(key, chunk.offsets), f"tensor '{key}'")
            if record is None or record[1].dtype != md.properties.dtype or record[1].shape != chunk.sizes:
                return None
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            if record[0].offset + record[0].nbytes > info.offset + info.length:
                raise CheckpointFileError(f"{record[0].path}: the record of tensor '{key}' is cut off")
            ranges.append(record[0])
            at += math.prod(chunk.sizes)
        return ranges if at == math.prod(shape) else None

    def read(self, key: str, offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None,
             *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block of global tensor `key` at `offsets` of size `shape` (default: the whole tensor), into `out`
        when given (a contiguous tensor of that shape and the stored dtype)."""
        if key not in self.tensors:
            raise KeyError(f"Megatron checkpoint {self.directory} lacks tensor '{key}'")
        md = self.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(md.size)
        shape = tuple(shape) if shape is not None else tuple(md.size)
        if out is None:
            out = torch.empty(shape, dtype=md.properties.dtype)
        if tuple(out.shape) != shape or out.dtype != md.properties.dtype or not out.is_contiguous():
            raise ValueError(f"cannot read '{key}' {list(shape)} {md.properties.dtype} into {list(out.shape)} "
                             f"{out.dtype}")
        whole = [c for c in md.chunks if tuple(c.offsets) == offsets and tuple(c.sizes) == shape]
        if whole:  # the usual case: the region is one stored chunk, read straight into `out`
            self._read_record_into(MetadataIndex(key, whole[0].offsets), out, f"tensor '{key}'")
            return out
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

    def leading_values(self, key: str, count: int) -> torch.Tensor:
        """The first `count` elements (fewer where the stored chunk's rows are shorter) of global tensor `key`'s
        first row, `tensor[0, ..., 0, :count]`, read from the record that holds them without reading the rest."""
        md = self.tensors[key]
        first = next((c for c in md.chunks if not any(c.offsets)), None)
        if first is None:
            raise CheckpointFileError(f"{self.directory}: no stored chunk of '{key}' starts at its first element")
        index, what = MetadataIndex(key, first.offsets), f"tensor '{key}'"
        count = min(count, first.sizes[-1]) if len(first.sizes) else 1
        found = self._record_data(index, what)
        if found is None:
            return self._load_record(index, what).reshape(-1)[:count].clone()
        dtype = found[1].dtype
        data = os.pread(self._fd(self.metadata.storage_data[index].relative_path), count * dtype.itemsize,
                        found[0].offset)
        if len(data) != count * dtype.itemsize:
            raise CheckpointFileError(f"{found[0].path}: cannot read {what} (the file ends early)")
        return torch.frombuffer(bytearray(data), dtype=dtype)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype
