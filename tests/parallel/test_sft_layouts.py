"""Chat fine-tuning through the path users run (recipes/common.sh with SFT_DATA_PATH -> torchrun -> pretrain_qwen35.py
-> megatron.training.pretrain, gloo), from a converted tiny MoE + MTP checkpoint: full fine-tuning on packed chats at
TP2 + SP, PP2, PP2 x VPP2, EP2, CP2 (conversations split over the ranks) and DP2 (the recipe's distributed optimizer)
log the single process's losses and gradient norms, step after step.

The rest of the proof of packed chats lives beside it, each once: packed == one conversation per sequence and every
gradient tensor of full fine-tuning at TP2 + SP, PP2, EP2, CP2 and DP2 == the single process's, in-process through
forward_step (tests/parallel/test_sft_matrix.py); through the recipe, packed == one per sequence on image chats
(tests/parallel/test_vl_layouts.py) and every layout (TP2 + SP, PP2, EP2, CP2, and a resume at DP2) with LoRA on
these chats (tests/parallel/test_lora_layouts.py). The fixtures here (the chats, the converted checkpoint) serve
those LoRA runs too.
"""

import json
import random
import subprocess
import sys

import pytest

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.data.sft_dataset import Qwen35SFTDataset, sft_samples
from tests.parallel.test_pretrain_layouts import REL_TOL
from tests.pretrain_runs import REPO, recipe
from tests.test_convert import make_hf_checkpoint

pytestmark = pytest.mark.slow

PRESET = "tiny-moe"
SEQ_LEN = 704  # two of the conversations below per sequence, with room for CP2's alignment
SETTINGS = dict(PRESET=PRESET, MOCK_DATA="0", SEQ_LEN=str(SEQ_LEN), EVAL_ITERS="0", TRAIN_ITERS="3")
# Adam's first update is about lr x sign(g): with its default eps (1e-8) a gradient entry near zero turns fp32
# reordering noise into an update of either sign, which the third step's gradient norm then shows (measured 2.7e-4 at
# CP2 on these packed sequences, whose every gradient tensor equals the single process's to 1e-5:
# tests/parallel/test_sft_matrix.py). A larger eps keeps the update smooth in such entries.
FLAGS = ("--adam-eps", "1e-4")
# pp2: MTP on the last stage; pp2_vpp2: two virtual stages of one layer each (the interleaved schedule 27b's recipe
# runs); ep2: half the experts each, the rest data-parallel; cp2: each packed conversation split over the ranks
# (aligned to 2 x CP); dp2: each rank one packed sequence, the optimizer split
LAYOUTS = {"tp2_sp": (2, dict(TP="2")), "pp2": (2, dict(PP="2")), "pp2_vpp2": (2, dict(PP="2", VPP="1")),
           "ep2": (2, dict(EP="2")), "cp2": (2, dict(CP="2")), "dp2": (2, {})}


def conversations(count: int = 4, seed: int = 0) -> list[dict]:
    """Two-turn chats of 227-430 byte-level tokens, with system prompts, reasoning and a tool call."""
    g = random.Random(seed)
    rows = []
    for i in range(count):
        messages = [{"role": "system", "content": "Answer in one line."}] if i % 2 == 0 else []
        for _ in range(2):
            a, b = g.randint(10, 99), g.randint(10, 99)
            messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}.",
                          "reasoning_content": "Add the two." if i % 2 else None}]
        if i == 3:
            messages[-1]["tool_calls"] = [{"function": {"name": "calc", "arguments": {"x": a}}}]
            messages.append({"role": "tool", "content": str(a)})
            messages.append({"role": "assistant", "content": "Done."})
        rows.append({"messages": [{k: v for k, v in m.items() if v is not None} for m in messages]})
    return rows


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("chats")
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    subprocess.run([sys.executable, str(REPO / "tools/data/preprocess_sft.py"), "--input", str(root / "chats.jsonl"),
                    "--output-dir", str(root / "sft"), "--qwen35-preset", PRESET], check=True, capture_output=True)
    samples = sft_samples(root / "sft")
    packed = Qwen35SFTDataset(samples, list(range(len(samples))), SEQ_LEN, 2)
    assert len(samples) == 4 and [len(s) for s in packed.sequences] == [2, 2], packed.sequences
    aligned = Qwen35SFTDataset(samples, list(range(len(samples))), SEQ_LEN, 2, align=4)
    assert len(aligned.sequences) == 2  # CP2's alignment keeps them two to a sequence
    return root / "sft"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    hf = make_hf_checkpoint(root / "hf", PRESET, how="packed", mtp_layout="per_expert", seed=3)
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


def assert_same_steps(want, got, what):
    assert sorted(want.losses) == sorted(got.losses) == [1, 2, 3], (want.losses, got.losses)
    for step in want.losses:
        for name, a, b in (("lm loss", want.losses[step], got.losses[step]),
                           ("grad norm", want.grad_norms[step], got.grad_norms[step])):
            assert abs(b - a) <= REL_TOL[step] * abs(a), (what, step, name, b, a)


@pytest.fixture(scope="module")
def single(converted, chats, tmp_path_factory):
    return recipe(tmp_path_factory.mktemp("single_sft"), *FLAGS, nproc=1, LOAD=str(converted), SFT_DATA_PATH=str(chats),
                  GLOBAL_BATCH="2", run_name="single", **SETTINGS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_recipe_at_layout_logs_the_single_process_losses(layout, converted, chats, single, tmp_path):
    ranks, settings = LAYOUTS[layout]
    run = recipe(tmp_path, *FLAGS, nproc=ranks, LOAD=str(converted), SFT_DATA_PATH=str(chats), GLOBAL_BATCH="2",
                 run_name=layout, **{**SETTINGS, **settings})
    assert_same_steps(single, run, layout)


@pytest.mark.usefixtures("megatron_single_process")
def test_validation_loss_is_the_mean_over_the_held_out_conversations_assistant_tokens(converted, chats, tmp_path):
    """--split 50,50,0 holds the last two of the four conversations out; megatron's evaluation after step 1 (learning
    rate 0: the converted weights) logs as `lm loss validation` the mean cross entropy over their assistant tokens,
    as load_model's forward of each conversation alone gives it."""
    import torch

    from megatron_qwen35.inference import load_model
    from tests.pretrain_runs import scalars

    run = recipe(tmp_path, *FLAGS, "--split", "50,50,0", LOAD=str(converted), SFT_DATA_PATH=str(chats),
                 GLOBAL_BATCH="2", **{**SETTINGS, "TRAIN_ITERS": "1", "EVAL_ITERS": "1", "EVAL_INTERVAL": "1",
                                      "WARMUP": "0", "LR": "0", "MIN_LR": "0"})
    logged = scalars(tmp_path / "tb-run", "lm loss validation")
    assert list(logged) == [1], logged
    model, samples = load_model(converted), sft_samples(chats)
    total, count = 0.0, 0
    with torch.no_grad():
        for held_out in (2, 3):
            ids, mask = samples[held_out]["tokens"].long(), samples[held_out]["loss_mask"].bool()
            logits = model(ids.unsqueeze(0))[0, :-1].double()
            losses = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")[mask[1:]]
            total, count = total + losses.sum().item(), count + len(losses)
    assert count > 0 and abs(logged[1] - total / count) <= 1e-5 * abs(total / count), (logged[1], total / count)
    assert abs(logged[1] - run.losses[1]) > 1e-3  # held-out conversations, not the training ones
