"""What the command lines (tools/convert/*, tools/data/*, tools/generate.py) share: a failure is one `error: ...` line
naming the culprit and exit code 2, whether the input is bad or the machine refuses (a full disk, a folder it cannot
write), and the output is the tool's own (`quiet_library_notices`)."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import warnings
from collections.abc import Callable

INPUT_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError)  # bad input, already named in the message

# The libraries a tool drives and what they say on every run, which is about training or upstream plans, not about the
# tool's input: megatron-core's import-time notices that Transformer Engine / Apex are absent (ten on a CPU machine),
# FLA's that Triton has no GPU, torch.distributed.checkpoint's on reading a checkpoint in one process and its
# ShardedTensor deprecation, torch's log line that no CUDA runtime is found.
LIBRARY_WARNINGS = ("megatron", "fla", "torch.distributed")
LIBRARY_LOGGERS = ("torch.utils.cpp_extension",)


def quiet_library_notices() -> None:
    """A tool prints its result or its one `error:` line: the libraries' notices above (about twenty lines before
    every answer on a CPU machine) are kept out of it. The package's own warnings and every error still show; a
    training run (pretrain_qwen35.py) keeps every notice."""
    for module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
    for logger in LIBRARY_LOGGERS:
        logging.getLogger(logger).setLevel(logging.ERROR)


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


__all__ = ["INPUT_ERRORS", "positive_int", "quiet_library_notices", "run_tool", "run_conversion"]
