"""Tensor bytes that already lie in a file, found and copied file to file by the kernel.

A conversion mostly moves bytes: a tensor that no transform or cast changes, a section of a fused projection, a row
block of a regrouped qkv, one expert of a packed group. Such bytes go from the source file to the output file by
`os.copy_file_range` (in the kernel, as `cp` copies), never through user space: on this project's 2-core box, writing
memory-mapped pages from user space had been 73-78% of the import's lane time. Where the kernel cannot copy between
two files (another file system, an old kernel), the bytes are read from the source file and written, never taken
from memory: a conversion may describe a tensor by its file bytes without ever filling its memory.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_qwen35.checkpoint import CheckpointFileError

_BLOCK = 64 * 1024**2  # bytes per read / write where the kernel cannot copy
# copy_file_range's errors that mean "not between these two files" (Linux: EXDEV across file systems before 5.3
# and again since 5.19, EOPNOTSUPP / EINVAL where a file system or special file has no support, ENOSYS before 4.5)
_CANNOT_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


@dataclass(frozen=True)
class FileRange:
    """`nbytes` bytes of `path` from `offset`."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FileBytes:
    """Memory that stands for a file's bytes: [address, address + nbytes) of a placeholder tensor (allocated, never
    filled) whose bytes would be `path`'s from `offset`, e.g. a row block of a transform's output. The Megatron side
    cuts a tensor into chunks by views of its memory (its sharded_state_dict); a chunk lying in such memory is
    written by copying the file ranges it covers (`covering`)."""

    path: Path
    offset: int
    address: int
    nbytes: int


def laid_out(ranges: Sequence[FileRange], tensor: torch.Tensor) -> list[FileBytes]:
    """`ranges`, which hold contiguous `tensor`'s bytes in order, as the FileBytes of its memory."""
    out, address = [], tensor.data_ptr()
    for r in ranges:
        out.append(FileBytes(r.path, r.offset, address, r.nbytes))
        address += r.nbytes
    if address != tensor.data_ptr() + tensor.numel() * tensor.element_size():
        raise ValueError(f"file ranges of {address - tensor.data_ptr()} bytes for a tensor of "
                         f"{tensor.numel() * tensor.element_size()}")
    return out


def covering(source: Sequence[FileBytes], t: torch.Tensor) -> list[FileRange] | None:
    """The file ranges that hold contiguous `t`'s bytes, in order, if `source` covers all of them; else None."""
    if not t.is_contiguous():
        return None
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    pieces = sorted(source, key=lambda m: m.address)
    starts = [m.address for m in pieces]
    out, at = [], start
    while at < end:
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or at >= pieces[i].address + pieces[i].nbytes:
            return None
        m = pieces[i]
        n = min(end, m.address + m.nbytes) - at
        out.append(FileRange(m.path, m.offset + at - m.address, n))
        at += n
    return out


def vector_ranges(runs: Sequence[tuple[int, int, int]], inputs: Sequence[Sequence[FileRange]], vector_bytes: int
                  ) -> list[FileRange]:
    """The file ranges of an output made of `runs` ((input, first vector, count), in order; see
    `transforms.Transform.moved_vectors`), where input i's bytes lie in `inputs[i]`'s ranges, in order."""
    out: list[FileRange] = []
    for i, first, count in runs:
        at, end = first * vector_bytes, (first + count) * vector_bytes
        base = 0
        for r in inputs[i]:
            lo, hi = max(at, base), min(end, base + r.nbytes)
            if lo < hi:
                piece = FileRange(r.path, r.offset + lo - base, hi - lo)
                if out and out[-1].path == piece.path and out[-1].offset + out[-1].nbytes == piece.offset:
                    piece = FileRange(piece.path, out[-1].offset, out[-1].nbytes + piece.nbytes)
                    out.pop()
                out.append(piece)
            base += r.nbytes
        if base < end:
            raise ValueError(f"input {i} has {base} bytes in its files; a run needs {end}")
    return out


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy `nbytes` from `src_fd` at `src_offset` to `dst_fd` at `dst_offset` in the kernel, or by reading and
    writing where it cannot (EXDEV / EINVAL / ENOSYS / EOPNOTSUPP: another file system or kernel)."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
            if not n:
                break  # the source ends early: the read below names it
            done += n
    except OSError as e:
        if e.errno not in _CANNOT_COPY:
            raise  # a full disk, an I/O error: reading and writing would meet it too
    while done < nbytes:
        data = os.pread(src_fd, min(_BLOCK, nbytes - done), src_offset + done)
        if not data:
            raise EOFError(f"the file ends {nbytes - done} bytes before the end of the range to copy")
        view = memoryview(data)
        while len(view):
            n = os.pwrite(dst_fd, view, dst_offset + done)
            view, done = view[n:], done + n


def copy_ranges(ranges: Sequence[FileRange], dst_fd: int, dst_offset: int) -> int:
    """Copy `ranges` one after another into `dst_fd` from `dst_offset`; returns the bytes copied."""
    fds: dict[Path, int] = {}
    try:
        for r in ranges:
            if r.path not in fds:
                fds[r.path] = os.open(r.path, os.O_RDONLY)
            try:
                copy_range(fds[r.path], r.offset, dst_fd, dst_offset, r.nbytes)
            except EOFError as e:
                raise CheckpointFileError(f"{r.path}: cannot copy bytes {r.offset}..{r.offset + r.nbytes} ({e})"
                                          ) from None
            dst_offset += r.nbytes
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(r.nbytes for r in ranges)


def mapped(r: FileRange, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of `r` as a flat read-only tensor memory-mapped from the file (pages read on touch, gone with the
    tensor): to look at values (the NaN / Inf screen) without copying them."""
    start = r.offset - r.offset % mmap.ALLOCATIONGRANULARITY
    if not r.nbytes:
        return torch.empty(0, dtype=dtype)
    with open(r.path, "rb") as f:
        try:
            # ACCESS_COPY: a private mapping that numpy may call writable (torch warns on read-only buffers);
            # nothing writes to it, so its pages stay the file's.
            view = mmap.mmap(f.fileno(), r.offset - start + r.nbytes, offset=start, access=mmap.ACCESS_COPY)
        except ValueError:  # the file is shorter than the range (mapping past its end would crash on reading)
            raise CheckpointFileError(f"{r.path}: the file ends before byte {r.offset + r.nbytes} "
                                      f"({os.fstat(f.fileno()).st_size} bytes)") from None
    raw = np.frombuffer(view, dtype=np.uint8, count=r.nbytes, offset=r.offset - start)
    return torch.from_numpy(raw).view(dtype)
