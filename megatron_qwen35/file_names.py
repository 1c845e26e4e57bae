"""File names read from files are data, never paths.

A Hugging Face index maps tensors to shard files, a conversion record lists the files to write back, a torch_dist
`.metadata` names each record's data file, a VL dataset's index names its shards: each such name comes from a file
that anyone may have crafted. Joined to a folder as it is, `../x` or `/etc/x` would read or write outside the folders
named on the command line. Every such name goes through `plain_file_name` before anything is opened with it: a plain
name inside its folder (one path component, not `.` or `..`, no separator, no NUL), or a `ValueError` naming where it
was read. A plain name may still be a symbolic link inside an input folder (Hugging Face's cache keeps its shards as
links into a blob store); reading follows it, writing never does (`convert/output_dir.create_file`), and a folder a
training run writes into (--save) may hold no link that leads outside it (`link_leaving`).

A data set row names its images and video frames by relative path (`images/a.png`): `media_file` joins such a path
to the folder named on the command line (--media-dir, or the jsonl file's own folder) only when it stays inside it.
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


def media_file(folder: Path, name: object, *, source: str) -> Path:
    """`folder / name` for a file path read from a data set row (an image, a video frame): relative, in `/`-separated
    components none of which is `..` (nor empty: no `//`), no NUL, no backslash; else UnsafeFileName naming `source`,
    the file, line and field it was read from."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or "\0" in name or "\\" in name or Path(name).is_absolute()
            or any(p in ("", "..") for p in parts)):
        raise UnsafeFileName(f"{source} names the file {name!r}, which is not a relative path inside the media folder "
                             "(an absolute path, a '..', a backslash or an empty component): refusing to read it; "
                             "paths are relative to --media-dir (default: the jsonl file's folder)")
    return folder.joinpath(*(p for p in parts if p != "."))


def link_leaving(folder: Path) -> tuple[Path, Path] | None:
    """(the link, where it leads) of the first symbolic link under `folder` (not followed into) that leads outside it;
    None where there is none. A folder a run writes into (--save) must hold none: megatron's save opens the tracker
    and the iteration folders by name, following a link to wherever it points (a crafted checkpoint given as
    --load = --save would have the run overwrite files elsewhere)."""
    import os

    root = folder.resolve()
    for here, dirs, files in os.walk(folder):  # (os.walk lists a linked folder but does not enter it)
        for name in sorted(dirs + files):
            path = Path(here) / name
            if path.is_symlink():
                try:
                    target = path.resolve()
                except RuntimeError:  # a loop of links: it leads nowhere, and a write through it would fail
                    return path, Path(os.readlink(path))
                if target != root and root not in target.parents:
                    return path, target
    return None


__all__ = ["UnsafeFileName", "plain_file_name", "media_file", "link_leaving"]
