"""A checkpoint converted from Hugging Face loads at TP=2 and at EP=2 and gives the single process's logits
(gloo, 2 ranks; load_model gathers the TP-split vocabulary)."""

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
