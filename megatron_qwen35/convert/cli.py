"""What the conversion command lines share: a failure is one `error: ...` line naming the culprit, exit code 2."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

INPUT_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError)  # bad input, already named in the message


def run_conversion(convert: Callable[[], object]) -> int:
    """Run `convert`; print where it wrote (exit 0) or the input error (exit 2)."""
    try:
        out = convert()
    except INPUT_ERRORS as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a read-only or vanished directory
        where = f" ({e.filename})" if e.filename else ""
        hint = "; free space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"error: {e.strerror or e}{where} while converting; the output directory was not created{hint}",
              file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
