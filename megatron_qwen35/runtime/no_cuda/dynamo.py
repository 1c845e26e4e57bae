"""torch.compile off: megatron.core.jit's ``jit_fuser`` is torch.compile, bound at import time in many modules.

Compiling on the CPU needs a C toolchain, costs seconds a function and changes no number.
"""

from __future__ import annotations

import os


def patch_disable_dynamo() -> None:
    # megatron.core.jit.jit_fuser is torch.compile and was bound at import time in many modules;
    # compiling on CPU needs a C toolchain and is slow, so turn dynamo off (same as
    # TORCHDYNAMO_DISABLE=1, which tests also export before importing torch).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo

    torch._dynamo.config.disable = True
