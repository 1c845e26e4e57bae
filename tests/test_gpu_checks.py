"""benchmarks/gpu_checks.py --dry-run, as CI runs it: every check's code path on CPU, FLA's kernels under Triton's
interpreter. What needs a GPU (bf16 inside FLA, Transformer Engine, timings) is reported as skipped, never as ok."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (start of a `check` line, how it must end): one entry per line the dry run prints
EXPECTED = [
    *((f"check fla_vs_torch {kernel} float32 {layout} ", " ok") for kernel in ("gdn", "conv")
      for layout in ("plain", "packed")),
    *((f"check fla_vs_torch {kernel} bfloat16 {layout} skipped: ", "") for kernel in ("gdn", "conv")
      for layout in ("plain", "packed")),
    ("check bf16_forward tiny-moe backend=local gdn=torch ", " ok"),
    ("check bf16_backward tiny-moe backend=local ", " ok"),
    ("check te_vs_local skipped: ", ""),  # "Transformer Engine not importable" here; a TE node says "dry run"
    ("check generate tiny-moe backend=local ", " ok"),
    # TE against local where TE runs; here local against itself (the code path: batch, checkpoint, both dtypes)
    ("check vision tower float32 local_vs_local tiny-vl ", " ok"),
    ("check vision tower bfloat16 local_vs_local tiny-vl ", " ok"),
    ("check vision model local_vs_local tiny-vl fp32 ", " ok"),
    ("check stack_tflops skipped: ", ""),
]


@pytest.mark.slow
def test_dry_run_prints_every_check_and_passes_on_cpu():
    """The dry run exits 0 and prints each expected check line exactly once, with the expected ending (its exactness
    checks at the interpreter's fp32 bound, 1e-4 relative); no other check line, and a summary without failures."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_checks.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    checks = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    for start, end in EXPECTED:
        matching = [line for line in checks if line.startswith(start)]
        assert len(matching) == 1, f"{start!r}: {matching or 'missing'}\n{proc.stdout}"
        assert matching[0].endswith(end), matching[0]
    assert len(checks) == len(EXPECTED), proc.stdout
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 1 and " 0 FAIL," in summary[0], proc.stdout
