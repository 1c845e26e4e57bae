"""te_vs_local (where Transformer Engine imports, on CUDA): one checkpoint loaded into the TE and the local model,
fp32: logits, loss and the gradient of every parameter, matched by checkpoint name (the names both backends save
under, from convert.names: TE fuses the input norms into its linears, so module names differ)."""

from __future__ import annotations

import os
from unittest import mock

import torch

from ..environment import DEVICE, empty_cache
from ..models import (
    build,
    copy_through_checkpoint,
    forward_backward,
    grad,
    key_difference,
    parameters_by_checkpoint_name,
    preset,
    reference,
)
from ..reporting import fmt, relative_error, report, skip
from ..tolerances import TE_TOL

NAME = "te_vs_local"


def run() -> None:
    from megatron_qwen35.runtime import transformer_engine_available

    if not transformer_engine_available():
        skip(NAME, "Transformer Engine not importable")
        return
    if DEVICE.type != "cuda":
        skip(NAME, "dry run (Transformer Engine runs on CUDA only)")
        return
    # Both models take the torch GDN path (FLA's TF32 dots would round the backends' tiny differences unevenly);
    # megatron refuses TE attention under deterministic_mode unless TE is told to pick deterministic algorithms.
    with mock.patch.dict(os.environ, NVTE_ALLOW_NONDETERMINISTIC_ALGO="0"):
        for preset_name in ("tiny", "tiny-moe"):  # tiny: fused pre-MLP norm; tiny-moe: TE linears in the experts
            cfg = preset(preset_name)
            source = reference(cfg, seed=2)
            models = {backend: build(cfg, dtype=torch.float32, backend=backend, deterministic_mode=True)
                      for backend in ("te", "local")}
            copy_through_checkpoint(source, cfg, *models.values())
            del source
            results = {backend: forward_backward(m, cfg, seed=3) for backend, m in models.items()}
            (te_logits, te_loss), (logits, loss) = results["te"], results["local"]
            te_names, names = (parameters_by_checkpoint_name(models[b]) for b in ("te", "local"))
            differ = key_difference(te_names, names, "TE", "local")
            if differ:
                report(f"{NAME} {preset_name}", differ, False)
                continue
            grads = {k: relative_error(grad(te_names[k]), grad(names[k])) for k in names}
            worst = max(grads, key=grads.get)
            errs = {"logits": relative_error(te_logits, logits), "loss": relative_error(te_loss, loss),
                    "grads": grads[worst]}
            report(f"{NAME} {preset_name}", f"{fmt(errs)} ({len(grads)} params, worst {worst}) tol {TE_TOL:.0e}",
                   max(errs.values()) <= TE_TOL)
            del models, results
            empty_cache()
