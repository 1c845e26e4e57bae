"""File names read from files are data, never paths.

A Hugging Face index maps tensors to shard files, a conversion record lists the files to write back, a torch_dist
`.metadata` names each record's data file, a VL dataset's index names its shards: each such name comes from a file
that anyone may have crafted. Joined to a folder as it is, `../x` or `/etc/x` would read or write outside the folders
named on the command line. Every such name goes through `plain_file_name` before anything is opened with it: a plain
name inside its folder (one path component, not `.` or `..`, no separator, no NUL), or a `ValueError` naming where it
was read. A plain name may still be a symbolic link inside an input folder (Hugging Face's cache keeps its shards as
links into a blob store); reading follows it, writing never does (`convert/output_dir.create_file`).
"""

from __future__ import annotations

from pathlib import Path

# Separators of every platform a checkpoint may come from (a Windows name would be one component on Linux).
_SEPARATORS = ("/", "\\")


class UnsafeFileName(ValueError):
    """A file name read from a file that is not a plain name inside its folder."""


def plain_file_name(name: object, *, source: str | Path) -> str:
    """`name` when it is a plain file name (one component inside its folder); else UnsafeFileName naming `source`,
    the file (and field) it was read from."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name
            or any(s in name for s in _SEPARATORS) or Path(name).is_absolute()):
        raise UnsafeFileName(f"{source} names the file {name!r}, which is not a plain file name inside its folder "
                             "(a separator, '..', an absolute path or an empty name): refusing to read or write it")
    return name


__all__ = ["UnsafeFileName", "plain_file_name"]
