"""stack_tflops (CUDA only): model TFLOP/s of a 4-layer 27b-shaped stack (3 GDN + 1 gated attention, dense MLP) at
sequence 4096, forward + backward in bf16, divided by a bf16 matmul's TFLOP/s measured in the same run."""

from __future__ import annotations

import math
import time

import torch

from ..environment import DEVICE
from ..models import best_backend, transformer_config
from ..reporting import report, skip

NAME = "stack_tflops"


def _time(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs, after one warm-up (Triton autotuning, cuBLAS heuristics)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def stack_flops(cfg, seq: int, layer_types) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) of the decoder layers for one sequence, attention scores included;
    no embedding or output layer. Per token: the projections' weights, the GDN recurrence (4 dk x dv per value head:
    S^T k, k delta^T, S^T q plus the decay), attention's q k^T and p v over seq / 2 keys on average (causal)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qk, v = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    gdn_proj = h * (2 * qk + 2 * v + 2 * cfg.linear_num_value_heads) + v * h  # in_proj [q k | v z | b a], out_proj
    gdn_core = 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    attn_proj = h * (2 * nq * d + 2 * ng * d) + nq * d * h  # linear_qkv [q gate | k v], linear_proj
    attn_core = 2 * nq * d * seq / 2
    mlp = 3 * h * f  # swiglu: fc1 to 2f, fc2 back
    total = 0.0
    for t in layer_types:
        per_token = (gdn_proj + gdn_core if t == "linear_attention" else attn_proj + attn_core) + mlp
        total += 2 * per_token * seq
    return total


def run() -> None:
    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.provider import qwen35_gpt_model

    if DEVICE.type != "cuda":
        skip(NAME, "dry run (timings need CUDA)")
        return
    seq, backend = 4096, best_backend()
    cfg = qwen35_preset("27b").replace(num_layers=4, mtp_num_layers=0)  # layer 4 is gated attention
    tc = transformer_config(cfg, dtype=torch.bfloat16, backend=backend)
    model = qwen35_gpt_model(cfg, tc, backend=backend, pre_process=False, post_process=False).to(DEVICE)
    x = torch.randn(seq, 1, cfg.hidden_size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    model.set_input_tensor(x)

    def step():
        model(None, None, None).float().square().mean().backward()

    t = _time(step, repeats=3)
    flops = 3 * stack_flops(cfg, seq, cfg.layer_types)  # forward + backward ~ 3x forward
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    t_mm = _time(lambda: a @ a, repeats=10)
    model_tflops, mm_tflops = flops / t / 1e12, 2 * 8192 ** 3 / t_mm / 1e12
    report(NAME, f"27b-shaped {''.join('G' if t == 'linear_attention' else 'A' for t in cfg.layer_types)} "
                 f"seq={seq} backend={backend} step={t * 1e3:.1f}ms model_tflops={model_tflops:.1f} "
                 f"bf16_matmul_tflops={mm_tflops:.1f} ratio {model_tflops / mm_tflops:.3f}", None)
