"""fla_vs_torch: `gdn_ops.chunk_gated_delta_rule` and `causal_conv1d`, FLA's Triton kernels against the same call
with deterministic=True (the torch path), same inputs on the same device: fp32 and bf16, plain and packed (documents
not multiples of 64 tokens), 2x more value heads than key heads; the output and the gradients of every input
(backward of a fixed random projection of the output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batches import randn
from ..environment import DEVICE, TRAINING_KERNELS, fla_reachable
from ..reporting import errors, fmt, report, skip
from ..shapes import SHAPES
from ..tolerances import FLA_TOL

NAME = "fla_vs_torch"


def _project_backward(out: torch.Tensor) -> None:
    """Backward of a fixed random projection of `out` (every output element gets its own gradient)."""
    (out.float() * randn(*out.shape, seed=99)).sum().backward()


def _gdn_run(inputs: list[torch.Tensor], cu_seqlens, deterministic: bool) -> dict[str, torch.Tensor]:
    from megatron_qwen35.layers.gdn_ops import chunk_gated_delta_rule

    q, k, v, g, beta = (x.detach().clone().requires_grad_() for x in inputs)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, kernels="fla", deterministic=deterministic)
    _project_backward(o)
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad, "dbeta": beta.grad}


def _conv_run(inputs: list[torch.Tensor], cu_seqlens, deterministic: bool) -> dict[str, torch.Tensor]:
    from megatron_qwen35.layers.gdn_ops import causal_conv1d

    x, weight = (t.detach().clone().requires_grad_() for t in inputs)
    y = causal_conv1d(x, weight, cu_seqlens=cu_seqlens, activation="silu", kernels="fla", deterministic=deterministic)
    _project_backward(y)
    return {"y": y.detach(), "dx": x.grad, "dweight": weight.grad}


def _kernel_inputs(kernel: str, dtype: torch.dtype, packed: bool) -> list[torch.Tensor]:
    """The inputs of one kernel call, in `dtype` except the fp32 log decay g (as the model passes it)."""
    s = SHAPES
    b = 1 if packed else 2
    t, hk, h, d = s.tokens, s.key_heads, s.value_heads, s.head_dim
    if kernel == "conv":
        channels = (2 * hk + h) * d  # q, k and v channels, as the GDN layer convolves them
        return [randn(b, t, channels, seed=1, dtype=dtype), randn(channels, 4, seed=2, dtype=dtype) * 0.5]
    q, k = randn(b, t, hk, d, seed=3, dtype=dtype), randn(b, t, hk, d, seed=4, dtype=dtype)  # [b, t, hk, d]
    v = randn(b, t, h, d, seed=5, dtype=dtype)  # [b, t, h, d]
    g = F.logsigmoid(randn(b, t, h, seed=6) + 2.0)  # log decay in (-inf, 0), mostly near -0.1
    beta = torch.rand(b, t, h, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    return [q, k, v, g, beta]


def run() -> None:
    if not fla_reachable(*TRAINING_KERNELS):
        report(NAME, f"FLA's kernels do not run on {DEVICE.type} here (fla not importable?)", False)
        return
    cu_seqlens = torch.tensor(SHAPES.documents, dtype=torch.int32, device=DEVICE)
    for kernel, call in (("gdn", _gdn_run), ("conv", _conv_run)):
        for dtype in (torch.float32, torch.bfloat16):
            for packed in (False, True):
                name = f"{NAME} {kernel} {str(dtype)[6:]} {'packed' if packed else 'plain'}"
                tol = FLA_TOL.get((DEVICE.type, dtype))
                if tol is None:  # bf16 under the interpreter
                    skip(name, "Triton's interpreter (3.7.1) computes bf16 on the raw uint16 bits (its create_dot "
                               "and arithmetic do not convert them; errors ~1e10 measured)")
                    continue
                inputs = _kernel_inputs(kernel, dtype, packed)
                cu = cu_seqlens if packed else None
                errs = errors(call(inputs, cu, deterministic=False), call(inputs, cu, deterministic=True))
                worst = max(errs.values())
                report(name, f"{fmt(errs)} max {worst:.1e} tol {tol:.0e}", worst <= tol)
