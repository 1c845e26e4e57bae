"""The vision tower at TP2 and inside a CP2 model equals the single process: output and every parameter gradient;
with LoRA adapters on every linear (`--lora-vision`), at TP2, output and every adapter gradient.

Each rank loads the weights the single process saved (transformers' random tower, converted), runs the image and
the two-frame video of tests/test_vision.py forward and a fixed linear loss backward, and saves its gradients as a
checkpoint; megatron's resharding reassembles the TP shards, which the parent compares with the single process's.
No gradient is reduced by hand: under TP every replicated parameter (patch embedding, position table, norms) already
gets its whole gradient on every rank, because each column-parallel linear all-reduces its input's gradient. Under
CP the tower ignores the text model's CP group: every rank encodes all the images itself.
"""

import pytest
import torch

from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint
from megatron_qwen35.config import qwen35_preset
from megatron_qwen35.convert.model_state import load_hf_vision_state_dict, megatron_named_tensors
from tests.parallel.harness import run_distributed
from tests.test_vision import GRID, _pixels, _tower, reference_tower

PRESET = "tiny-vl"
REL_TOL = 1e-5  # fp32, relative to the largest entry: TP splits and reorders the sums (seen ~1e-7)
LAYOUTS = {"tp2": dict(tensor_parallel=2), "cp2": dict(context_parallel=2), "tp2_lora": dict(tensor_parallel=2)}
LORA = dict(rank=4, alpha=8.0, vision=True)


def _adapted(tower, cfg):
    """LoRA on every linear of `tower`, through apply_lora as the VL model gets it (the tower as `vision_model`): the
    base frozen, each adapter's B random (all zero, A's gradient would be too), the same in every layout."""
    from megatron_qwen35.lora import LoRASettings, adapter_whole_shapes, apply_lora, load_adapter_tensors

    holder = torch.nn.Module()
    holder.vision_model = tower
    apply_lora(holder, cfg, LoRASettings(**LORA))
    g = torch.Generator().manual_seed(7)
    shapes = adapter_whole_shapes(holder)
    load_adapter_tensors(holder, {n: torch.randn(s, generator=g) * 0.1 for n, s in sorted(shapes.items())})
    return tower


def _loss(tower, cfg):
    """The merged tokens and a loss that weighs each of their entries differently."""
    out = tower(_pixels(cfg), GRID)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return out, (out * weights).sum()


def _rank(rank, world, layout, weights_dir, grads_dir, lora):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(**layout)
    cfg = qwen35_preset(PRESET)
    tower = _tower(cfg, tensor_parallel=layout.get("tensor_parallel", 1))
    if lora:
        _adapted(tower, cfg)
    load_checkpoint(tower, weights_dir)
    out, loss = _loss(tower, cfg)
    loss.backward()
    with torch.no_grad():
        for p in tower.parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    save_checkpoint(tower, cfg, grads_dir)
    return out.detach()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tower_output_and_gradients_equal_single_process(layout, tmp_path, megatron_single_process):
    """Every rank's merged tokens and every full parameter gradient (with LoRA: every adapter's, the base frozen)
    equal the single process's (relative 1e-5)."""
    lora = layout.endswith("_lora")
    cfg = qwen35_preset(PRESET)
    single = _tower(cfg)
    load_hf_vision_state_dict(single, cfg, reference_tower(cfg).state_dict())
    if lora:
        _adapted(single, cfg)
    save_checkpoint(single, cfg, tmp_path / "weights")
    want_out, loss = _loss(single, cfg)
    loss.backward()
    want = {n: t.grad.clone() for n, t in megatron_named_tensors(single).items() if t.grad is not None}
    assert all((".lora." in n) == lora for n in want) and len(want) > (0 if not lora else 4 * cfg.vision.depth)

    outs = run_distributed(_rank, 2, LAYOUTS[layout], str(tmp_path / "weights"), str(tmp_path / "grads"), lora)
    for rank, out in enumerate(outs):
        err = (out - want_out).abs().max().item()
        assert err <= REL_TOL * want_out.abs().max().item(), f"rank {rank}: max abs {err}"
    gathered = _tower(cfg)
    if lora:
        _adapted(gathered, cfg)
    load_checkpoint(gathered, tmp_path / "grads")
    got = {n: t for n, t in megatron_named_tensors(gathered).items() if n in want or t.requires_grad}
    assert set(got) == set(want)
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= REL_TOL * max(w.abs().max().item(), 1e-6), f"{name}: max abs {err}"
