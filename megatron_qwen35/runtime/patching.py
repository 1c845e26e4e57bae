"""The mechanism behind every run-time patch: replace an attribute once, remember the original, fingerprint it.

A patch here never edits site-packages: it sets `owner.name` to our function and keeps the original in `_ORIGINALS`,
so applying twice is applying once and tests can reach what was replaced. `fingerprint(target)` hashes the source of
the replaced upstream object; the register (`register.py`) stores the hash each patch was written against.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

# (id(owner), attribute) -> the value it had before the first replacement.
_ORIGINALS: dict[tuple[int, str], Any] = {}


def replace(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name = value``, remembering the original once (re-application keeps the first original)."""
    key = (id(owner), name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(owner, name, None)
    setattr(owner, name, value)


def original(owner: Any, name: str) -> Any:
    """The value ``owner.name`` had before we patched it (the current one if it is unpatched)."""
    return _ORIGINALS.get((id(owner), name), getattr(owner, name, None))


def resolve(target: str) -> Any:
    """The upstream object a target names, as it was before any patch: "pkg.module" or "pkg.module:Class.attr"."""
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else []:
        owner = obj
        obj = original(owner, part) if inspect.ismodule(owner) or inspect.isclass(owner) else getattr(owner, part)
    return obj


def fingerprint(targets: tuple[str, ...]) -> str:
    """The first 12 hex digits of the sha256 of the targets' sources (a module's whole file, or one function each)."""
    source = "\n".join(inspect.getsource(resolve(target)) for target in targets)
    return hashlib.sha256(source.encode()).hexdigest()[:12]


__all__ = ["replace", "original", "resolve", "fingerprint"]
