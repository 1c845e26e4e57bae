"""Triton's interpreter for FLA on a machine without a GPU: FLA's real Triton kernels run on CPU tensors.

Used by tests to hold flash-linear-attention's kernels (the ones a GPU runs) against `gdn_ops`' torch path, layer and
CP layout included. Written for fla-core 0.6.0 and triton 3.7.1.

Triton decides at `@triton.jit` time, from TRITON_INTERPRET, whether a kernel is compiled or interpreted (numpy, one
program instance after another: slow, keep sequences short). megatron-core imports triton through fla, so
`enable_triton_interpreter()` must run first thing in a fresh process. It then supplies the two things the
interpreter lacks for FLA's kernels, each marked below with what it replaces and when it can go:
- a timing for the autotuner, which otherwise benchmarks every config through the device driver (there is none);
- int32 loop indices: compiled Triton makes `i` in `for i in range(n)` an int32 scalar, the interpreter a Python
  int, and FLA's kernels call `i.to(tl.int64)`.
Nothing is patched until `enable_triton_interpreter()` runs, and GPU runs never call it.
"""

from __future__ import annotations

import builtins
import os
import sys
import types

__all__ = ["WRITTEN_FOR", "enable_triton_interpreter", "triton_interpreter_enabled"]

# The releases the two adaptations below were written and measured against (a test compares the installed ones).
WRITTEN_FOR = {"triton": "3.7.1", "fla-core": "0.6.0"}

_enabled = False


def triton_interpreter_enabled() -> bool:
    """Whether `enable_triton_interpreter()` has run in this process (Triton kernels then accept CPU tensors)."""
    return _enabled


def enable_triton_interpreter() -> None:
    """Run every Triton kernel in this process under Triton's interpreter, with the adaptations FLA needs.

    Must come before anything imports triton (fla, megatron-core's GDN, transformers' FLA check); idempotent.
    """
    global _enabled
    if _enabled:
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before enable_triton_interpreter() without TRITON_INTERPRET=1, so its kernels are "
            "already compiled ones; call enable_triton_interpreter() first thing in a fresh process (megatron-core "
            "and fla import triton)"
        )
    os.environ["TRITON_INTERPRET"] = "1"  # read at @triton.jit time; spawned children inherit it
    from triton.runtime import autotuner, interpreter

    # Replaces triton.runtime.autotuner.Autotuner._bench (triton 3.7.1), which times one config with
    # `driver.active.get_benchmarker()`: under the interpreter without a GPU that raises "0 active drivers".
    # Every config gets the same timing, so the autotuner keeps the first config of each kernel (any config
    # computes the same result, up to rounding). Can go when triton's autotuner skips benchmarking under
    # TRITON_INTERPRET (not reported upstream as far as we found).
    autotuner.Autotuner._bench = _same_timing_for_every_config

    # Wraps triton.runtime.interpreter.FunctionRewriter.rewrite_ast (triton 3.7.1), which turns a kernel (or a
    # @triton.jit helper it calls) into the Python function the interpreter runs. The wrapper gives that function
    # `_int32_range` as `range`: FLA 0.6.0's kernels call `.to(tl.int64)` on loop indices (chunk_o, chunk_delta_h,
    # wy_fast, chunk_fwd), which fails on the interpreter's Python ints ("'int' object has no attribute 'to'").
    # Only kernels see it: FLA's host code keeps the builtin (fla.utils.hardware loops over devices with range).
    # Can go when the interpreter yields tl.tensor loop indices as the compiler does, or FLA's kernels stop calling
    # methods on them (not reported upstream as far as we found).
    rewrite_ast = interpreter.FunctionRewriter.rewrite_ast
    interpreter.FunctionRewriter.rewrite_ast = lambda self: _with_int32_range(rewrite_ast(self))
    _enabled = True


def _same_timing_for_every_config(self, *args, config, **meta) -> list[float]:
    """Stand-in for Autotuner._bench: the (median, p20, p80) timing every config gets."""
    return [1.0, 1.0, 1.0]


def _int32_range(*bounds):
    """`range` inside an interpreted kernel: int32 scalar indices, as compiled Triton's loop indices are."""
    import triton.language as tl  # patched by the interpreter while a kernel runs; this runs only then

    return (tl.full((), i, tl.int32) for i in builtins.range(*bounds))


def _with_int32_range(kernel: types.FunctionType) -> types.FunctionType:
    """`kernel` over a copy of its module's globals in which `range` is `_int32_range`."""
    scope = dict(kernel.__globals__, range=_int32_range)
    copy = types.FunctionType(kernel.__code__, scope, kernel.__name__, kernel.__defaults__, kernel.__closure__)
    copy.__annotations__ = kernel.__annotations__  # the interpreter finds the tl.constexpr parameters here
    copy.__kwdefaults__ = kernel.__kwdefaults__
    return copy
