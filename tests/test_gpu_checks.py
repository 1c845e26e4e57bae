"""benchmarks/gpu_checks.py --dry-run, as CI runs it: every check's code path on CPU, FLA's kernels under Triton's
interpreter. What needs a GPU (bf16 inside FLA, Transformer Engine, timings) is reported as skipped, never as ok.
The launcher runs the package benchmarks/gpu/; its bounds live in benchmarks/gpu/tolerances.py only."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "benchmarks" / "gpu"

# (start of a `check` line, how it must end): one entry per line the dry run prints
EXPECTED = [
    *((f"check fla_vs_torch {kernel} float32 {layout} ", " ok") for kernel in ("gdn", "conv")
      for layout in ("plain", "packed")),
    *((f"check fla_vs_torch {kernel} bfloat16 {layout} skipped: ", "") for kernel in ("gdn", "conv")
      for layout in ("plain", "packed")),
    ("check bf16_forward tiny-moe backend=local gdn=torch ", " ok"),
    ("check bf16_backward tiny-moe backend=local ", " ok"),
    ("check te_vs_local tiny packed (local only) ", " ok"),  # packed logits == the documents alone
    ("check te_vs_local tiny-moe lora (local_vs_local) ", " ok"),  # LoRA's comparison, its code path
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


def test_without_dry_run_on_a_machine_without_cuda_exits_1_naming_the_flag():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_checks.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    assert "gpu_checks.py needs a CUDA device; on CPU run it with --dry-run" in proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("check ")]


def test_every_bound_comes_from_tolerances():
    """No module of the package but tolerances.py compares a result with a float literal: a bound written in a check
    would escape the one table of bounds and their reasons."""
    literals = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "tolerances.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals += [f"{path.relative_to(ROOT)}:{node.lineno}" for operand in [node.left, *node.comparators]
                             if isinstance(operand, ast.Constant) and isinstance(operand.value, float)]
    assert not literals, literals
