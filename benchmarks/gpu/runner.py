"""The entry point: parses the command line, applies megatron_qwen35's run-time patches, sets up a one-rank
parallel state, runs every check (an exception is that check's FAIL, the next one still runs), prints the summary and
returns the exit code (1 if any check failed or raised)."""

from __future__ import annotations

import argparse
import time
import traceback

import torch

from . import __doc__ as PACKAGE_DOC
from .checks import CHECKS
from .environment import DEVICE, DRY_RUN, empty_cache
from .reporting import RESULTS, report


def run_check(name: str, check) -> float:
    """Run one check and return its seconds; an exception is that check's FAIL (its traceback on stderr), and the
    next check still runs."""
    start = time.perf_counter()
    try:
        check()
    except Exception as e:  # every failure is reported, none stops the run
        traceback.print_exc()
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        report(name, f"raised {type(e).__name__}: {first_line}", False)
        empty_cache()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only, small shapes, FLA under Triton's interpreter (read before parsing)")
    parser.parse_args(argv)
    if DEVICE.type != "cuda" and not DRY_RUN:
        raise SystemExit("gpu_checks.py needs a CUDA device; on CPU run it with --dry-run")
    import logging
    import warnings

    # megatron's and Triton's deprecation and CPU notices (GPTModel, async save, no APEX) drown the check lines
    warnings.simplefilter("ignore")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    # gdn_ops' notice that a tensor Triton could run takes the PyTorch path: here that path is every comparison's
    # deliberate reference (deterministic=True, deterministic_mode), not a slow run to warn about
    logging.getLogger("megatron_qwen35.layers.gdn_ops.fla").setLevel(logging.ERROR)
    from megatron_qwen35.runtime import apply_runtime_patches, initialize_parallel

    start = time.perf_counter()
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device {device_name} torch {torch.__version__} dry_run={DRY_RUN} threads={torch.get_num_threads()}",
          flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch references are fp32 (torch's cuDNN default is TF32)
    torch.backends.cudnn.allow_tf32 = False
    apply_runtime_patches()  # an entry point: the register's patches before any model is built
    initialize_parallel(seed=1234)
    seconds = {check.NAME: run_check(check.NAME, check.run) for check in CHECKS}
    failed = RESULTS.count("FAIL")
    print(f"summary: {RESULTS.count('ok')} ok, {failed} FAIL, {RESULTS.count('skipped')} skipped, "
          f"{RESULTS.count('measured')} measured in {time.perf_counter() - start:.0f} s ("
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ")", flush=True)
    return 1 if failed else 0
