"""LoRA through the path users run (recipes/common.sh with LORA_RANK -> torchrun -> pretrain_qwen35.py ->
megatron.training.pretrain, gloo), on chat data, from a converted tiny MoE + MTP checkpoint that holds no adapters:

- every layout (TP2 + SP, PP2, EP2 with per-expert adapters, CP2) logs the single process's losses and gradient
  norms (adapters only: the base has no gradient), step after step;
- the single process's LoRA checkpoint resumes at DP2 with the distributed optimizer to the uninterrupted run's next
  step (megatron's default optimizer format follows a new DP size; a new TP / PP needs its fully reshardable format,
  which on this MoE's two chained optimizers fails to load in megatron-core 0.19.2);
- the checkpoint records the adapters' settings, and a run with other settings is refused by name before any rank.
"""

import json

import pytest

from tests.parallel.test_sft_layouts import FLAGS, assert_same_steps, chats, converted  # noqa: F401 (fixtures)
from tests.pretrain_runs import recipe

pytestmark = pytest.mark.slow

LORA = dict(LORA_RANK="4", LORA_ALPHA="8", PRESET="tiny-moe", MOCK_DATA="0", SEQ_LEN="704", EVAL_ITERS="0",
            TRAIN_ITERS="3", GLOBAL_BATCH="2")
LAYOUTS = {"tp2_sp": (2, dict(TP="2")), "pp2": (2, dict(PP="2")), "ep2": (2, dict(EP="2")), "cp2": (2, dict(CP="2"))}


@pytest.fixture(scope="module")
def single(converted, chats, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("single_lora")
    run = recipe(root, *FLAGS, nproc=1, LOAD=str(converted), SFT_DATA_PATH=str(chats), run_name="single",
                 SAVE_INTERVAL="2", **LORA)
    return root, run


def test_lora_run_from_a_checkpoint_without_adapters_says_so_and_records_its_adapters(single):
    root, run = single
    assert "holds no LoRA adapters: its weights are the frozen base" in run.stdout
    record = json.loads((root / "ckpt-single" / "qwen35_config.json").read_text())["metadata"]["lora"]
    assert record["rank"] == 4 and record["alpha"] == 8 and "experts" in record["target_modules"]
    assert run.losses[3] < run.losses[1]  # the adapters train (step 1 runs at warm-up's learning rate 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_recipe_at_layout_logs_the_single_process_losses(layout, converted, chats, single, tmp_path):  # noqa: F811
    ranks, settings = LAYOUTS[layout]
    run = recipe(tmp_path, *FLAGS, nproc=ranks, LOAD=str(converted), SFT_DATA_PATH=str(chats), run_name=layout,
                 **{**LORA, **settings})
    assert_same_steps(single[1], run, layout)


def test_lora_checkpoint_of_one_process_resumes_at_dp2_to_its_next_step(chats, single, tmp_path):  # noqa: F811
    """The single process saved at step 2 (SAVE_INTERVAL 2); resumed there (--ckpt-step 2) at DP2 with the
    distributed optimizer (the adapters' Adam state now split over two ranks), step 3 logs the uninterrupted run's
    loss and gradient norm; another LoRA rank on that checkpoint is refused before any rank starts."""
    saved = single[0] / "ckpt-single"
    dp2 = recipe(tmp_path, *FLAGS, "--ckpt-step", "2", nproc=2, LOAD=str(saved), SFT_DATA_PATH=str(chats),
                 run_name="dp2", **LORA)
    assert sorted(dp2.losses) == [3]
    want = single[1]
    for name, a, b in (("lm loss", want.losses[3], dp2.losses[3]),
                       ("grad norm", want.grad_norms[3], dp2.grad_norms[3])):
        assert abs(b - a) <= 1e-4 * abs(a), (name, a, b)
    other = recipe(tmp_path, nproc=1, LOAD=str(saved), SFT_DATA_PATH=str(chats), run_name="rank8", check=False,
                   **{**LORA, "LORA_RANK": "8"})
    assert "holds LoRA adapters of another shape (rank 4, alpha 8, targets all) than this run's (rank 8" in other.stderr
    assert not (tmp_path / "tb-rank8").exists()  # refused before any rank started
