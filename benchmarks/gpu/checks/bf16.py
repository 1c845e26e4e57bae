"""bf16_forward and bf16_backward: the fp32 model (local backend, torch GDN path) against the same weights in bf16
under megatron's Float16Module (Transformer Engine where it runs, else local), copied through a saved checkpoint
loaded with strict key matching: relative max |delta logit|, KL(fp32 || bf16) per token, top-1 agreement; then a bf16
forward + backward, and A_log / the GDN norm weight (and their gradients) still fp32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..batches import token_batch
from ..environment import DRY_RUN, empty_cache
from ..models import best_backend, build, copy_through_checkpoint, forward_backward, preset, reference
from ..reporting import relative_error, report
from ..shapes import SHAPES
from ..tolerances import BF16_MAX_KL, BF16_MAX_REL_LOGIT, BF16_MIN_TOP1

NAME = "bf16_forward"

# What stays fp32 in a bf16 model (the released checkpoints' fp32 tensors). Spelled out rather than read from
# layers.gated_delta_net.FP32_PARAMETERS, so that emptying that list fails here.
FP32_IN_BF16 = ("self_attention.A_log", "self_attention.out_norm.weight")


def run() -> None:
    from megatron.core.transformer.module import Float16Module

    backend = best_backend()
    for preset_name in SHAPES.bf16_presets:
        cfg = preset(preset_name)
        ref = reference(cfg, seed=0)
        # Under the interpreter FLA cannot compute bf16 (fla_vs_torch): the dry run's bf16 model takes the torch path.
        model = build(cfg, dtype=torch.bfloat16, backend=backend, deterministic_mode=DRY_RUN)
        copy_through_checkpoint(ref, cfg, model)
        model = Float16Module(model.config, model)  # module.bfloat16(), as megatron.training wraps it
        name = f"bf16_forward {preset_name} backend={backend} gdn={'torch' if DRY_RUN else 'fla'}"

        ids, pos, _ = token_batch(cfg, seed=1)
        with torch.no_grad():
            want = ref(ids, pos, None).float()
            got = model(ids, pos, None).float()
        rel = relative_error(got, want)
        kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        ok = rel <= BF16_MAX_REL_LOGIT and kl.item() <= BF16_MAX_KL and top1 >= BF16_MIN_TOP1
        report(name, f"tokens={SHAPES.model_tokens} rel_max_dlogit={rel:.1e} (<= {BF16_MAX_REL_LOGIT:.0e}) "
                     f"kl_per_token={kl.item():.1e} (<= {BF16_MAX_KL:.0e}) top1={top1:.4f} (>= {BF16_MIN_TOP1})", ok)

        _, loss = forward_backward(model, cfg, seed=1)
        params = dict(model.module.named_parameters())
        fp32 = {n: p for n, p in params.items() if n.endswith(FP32_IN_BF16)}
        no_grad = [n for n, p in params.items() if p.grad is None]
        not_finite = [n for n, p in params.items() if p.grad is not None and not p.grad.isfinite().all()]
        wrong_dtype = [n for n, p in params.items() if p.grad is not None
                       and {p.dtype, p.grad.dtype} != {torch.float32 if n in fp32 else torch.bfloat16}]
        expected_fp32 = len(FP32_IN_BF16) * sum(t == "linear_attention" for t in cfg.layer_types)
        ok = (math.isfinite(loss.item()) and not no_grad and not not_finite and not wrong_dtype
              and len(fp32) == expected_fp32)
        problems = "".join(f" {label}={names[:3]}" for label, names in
                           (("no_grad", no_grad), ("not_finite", not_finite), ("wrong_dtype", wrong_dtype)) if names)
        report(f"bf16_backward {preset_name} backend={backend}",
               f"loss={loss.item():.3f} params={len(params)} fp32_params={len(fp32)}/{expected_fp32} "
               f"(A_log, out_norm.weight; grads fp32){problems}", ok)
        del ref, model
        empty_cache()
