"""The GPU checks in one run: FLA against the torch path, bf16 against fp32, TE against local, generation, speed.

    python benchmarks/gpu_checks.py            # a session with a CUDA device
    python benchmarks/gpu_checks.py --dry-run  # CI: every check on CPU, small shapes, FLA under Triton's interpreter

The launcher of the package benchmarks/gpu/ (its docstring lists the checks and its files). Prints one
`check <name> ... ok|FAIL` line per result (`... skipped: <why>` where it cannot run) and a summary; exits 1 if any
check fails or raises.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks.gpu and megatron_qwen35

# Importing the package sets the environment up (--dry-run, CUDA_VISIBLE_DEVICES, TF32, Triton's interpreter) before
# torch and triton load: nothing above may import them.
from benchmarks.gpu.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
