"""The path users run, at every parallel layout: recipes/common.sh -> torchrun -> pretrain_qwen35.py ->
megatron.training.pretrain (gloo on CPU ranks), fine-tuning a converted Hugging Face checkpoint, logs the single
process's losses and gradient norms at every step.

Every run starts from the same weights: a tiny MoE + MTP checkpoint made by transformers (with MTP tensors), converted
by tools' converter into a Megatron "release" checkpoint that the recipe loads with its default flags (distributed
optimizer, overlapped grad reduce and param gather, TP > 1 with sequence parallelism). megatron.training would
otherwise initialise each layout differently (per pipeline stage seeds, per tensor-parallel shard RNG streams).
"""

import pytest

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from tests.pretrain_runs import recipe
from tests.test_convert import assert_export_copies_equal_memory, make_hf_checkpoint

pytestmark = pytest.mark.slow

# The loss and the gradient norm of a step, at any layout, against the single process. Step 1 starts from the same
# weights: only fp32 sums in another order differ (1e-5). Adam then divides each gradient entry by its own magnitude,
# so the reordering noise of entries near zero becomes update noise: 1e-4 for later steps (TP2 + SP measured 1.5e-5
# on the step-3 grad norm). A wrong gradient term or a mis-split batch is O(1e-2) or more.
REL_TOL = {1: 1e-5, 2: 1e-4, 3: 1e-4}

LAYOUTS = {  # name: (ranks, recipe settings)
    "pp4_mtp": (4, dict(PP="4")),  # one layer per stage, MTP on the last; stages 1 and 2 read no data
    "pp2_vpp2": (2, dict(PP="2", VPP="1")),  # 2 stages x 2 virtual chunks of one layer (interleaved 1F1B)
    "tp2_sp": (2, dict(TP="2")),  # the recipe adds --sequence-parallel at TP > 1
    "ep2": (2, dict(EP="2")),
    "cp2": (2, dict(CP="2")),  # each sequence in 4 chunks, rank r holds chunks r and 3 - r
    "dp2_distopt": (2, dict()),  # the recipe's distributed optimizer shards Adam over DP 2
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A Hugging Face tiny-moe checkpoint with MTP, converted: what a user fine-tunes."""
    root = tmp_path_factory.mktemp("converted")
    hf = make_hf_checkpoint(root / "hf", "tiny-moe", how="packed", mtp_layout="per_expert", seed=3)
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


@pytest.fixture(scope="module")
def single(converted, tmp_path_factory):
    return recipe(tmp_path_factory.mktemp("single"), nproc=1, LOAD=str(converted), run_name="single")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recipe_at_layout_logs_the_single_process_losses(layout, converted, single, tmp_path):
    """... and the checkpoint the run saves at the end (megatron's own save, each rank's records) exports the same
    files whether its bytes are copied file to file or go through memory."""
    ranks, settings = LAYOUTS[layout]
    run = recipe(tmp_path, nproc=ranks, LOAD=str(converted), run_name=layout, **settings)
    assert sorted(single.losses) == sorted(run.losses) == [1, 2, 3], (single.losses, run.losses)
    for step in single.losses:
        for what, want, got in (("lm loss", single.losses[step], run.losses[step]),
                                ("grad norm", single.grad_norms[step], run.grad_norms[step])):
            assert abs(got - want) <= REL_TOL[step] * abs(want), (layout, step, what, got, want)
    assert assert_export_copies_equal_memory(tmp_path / f"ckpt-{layout}", tmp_path) > 0
