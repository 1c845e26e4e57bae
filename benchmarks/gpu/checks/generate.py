"""generate: greedy generation of a left-padded batch (tiny-moe, local backend) on DEVICE through gdn_ops' kernel
choice (FLA's chunked kernel and conv with states for the prompts, its fused recurrent kernel and conv update for each
token) against the same weights with deterministic_mode (the torch path), same device: every step's tokens equal,
log-probabilities within fla_vs_torch's fp32 bound."""

from __future__ import annotations

import torch

from ..environment import DECODE_KERNELS, DEVICE, TRAINING_KERNELS, fla_reachable
from ..models import build, copy_through_checkpoint, preset, reference
from ..reporting import relative_error, report
from ..tolerances import FLA_TOL

NAME = "generate"


def run() -> None:
    from megatron_qwen35.inference import Qwen35CausalLM, generate, left_padded

    if not fla_reachable(*TRAINING_KERNELS, *DECODE_KERNELS):
        report(NAME, f"FLA's kernels do not run on {DEVICE.type} here (fla not importable?)", False)
        return
    cfg = preset("tiny-moe")
    ref = reference(cfg, seed=5)
    candidate = build(cfg, dtype=torch.float32, backend="local", apply_rope_fusion=False)
    copy_through_checkpoint(ref, cfg, candidate)
    gen = torch.Generator().manual_seed(6)
    lengths = (9, 70) if DEVICE.type == "cpu" else (9, 700, 1500)  # one prompt within a 64-token chunk, others across
    input_ids, attention_mask = left_padded([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
                                             for n in lengths])
    new_tokens = 4 if DEVICE.type == "cpu" else 64
    runs = [generate(Qwen35CausalLM(model, cfg).eval(), input_ids.to(DEVICE), new_tokens,
                     attention_mask=attention_mask.to(DEVICE), return_logprobs=True)
            for model in (candidate, ref)]
    (tokens, logprobs), (want_tokens, want_logprobs) = runs
    same = int((tokens == want_tokens).all(dim=0)[input_ids.shape[1]:].sum())  # steps where every row agrees
    error = relative_error(logprobs, want_logprobs)
    tol = FLA_TOL[(DEVICE.type, torch.float32)]
    report(NAME, f"tiny-moe backend=local prompts={lengths} steps_equal={same}/{new_tokens} "
           f"logprobs={error:.1e} tol {tol:.0e}", same == new_tokens and error <= tol)
