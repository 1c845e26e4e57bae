"""LoRA in the layout matrix (tests/parallel/test_layout_matrix.py's harness: megatron DDP, its schedules, our
forward_step, finalize_model_grads): the tiny hybrid MoE + MTP model with an adapter on every linear of the language
model, each routed expert its own, and the routers', gives the single process's loss and every adapter gradient at
TP2 + SP, PP2, EP2 (the experts' adapters split with their experts), CP2 and DP2. The recipe runs these layouts too
(tests/parallel/test_lora_layouts.py), where only the loss and the gradient norm can be read.

The adapters hold random A and B (a zero B, as peft starts, would leave every A without a gradient), saved with the
base by the single process; every layout loads both from that checkpoint.
"""

import pytest
import torch

from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint
from megatron_qwen35.lora import LoRASettings, apply_lora, lora_parameters
from tests.parallel import test_layout_matrix as matrix

pytestmark = pytest.mark.slow

LORA = LoRASettings(rank=4, alpha=8, router=True)
LAYOUTS = {name: {**lay, "run": {"lora": LORA}} for name, lay in {
    "tp2_sp": dict(tp=2, sp=True, etp=1),  # routed experts' adapters need expert-TP 1
    "pp2": dict(pp=2),
    "ep2": dict(ep=2),
    "cp2": dict(cp=2),
    "dp2": dict(),
}.items()}


def _adapter_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint of the LoRA model, by their one-process names."""
    cfg, model = matrix._single_model()
    apply_lora(model, cfg, LORA)
    load_checkpoint(model, ckpt_dir)
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, megatron_single_process):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    root = tmp_path_factory.mktemp("lora_matrix")
    torch.manual_seed(13)
    model_parallel_cuda_manual_seed(13)
    cfg, model = matrix._single_model()
    apply_lora(model, cfg, LORA)
    with torch.no_grad():
        for p in model.parameters():  # the base away from its init, and B away from zero
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(model, cfg, root / "weights")
    loss = matrix._run_layout({}, str(root / "weights"), str(root / "ref"), lora=LORA)
    grads = _adapter_tensors(root / "ref")
    assert any(".experts." in n for n in grads) and any(".router.lora." in n for n in grads)
    assert all(g.abs().max().item() > 0 for g in grads.values())  # every adapter, A included, has a gradient
    return dict(root=root, loss=loss, grads=grads)


@pytest.fixture(scope="module")
def layouts(reference):
    return matrix._run_matrix(reference["root"], LAYOUTS, 2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_gives_the_single_process_loss_and_every_adapter_gradient(name, reference, layouts):
    """(Under EP2 and CP2 each rank's loss is its own micro-batches' or tokens' share, which the harness averages
    as it does for the full model's layouts.)"""
    matrix._check_loss(matrix._losses(layouts, name), LAYOUTS[name], reference["loss"], 2)
    matrix._check_grads(reference["root"] / name, reference["grads"], load=_adapter_tensors)
