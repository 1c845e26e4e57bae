"""Every bound the checks hold results to, each with its reason: the one place to read or change them.

Errors are relative, max|got - want| / max|want| per tensor (reporting.relative_error), unless a name says otherwise.
"""

from __future__ import annotations

import torch

# fla_vs_torch (FLA against the torch path), by where FLA runs and the inputs' dtype; generate uses the fp32 entry.
# No ("cpu", bfloat16) entry: Triton's interpreter cannot compute bf16 (fla_vs_torch skips it, saying why).
FLA_TOL = {
    # Triton's interpreter computes FLA's fp32 math in numpy fp32: only the summation order differs from the torch
    # path (measured up to 9.3e-7 at these shapes; tests/test_fla_interpreter.py saw 1.2e-5 on layer grads).
    ("cpu", torch.float32): 1e-4,
    # On a GPU, FLA's tl.dot on fp32 inputs runs in TF32 (each input rounded to 10 mantissa bits, 2^-11 relative)
    # with fp32 accumulation; the torch path is true fp32. A few roundings through the chunked recurrence: ~1e-3.
    ("cuda", torch.float32): 2e-3,
    # Same bf16 inputs on both sides, but FLA rounds its intermediates (WY u/w, chunk states h, the gradients
    # between kernels) to bf16 (2^-9 relative each) while the torch path keeps them fp32 and rounds only its
    # results; 32 chunks of recurrence compound these to ~1e-2. A wrong argument is off by O(1e-1..1).
    ("cuda", torch.bfloat16): 3e-2,
}

# bf16_forward (bf16 model against fp32, same weights). bf16 rounds every weight and activation (2^-9 relative);
# through the layers the logits move by ~1.5e-2 of their largest value, KL 2.4e-4, top-1 0.97-0.98 (tiny-moe, CPU).
# Bounds are a few times that. Measured on CPU: the GDN out_proj doubled gives 0.3 / KL 0.24 / top-1 0.63, the final
# norm without its +1 gives 0.97 / 3.2 / 0.03; A_log in bf16, or a 10% faster decay, stays inside the bf16 noise at
# this size, so bf16_backward checks the fp32 parameters by their dtype (exactly: no bound).
BF16_MAX_REL_LOGIT = 5e-2
BF16_MAX_KL = 5e-3  # nats per token, with logits spread to std ~3 (see models.spread_weights)
BF16_MIN_TOP1 = 0.95

# te_vs_local: both backends in fp32 (TF32 off, environment.py) with the torch GDN path: only summation orders
# differ (~1e-6).
TE_TOL = 1e-3

# vision, fp32: TE_TOL, for the same reason (Transformer Engine 2.20 runs fp32 THD attention in its unfused backend).
# bf16: each backend rounds the weights, activations and attention probabilities to bf16 (2^-9 relative) at its own
# places (TE: layer norm fused into the linear, fused attention with fp32 softmax; local: each op rounds its output),
# so the two differ from each other by about what either differs from fp32, up to twice that. Measured on CPU, the
# local bf16 tower against the fp32 one (weights at unit gain, vision.spread_tower_weights): 9.4e-3 (tiny-vl's tower)
# and 7.9e-3 (27b's ViT at depth 2, the GPU shapes' images and video); the bound is three times that. Measured there
# too, in fp32: one block's qkv, proj or fc1 bias dropped moves the features by 7e-2..1.3e-1, the merger's norm bias
# 1e-1, an input norm weight set to 1 2.7e-2..1.1e-1, the position table transposed 0.5-0.7: far outside the fp32
# bound, mostly outside the bf16 one, which is there to catch a bf16-only path (TE's fused attention, its casts).
VISION_FP32_TOL = TE_TOL
VISION_BF16_TOL = 3e-2

# generate: every greedy step's tokens equal (exact), log-probabilities within FLA_TOL's fp32 entry for DEVICE.
# stack_tflops: a measurement, no bound.
