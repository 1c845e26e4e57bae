"""The GPU checks in one run (for a session that has a CUDA device): exactness of the FLA path, bf16, speed.

    python benchmarks/gpu_checks.py

1. FLA kernels (gdn_ops on CUDA tensors) against our torch path on the same inputs, fp32 and bf16, plain and packed.
2. bf16 forward of the tiny hybrid model on the GPU against the fp32 CPU model with the same weights.
3. Model TFLOP/s of a 4-layer 27b-shaped stack (3 GDN + 1 gated attention, dense MLP) at sequence 4096,
   forward + backward in bf16, divided by a bf16 matmul's TFLOP/s measured in the same run.
Prints one `check ...` line per result; exits non-zero if an exactness check fails.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _inputs(t, h=16, d=128, device="cuda", dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, t, h, d, generator=g) for _ in range(3))
    gate = -torch.rand(1, t, h, generator=g) * 0.5
    beta = torch.rand(1, t, h, generator=g)
    return [x.to(device=device, dtype=dtype if x.dim() == 4 else torch.float32) for x in (q, k, v, gate, beta)]


def check_fla_against_torch() -> bool:
    from megatron_qwen35.layers.gdn_ops import chunk_gated_delta_rule

    ok = True
    cu = torch.tensor([0, 700, 1500, 2048], dtype=torch.int32)
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):  # TF32 / bf16 inputs inside FLA's kernels
        for packed in (False, True):
            args = _inputs(2048, dtype=dtype)
            cuda_out, _ = chunk_gated_delta_rule(*args, cu_seqlens=cu.cuda() if packed else None)
            cpu_out, _ = chunk_gated_delta_rule(*[a.cpu() for a in args], cu_seqlens=cu if packed else None)
            err = (cuda_out.float().cpu() - cpu_out.float()).abs().max().item()
            ok &= err <= tol
            print(f"check fla_vs_torch dtype={str(dtype)[6:]} packed={packed} max_abs={err:.2e} tol={tol} "
                  f"{'ok' if err <= tol else 'FAIL'}", flush=True)
    return ok


def check_bf16_forward() -> bool:
    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel()
    cfg = qwen35_preset("tiny-moe")
    cpu = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True),
                           backend="local").eval()
    gpu = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True,
                                                         use_cpu_initialization=True), backend="local")
    gpu = gpu.to(device="cuda", dtype=torch.bfloat16).eval()
    gpu.load_state_dict({k: v for k, v in cpu.state_dict().items() if v is not None}, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 256))
    pos = torch.arange(256).expand(2, -1)
    with torch.no_grad():
        want = cpu(ids, pos, None)
        got = gpu(ids.cuda(), pos.cuda(), None).float().cpu()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    err = (got - want).abs().max().item()
    ok = agree >= 0.95
    print(f"check bf16_forward max_abs_logit={err:.3f} argmax_agreement={agree:.3f} {'ok' if ok else 'FAIL'}")
    return ok


def _time(fn, repeats=5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def stack_flops(cfg, seq: int, layer_types) -> float:
    """Forward matmul FLOPs of the layers (2 x MACs), attention scores included, for one sequence."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qk, v = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    gdn_proj = h * (2 * qk + 2 * v + 2 * cfg.linear_num_value_heads) + v * h
    gdn_core = 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim  # per token
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    attn_proj = h * (2 * nq * d + 2 * ng * d) + nq * d * h
    attn_core = 2 * nq * d * seq / 2  # causal: half the scores and values
    mlp = 3 * h * f
    total = 0.0
    for t in layer_types:
        per_token = (gdn_proj + gdn_core if t == "linear_attention" else attn_proj + attn_core) + mlp
        total += 2 * per_token * seq
    return total


def check_stack_tflops() -> None:
    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model

    seq = 4096
    cfg = qwen35_preset("27b").replace(num_layers=4, mtp_num_layers=0)
    tc = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=False)
    model = qwen35_gpt_model(cfg, tc, backend="local", pre_process=False, post_process=False).cuda()
    x = torch.randn(seq, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model.set_input_tensor(x)

    def step():
        out = model(None, None, None)
        out.float().square().mean().backward()

    t = _time(step, repeats=3)
    flops = 3 * stack_flops(cfg, seq, cfg.layer_types)  # forward + backward ~ 3x forward
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = _time(lambda: a @ a, repeats=10)
    model_tflops, mm_tflops = flops / t / 1e12, 2 * 8192 ** 3 / t_mm / 1e12
    print(f"check stack_27b_4layers seq={seq} model_tflops={model_tflops:.1f} bf16_matmul_tflops={mm_tflops:.1f} "
          f"ratio {model_tflops / mm_tflops:.3f}")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs a CUDA device")
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    ok = check_fla_against_torch()
    ok &= check_bf16_forward()
    check_stack_tflops()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
