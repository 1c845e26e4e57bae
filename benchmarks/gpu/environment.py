"""What the checks decide before torch and triton are imported, and the device they run on.

The package's `__init__` imports this module before anything else, so every entry into the package (the launcher
`benchmarks/gpu_checks.py`, a test importing one check) sets the environment up before torch or triton load: both
read it when they do.
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv[1:]  # decided before torch and triton are imported: both read the environment
if DRY_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU node: megatron's GDN puts conv1d/A_log/dt_bias on
    # the current CUDA device whatever use_cpu_initialization says, and the config turns on CUDA-only fusions
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# fp32 GEMMs stay fp32 in every NVIDIA library: Transformer Engine runs all-fp32 GEMMs in TF32 (cuBLASLt
# COMPUTE_32F_FAST_TF32), which would make check te_vs_local a TF32 comparison. Triton's tl.dot (FLA) ignores it; bf16
# is bf16.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

if DRY_RUN:  # FLA's real kernels on CPU tensors; must come before anything imports triton (megatron-core does)
    from megatron_qwen35.runtime.triton_interpreter import enable_triton_interpreter

    enable_triton_interpreter()

import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not DRY_RUN else "cpu")

# The FLA kernels each check sends DEVICE tensors to (names of megatron_qwen35.layers.gdn_ops.fla.kernel).
TRAINING_KERNELS = ("chunk_gated_delta_rule", "causal_conv1d")
DECODE_KERNELS = ("fused_recurrent_gated_delta_rule", "causal_conv1d_update")


def fla_reachable(*names: str) -> bool:
    """Whether gdn_ops sends a DEVICE tensor to FLA's kernels `names` (else both sides of a comparison would be the
    torch path, and equal): `fla.kernel` gives the kernel, neither None (the PyTorch path) nor FLAUnavailable."""
    from megatron_qwen35.layers.gdn_ops import FLAUnavailable, fla

    probe = torch.zeros(1, device=DEVICE)
    try:
        return all(fla.kernel(name, probe, kernels="fla", deterministic=False) is not None for name in names)
    except FLAUnavailable:
        return False


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
