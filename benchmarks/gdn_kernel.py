"""CPU forward+backward timing: our torch chunked gated delta rule vs transformers' reference.

Shape: B=1, T=4096, 16 heads, dk=dv=128, fp32. Both run in this process on the same inputs, after a
short warm-up, interleaved, best of a few repeats (interleaving keeps background load from favouring
one side).
The last line is `ratio <ours/transformers>`; the goal is <= 0.5.

Run: python benchmarks/gdn_kernel.py [--seq-len 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_qwen35.hf_reference import torch_chunk_gated_delta_rule  # noqa: E402
from megatron_qwen35.layers.gdn_ops import chunk_gated_delta_rule  # noqa: E402


def make_inputs(b: int, t: int, h: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, d, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen))  # log decay <= 0
    beta = torch.rand(b, t, h, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def time_fwd_bwd(fn, inputs) -> float:
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    out, _ = fn(*inputs)
    out.sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    reference = torch_chunk_gated_delta_rule()
    inputs = make_inputs(1, args.seq_len, args.heads, args.head_dim)
    candidates = {
        "ours": lambda *x: chunk_gated_delta_rule(*x, use_qk_l2norm=True),
        "transformers": lambda *x: reference(*x, use_qk_l2norm_in_kernel=True),
    }
    print(f"B=1 T={args.seq_len} H={args.heads} dk=dv={args.head_dim} fp32 threads={torch.get_num_threads()}")

    warmup_inputs = make_inputs(1, 512, args.heads, args.head_dim, seed=1)  # short: transformers is slow
    for fn in candidates.values():
        time_fwd_bwd(fn, warmup_inputs)
    best = {name: float("inf") for name in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            best[name] = min(best[name], time_fwd_bwd(fn, inputs))

    for name, seconds in best.items():
        print(f"{name:>12} fwd+bwd {seconds:.3f} s")
    print(f"ratio {best['ours'] / best['transformers']:.2f}")


if __name__ == "__main__":
    main()
