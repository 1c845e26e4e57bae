"""Packed chat sequences in the layout matrix (tests/parallel/test_layout_matrix.py's harness): the loss and every
full gradient of two packed micro-batches at TP2 + SP, PP2, EP2, CP2 (conversations crossing the CP ranks) and DP2
equal the single process's, as does every parameter after one Adam step at DP2 with the distributed optimizer; and the
single process's equal the same conversations one per sequence: the objective (per token over the global batch, MTP
included) does not depend on how conversations are packed. The MoE router's load-balancing loss is a statistic of the
tokens a micro-batch routes together, so the packed-vs-unpacked check runs without it; the layouts run with it."""

import json

import pytest
import torch

from megatron_qwen35.data.preprocess_sft import qwen35_preprocess_sft
from megatron_qwen35.data.sft_dataset import Qwen35SFTDataset, sft_samples
from tests.parallel import test_layout_matrix as matrix
from tests.parallel.test_sft_layouts import conversations

pytestmark = pytest.mark.slow

LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2), "ep2": dict(ep=2), "cp2": dict(cp=2), "dp2": dict(),
           # each rank one packed sequence, megatron DDP + the distributed optimizer: one Adam step
           "dp2_distopt": dict(run=dict(optimizer_step=True, distributed_optimizer=True))}
GRADIENT_LAYOUTS = [n for n, lay in LAYOUTS.items() if not lay.get("run", {}).get("optimizer_step")]


def _collated(sample: dict) -> dict:
    return {k: v.unsqueeze(0) for k, v in sample.items()}  # the data loader's batch of one


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The chat set as micro-batches: two packed sequences (aligned for CP2), and one conversation per sequence."""
    root = tmp_path_factory.mktemp("sft_matrix")
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    qwen35_preprocess_sft([root / "c.jsonl"], root / "sft", matrix._model_cfg())
    samples = sft_samples(root / "sft")
    seq = 704
    two = Qwen35SFTDataset(samples, list(range(len(samples))), seq, 2, align=4)
    alone = Qwen35SFTDataset(samples, list(range(len(samples))), seq, 4, pack=False)
    assert [len(s) for s in two.sequences] == [2, 2]
    return dict(seq=seq, packed=[_collated(two.sequence(s)) for s in two.sequences],
                alone=[_collated(alone.sequence(s)) for s in alone.sequences])


def _data(packed):
    return dict(sft_data_path="chats", seq_length=packed["seq"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, megatron_single_process, packed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_qwen35.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("sft_layouts")
    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    cfg, model = matrix._single_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(model, cfg, root / "weights")
    loss = matrix._run_layout({}, str(root / "weights"), str(root / "ref"), batches=packed["packed"],
                              data=_data(packed))
    matrix._run_layout({}, str(root / "weights"), str(root / "ref_step"), optimizer_step=True, batches=packed["packed"],
                       data=_data(packed))
    return dict(root=root, loss=loss, grads=matrix._load_named(root / "ref"))


def test_packed_micro_batches_give_the_gradients_of_one_conversation_per_sequence(reference, packed, monkeypatch):
    root = reference["root"]
    for name, batches in (("packed_no_aux", packed["packed"]), ("alone_no_aux", packed["alone"])):
        monkeypatch.setattr(matrix, "_transformer_config",
                            lambda cfg, lay, f=matrix._transformer_config: f(cfg, lay).__class__(
                                **{**f(cfg, lay).__dict__, "moe_aux_loss_coeff": 0.0}))
        matrix._run_layout({}, str(root / "weights"), str(root / name), batches=batches, data=_data(packed))
    matrix._check_grads(root / "alone_no_aux", matrix._load_named(root / "packed_no_aux"))


@pytest.fixture(scope="module")
def layouts(reference, packed):
    return matrix._run_matrix(reference["root"], LAYOUTS, 2, packed["packed"], _data(packed))


@pytest.mark.parametrize("name", GRADIENT_LAYOUTS)
def test_packed_sequences_at_layout_give_the_single_process_loss_and_gradients(name, reference, layouts):
    """(Under EP2 and DP2 each rank's loss is its own sequence's (the dense part runs data-parallel), under CP2 its
    own tokens'; their loss-token counts differ, so the ranks' means do not average to the whole: the gradients
    carry the check there.)"""
    losses = matrix._losses(layouts, name)
    if name not in ("ep2", "cp2", "dp2"):
        matrix._check_loss(losses, LAYOUTS[name], reference["loss"], 2)
    matrix._check_grads(reference["root"] / name, reference["grads"])


def test_packed_sequences_at_dp2_with_the_distributed_optimizer_take_the_single_process_adam_step(reference, layouts):
    """DP2, each rank one packed sequence, megatron DDP + distributed optimizer: one Adam step == the single process's
    step on both sequences, every parameter within REL_TOL of its tensor's largest entry."""
    matrix._losses(layouts, "dp2_distopt")
    matrix._check_step(reference["root"], "dp2_distopt")
