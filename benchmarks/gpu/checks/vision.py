"""vision: one checkpoint of a VL model (tiny-vl's text model; on a GPU with 27b's ViT at depth 2) loaded into the
TE and the local model (local and local where TE is absent: the dry run checks the code path): the tower's merged
features for two images and a two-frame video of different sizes in fp32 and in bf16, then the whole model's
logits, loss and every parameter's gradient (the tower's included) on a batch holding them, fp32."""

from __future__ import annotations

import os
import tempfile
from unittest import mock

import torch

from ..batches import vl_batch
from ..environment import empty_cache
from ..models import (
    best_backend,
    build,
    fresh_loss_scales,
    grad,
    key_difference,
    parameters_by_checkpoint_name,
    preset,
    reference,
)
from ..reporting import fmt, relative_error, report
from ..shapes import SHAPES
from ..tolerances import VISION_BF16_TOL, VISION_FP32_TOL

NAME = "vision"


def spread_tower_weights(model) -> None:
    """The tower's weights at unit gain (std 1 / sqrt(fan in): megatron's init std of 0.02 leaves each block's
    contribution ~1e-2 of the residual stream, below the bf16 noise, so a broken block would hardly show), the
    position table at half the patch embeddings' scale, and LayerNorm weights and biases off their init (1 and 0,
    exact in any dtype), so that a norm or a bias one backend applied and the other did not shows. The tower's
    norms are plain LayerNorms, not zero-centred."""
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if name.endswith("pos_embed.weight"):
                param.normal_(0.0, 0.5)
            elif param.dim() > 1:  # linears [out, in], the patch Conv3d [out, C, T, P, P]
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            else:  # LayerNorm weights (the tower's only other 1-D parameters)
                param.normal_(1.0, 0.1)


def _tower_features(model, batch) -> torch.Tensor:
    """The tower's merged features of the batch's images, then of its video, fp32 [tokens, out_hidden]."""
    with torch.no_grad():
        return torch.cat([model.vision_model(batch["pixel_values"], batch["image_grid_thw"]),
                          model.vision_model(batch["pixel_values_videos"], batch["video_grid_thw"])]).float()


def run() -> None:
    """A TE model and a local one (two local ones where TE is absent) load one VL checkpoint; their towers encode the
    same images and video in fp32 and in bf16, then the fp32 models run forward and backward on a batch holding
    them."""
    from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint

    backend = best_backend()
    pair = f"{backend}_vs_local"
    cfg = preset(SHAPES.vl_preset)
    batch = vl_batch(cfg, seed=8)
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}

    def loaded(dtype):  # (candidate, local reference) from the checkpoint, strict key matching
        models = tuple(build(cfg, dtype=dtype, backend=b, deterministic_mode=True) for b in (backend, "local"))
        for model in models:
            load_checkpoint(model, ckpt, strict=True)
        return models

    # As te_vs_local: the torch GDN path on both sides, and TE told to pick deterministic attention algorithms.
    with mock.patch.dict(os.environ, NVTE_ALLOW_NONDETERMINISTIC_ALGO="0"), \
            tempfile.TemporaryDirectory(prefix="gpu_checks_") as ckpt:
        source = reference(cfg, seed=7)
        spread_tower_weights(source)
        save_checkpoint(source, cfg, ckpt)
        fp32_features = _tower_features(source, batch)
        del source
        for dtype, tol in ((torch.float32, VISION_FP32_TOL), (torch.bfloat16, VISION_BF16_TOL)):
            candidate, ref = loaded(dtype)
            got, want = _tower_features(candidate, batch), _tower_features(ref, batch)
            errs = {pair: relative_error(got, want)}
            if dtype == torch.bfloat16:  # each against the fp32 tower: the bf16 noise that the bound is sized by
                errs.update({f"{backend}_vs_fp32": relative_error(got, fp32_features),
                             "local_ref_vs_fp32": relative_error(want, fp32_features)})
            report(f"vision tower {str(dtype)[6:]} {pair}",
                   f"{SHAPES.vl_preset} tokens={got.shape[0]} {fmt(errs)} tol {tol:.0e}",
                   max(errs.values()) <= tol)
            del candidate, ref
            empty_cache()

        results = []
        for model in loaded(torch.float32):
            with torch.no_grad():
                logits = model(batch["input_ids"], batch["position_ids"], None, **vision).float()
            fresh_loss_scales()
            loss = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"], **vision)
            loss.float().mean().backward()
            results.append((logits, loss.detach().float().mean(), parameters_by_checkpoint_name(model)))
    (logits, loss, names), (want_logits, want_loss, want_names) = results
    name = f"vision model {pair}"
    differ = key_difference(names, want_names, backend, "local")
    if differ:
        report(name, differ, False)
        return
    grads = {k: relative_error(grad(names[k]), grad(want_names[k])) for k in want_names}
    worst = max(grads, key=grads.get)
    tower = [k for k in grads if k.startswith("vision_model.")]
    errs = {"logits": relative_error(logits, want_logits), "loss": relative_error(loss, want_loss),
            "grads": grads[worst], "tower_grads": max(grads[k] for k in tower)}
    report(name, f"{SHAPES.vl_preset} fp32 tokens={tuple(batch['input_ids'].shape)} {fmt(errs)} "
                 f"({len(grads)} params, {len(tower)} in the tower, worst {worst}) tol {VISION_FP32_TOL:.0e}",
           max(errs.values()) <= VISION_FP32_TOL)
