"""What the command lines (tools/convert/*, tools/data/*) share: a failure is one `error: ...` line naming the
culprit and exit code 2, whether the input is bad or the machine refuses (a full disk, a folder it cannot write)."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

INPUT_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError)  # bad input, already named in the message


def positive_int(text: str) -> int:
    """argparse type of a count or a length: 0 or less is refused by argparse (its one-line usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def run_tool(work: Callable[[], str], *, doing: str) -> int:
    """Run `work` and print the line it returns (exit 0), or its failure as one `error:` line (exit 2). `doing`
    ("converting", "preprocessing") says what was under way when the machine refused."""
    try:
        summary = work()
    except INPUT_ERRORS as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a read-only or vanished directory
        where = f" ({e.filename})" if e.filename else ""
        hint = "; free space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"error: {e.strerror or e}{where} while {doing}; no output was left behind{hint}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def run_conversion(convert: Callable[[], object]) -> int:
    """`run_tool` for a converter: prints where it wrote."""
    return run_tool(lambda: f"wrote {convert()}", doing="converting")


__all__ = ["INPUT_ERRORS", "positive_int", "run_tool", "run_conversion"]
