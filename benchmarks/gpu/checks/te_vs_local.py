"""te_vs_local (where Transformer Engine imports, on CUDA): one checkpoint loaded into the TE and the local model,
fp32: logits, loss and the gradient of every parameter, matched by checkpoint name (the names both backends save
under, from convert.names: TE fuses the input norms into its linears, so module names differ); then the same on one
packed (THD) sequence of three documents, as chat fine-tuning runs them, where each backend's packed logits must also
equal its documents run alone. Elsewhere (the dry run) the local model's packed logits against its documents alone
still run, which is the half of the packed check a CPU can do."""

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
    packed_forward_backward,
    parameters_by_checkpoint_name,
    preset,
    reference,
)
from ..reporting import fmt, relative_error, report, skip
from ..tolerances import TE_TOL

NAME = "te_vs_local"


def run() -> None:
    from megatron_qwen35.runtime import transformer_engine_available

    if not transformer_engine_available() or DEVICE.type != "cuda":
        _local_packed_documents_alone()
        _lora_local_vs_local()
        skip(NAME, "Transformer Engine not importable" if not transformer_engine_available()
             else "dry run (Transformer Engine runs on CUDA only)")
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
            for m in models.values():
                m.zero_grad(set_to_none=True)
            _packed(preset_name, cfg, models, te_names, names)
            for m in models.values():
                m.zero_grad(set_to_none=True)
            _lora(f"{NAME} {preset_name} lora", cfg, models)
            del models, results
            empty_cache()


def _packed(preset_name: str, cfg, models: dict, te_names: dict, names: dict) -> None:
    """TE's THD attention and the GDN layer's packed path on one packed sequence: TE against local (logits, loss,
    every gradient), and each backend's packed logits against its documents run alone."""
    results = {backend: packed_forward_backward(m, cfg, seed=4) for backend, m in models.items()}
    (te_logits, te_loss, te_alone), (logits, loss, alone) = results["te"], results["local"]
    grads = {k: relative_error(grad(te_names[k]), grad(names[k])) for k in names}
    worst = max(grads, key=grads.get)
    errs = {"logits": relative_error(te_logits, logits), "loss": relative_error(te_loss, loss), "grads": grads[worst],
            "te_alone": relative_error(te_logits, te_alone), "local_alone": relative_error(logits, alone)}
    report(f"{NAME} {preset_name} packed", f"{fmt(errs)} (worst {worst}) tol {TE_TOL:.0e}",
           max(errs.values()) <= TE_TOL)


def _lora(name: str, cfg, models: dict) -> None:
    """LoRA on every linear (the routers too on MoE) of both models, the same adapters with a random B: logits, loss
    and every adapter gradient, matched by the adapter's global name. On TE the adapters wrap its linears, reading
    the fused LayerNorm-linear's own norm of their input (lora/adapter.py: adapter_input) and the expert linears'
    group megatron keeps (linear_tp_group)."""
    from megatron_qwen35.lora import (
        LoRASettings,
        adapter_whole_shapes,
        apply_lora,
        load_adapter_tensors,
        lora_parameters,
    )

    settings = LoRASettings(rank=4, alpha=8.0, router=cfg.is_moe)
    for m in models.values():
        apply_lora(m, cfg, settings, seed=1)
    shapes = adapter_whole_shapes(next(iter(models.values())))
    g = torch.Generator().manual_seed(5)
    adapters = {n: (torch.randn(shape, generator=g) * 0.1).to(DEVICE) for n, shape in sorted(shapes.items())}
    for m in models.values():
        load_adapter_tensors(m, adapters)
    results = {backend: forward_backward(m, cfg, seed=6) for backend, m in models.items()}
    (a_logits, a_loss), (b_logits, b_loss) = results.values()
    a_params, b_params = (lora_parameters(m) for m in models.values())
    if a_params.keys() != b_params.keys():
        report(name, f"adapter names differ: {sorted(a_params.keys() ^ b_params.keys())[:3]}", False)
        return
    grads = {k: relative_error(grad(a_params[k]), grad(b_params[k])) for k in b_params}
    worst = max(grads, key=grads.get)
    errs = {"logits": relative_error(a_logits, b_logits), "loss": relative_error(a_loss, b_loss),
            "adapter_grads": grads[worst]}
    learning = sum(bool(grad(p).abs().max() > 0) for p in b_params.values())  # (an all-zero pair would match)
    report(name, f"{fmt(errs)} ({learning}/{len(grads)} adapter tensors with a gradient, worst {worst}) "
                 f"tol {TE_TOL:.0e}", max(errs.values()) <= TE_TOL and learning > 0)


def _lora_local_vs_local() -> None:
    """The LoRA comparison's code path where TE does not run: two local models (tiny-moe, routers adapted too)."""
    cfg = preset("tiny-moe")
    models = {b: build(cfg, dtype=torch.float32, backend="local", deterministic_mode=True) for b in ("a", "b")}
    copy_through_checkpoint(reference(cfg, seed=2), cfg, *models.values())
    _lora(f"{NAME} tiny-moe lora (local_vs_local)", cfg, models)
    del models
    empty_cache()


def _local_packed_documents_alone() -> None:
    """The local model's logits on one packed sequence equal its documents run alone (what a CPU can check of the
    packed comparison above, through the same batch and forward)."""
    cfg = preset("tiny")
    model = build(cfg, dtype=torch.float32, backend="local", deterministic_mode=True)
    copy_through_checkpoint(reference(cfg, seed=2), cfg, model)
    logits, _, alone = packed_forward_backward(model, cfg, seed=4)
    err = relative_error(logits, alone)
    report(f"{NAME} tiny packed (local only)", f"logits vs documents alone {err:.1e} tol {TE_TOL:.0e}", err <= TE_TOL)
    del model
    empty_cache()
