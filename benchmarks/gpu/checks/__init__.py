"""One module per check, each with its `NAME` (the line a raising check is reported under) and `run()` (prints its
check lines through reporting.report / skip). The runner runs them in the order of `CHECKS`."""

from . import bf16, fla_vs_torch, generate, stack_tflops, te_vs_local, vision

CHECKS = (fla_vs_torch, bf16, te_vs_local, generate, vision, stack_tflops)

__all__ = ["CHECKS"]
