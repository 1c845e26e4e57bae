"""The vision tower at TP2 and inside a CP2 model equals the single process: output and every parameter gradient.

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
LAYOUTS = {"tp2": dict(tensor_parallel=2), "cp2": dict(context_parallel=2)}


def _loss(tower, cfg):
    """The merged tokens and a loss that weighs each of their entries differently."""
    out = tower(_pixels(cfg), GRID)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return out, (out * weights).sum()


def _rank(rank, world, layout, weights_dir, grads_dir):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(**layout)
    cfg = qwen35_preset(PRESET)
    tower = _tower(cfg, tensor_parallel=layout.get("tensor_parallel", 1))
    load_checkpoint(tower, weights_dir)
    out, loss = _loss(tower, cfg)
    loss.backward()
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(p.grad)
    save_checkpoint(tower, cfg, grads_dir)
    return out.detach()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tower_output_and_gradients_equal_single_process(layout, tmp_path, megatron_single_process):
    """Every rank's merged tokens and every full parameter gradient equal the single process's (relative 1e-5)."""
    cfg = qwen35_preset(PRESET)
    single = _tower(cfg)
    load_hf_vision_state_dict(single, cfg, reference_tower(cfg).state_dict())
    save_checkpoint(single, cfg, tmp_path / "weights")
    want_out, loss = _loss(single, cfg)
    loss.backward()
    want = {n: t.grad.clone() for n, t in megatron_named_tensors(single).items()}

    outs = run_distributed(_rank, 2, LAYOUTS[layout], str(tmp_path / "weights"), str(tmp_path / "grads"))
    for rank, out in enumerate(outs):
        err = (out - want_out).abs().max().item()
        assert err <= REL_TOL * want_out.abs().max().item(), f"rank {rank}: max abs {err}"
    gathered = _tower(cfg)
    load_checkpoint(gathered, tmp_path / "grads")
    got = megatron_named_tensors(gathered)
    assert set(got) == set(want)
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= REL_TOL * max(w.abs().max().item(), 1e-6), f"{name}: max abs {err}"
