"""A checkpoint converted from Hugging Face loads at TP=2, EP=2 and PP=2 and gives the single process's logits
(TP2, EP2: load_model gathers the TP-split vocabulary) and loss (PP2: only the last stage has logits); gloo, 2 ranks."""

import pytest
import torch

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from tests.parallel.harness import run_distributed
from tests.test_convert import make_hf_checkpoint

TOL = 1e-5  # fp32: TP splits the attention/MLP sums across ranks; seen well below this


def _ids(vocab):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(rank, world, checkpoint, layout):
    from megatron_qwen35.inference import load_model
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(**layout)
    model = load_model(checkpoint)
    return model(_ids(model.config.vocab_size))


@pytest.mark.parametrize("layout", [dict(tensor_parallel=2), dict(expert_parallel=2)], ids=["tp2", "ep2"])
def test_converted_checkpoint_loads_at_any_layout(layout, tmp_path, megatron_single_process):
    from megatron_qwen35.inference import load_model

    src = make_hf_checkpoint(tmp_path / "hf", "tiny-moe", how="packed", mtp_layout="per_expert")
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    model = load_model(tmp_path / "mg")
    want = model(_ids(model.config.vocab_size))
    for got in run_distributed(_logits, 2, str(tmp_path / "mg"), layout):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL


def _pp2_loss(rank, world, checkpoint):
    from tests.parallel.test_layout_matrix import _run_layout

    return _run_layout({"pp": 2}, checkpoint, None, forward_only=True)


def test_converted_checkpoint_runs_at_pp2(tmp_path, megatron_single_process):
    """Two pipeline stages (MTP on the last) evaluate the converted checkpoint to the single process's loss."""
    from tests.parallel.test_layout_matrix import PRESET, _run_layout

    src = make_hf_checkpoint(tmp_path / "hf", PRESET, how="packed", mtp_layout="per_expert")
    qwen35_hf_to_megatron(src, tmp_path / "mg", progress=False)
    want = _run_layout({}, str(tmp_path / "mg"), None, forward_only=True)
    got = [loss for loss in run_distributed(_pp2_loss, 2, str(tmp_path / "mg")) if loss is not None]
    assert len(got) == 1  # only the last stage computes the loss
    assert abs(got[0] - want) <= TOL * abs(want)
