"""Where a conversion writes: a temporary sibling directory, renamed into place only when everything is written;
and the written bytes handed to the disk as they are written.

A failed or interrupted run never leaves anything that looks like a checkpoint, nor touches its input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_qwen35.file_names import plain_file_name


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
def new_parents(path: Path | str) -> Iterator[None]:
    """`path`'s missing parent folders, created for the block and removed again (those still empty) when it fails:
    a refused input or a failed write leaves no empty output folder behind."""
    path = Path(path)
    created = [p for p in path.parents if not p.exists()]  # nearest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


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
    nearest = next(p for p in out_dir.parents if p.exists())
    if not nearest.is_dir():  # mkdir would say only "File exists"
        raise ValueError(f"output {out_dir}: {nearest} is a file, not a folder")
    with new_parents(out_dir):
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


def create_file(directory: Path | str, name: str, *, source: str) -> int:
    """A new file `name` inside `directory`, open for writing (its descriptor). `name` must be a plain name
    (`file_names.plain_file_name`; `source` says where it was read); the file is opened relative to the directory,
    never through a symbolic link, and never replaces an existing file: two outputs under one name (a crafted index
    naming a shard 'config.json') are an error, not an overwrite."""
    name = plain_file_name(name, source=source)
    folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                       dir_fd=folder)
    except FileExistsError:
        raise ValueError(f"{source} names the file {name!r} for two outputs") from None
    finally:
        os.close(folder)


def write_file(directory: Path | str, name: str, data: bytes, *, source: str) -> None:
    """`data` as the new file `name` inside `directory` (`create_file`'s rules)."""
    fd = create_file(directory, name, source=source)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:  # a full disk: os.write's error names no file
        raise OSError(e.errno, e.strerror, e.filename or str(Path(directory) / name)) from None
    finally:
        os.close(fd)


def _sync_file_range():
    """libc's sync_file_range (Linux), which Python's os module does not expose; None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait for it


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing [offset, offset + nbytes) of `fd` to the disk now, without waiting for it.

    A conversion produces bytes faster than a disk takes them; left to the kernel, writeback starts only once
    gigabytes are dirty and the rest waits for the final sync, so converting and writing add up instead of
    overlapping (and large dirty sets stall writers erratically: 3 GiB written with pwrite took 2.2-9.7 s to disk on
    this project's 2-core box). sync_file_range(SYNC_FILE_RANGE_WRITE) queues the range's writeback and returns:
    the same 3 GiB took 2.9-3.0 s, copy_file_range with it 1.8-2.1 s (a plain cp + sync: 2.1-2.7 s).
    posix_fadvise(DONTNEED), used here before, also starts writeback but then waits to drop the pages: 6.7-7.9 s.
    A no-op where the call does not exist (the final rename still publishes only complete files).
    """
    if nbytes and _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
