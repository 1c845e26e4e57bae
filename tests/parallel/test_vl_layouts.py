"""Vision-language training on the path users run, at TP2 (+ SP), PP2 and CP2: recipes/common.sh with VL_DATA_PATH ->
torchrun -> pretrain_qwen35.py -> megatron.training.pretrain, fine-tuning a converted transformers VL checkpoint
(tiny-vl-moe: GDN, gated attention, MoE with shared expert, MTP, the vision tower) on the embedded image / video
samples (data/vl, preprocessed by tools/data/preprocess_vl.py), logs the single process's losses and gradient norms.

TP2 splits the tower's heads and MLP and scatters the placed features for sequence parallelism; PP2 keeps the tower
on stage 0 and MTP on stage 1, and every stage reads the mRoPE positions; CP2 places the features before the
sequence is split (each rank encodes every image). MTP trains on VL inputs in every run.

Image chats (--sft-data-path) packed two to a sequence train as the same chats one per sequence, and log the single
process's losses at TP2 + SP, PP2, PP2 x VPP2, EP2, CP2 (each packed conversation split over the CP ranks) and DP2
(the distributed optimizer). LoRA with the tower adapted too (LORA_VISION=1) trains on them, and its checkpoint exports
merged and as a peft adapter that transformers + peft run with images to load_model's logits.
"""

import subprocess
import sys

import pytest

from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from tests.parallel.test_pretrain_layouts import REL_TOL
from tests.parallel.test_sft_layouts import assert_same_steps
from tests.pretrain_runs import REPO, recipe
from tests.test_convert import make_hf_checkpoint

pytestmark = pytest.mark.slow

PRESET = "tiny-vl-moe"
SETTINGS = dict(PRESET=PRESET, MOCK_DATA="0", SEQ_LEN="224")  # the longest sample is 221 tokens
# VL samples mask their vision tokens and padding out of the loss, so the ranks of a split sequence hold different
# numbers of loss tokens: the per-token normalisation pretrain_qwen35.py sets keeps CP exact (training/steps.py).
FLAGS = ()
LAYOUTS = {"tp2_sp": (2, dict(TP="2")), "pp2": (2, dict(PP="2")), "cp2": (2, dict(CP="2"))}
# pp2_vpp2: two virtual stages of one layer each (the tower with the first chunk of stage 0, MTP with the last chunk
# of stage 1); ep2: experts split, the rest (tower too) data-parallel; dp2: each rank one packed sequence, the
# recipe's distributed optimizer
CHAT_LAYOUTS = {**LAYOUTS, "pp2_vpp2": (2, dict(PP="2", VPP="1")), "ep2": (2, dict(EP="2")), "dp2": (2, {})}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted_vl")
    hf = make_hf_checkpoint(root / "hf", PRESET, how="packed", mtp_layout="per_expert", seed=3)
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl_data") / "samples"
    subprocess.run([sys.executable, str(REPO / "tools/data/preprocess_vl.py"), "--input",
                    str(REPO / "data/vl/captions.jsonl"), "--output-dir", str(out), "--qwen35-preset", PRESET,
                    "--image-pixels", "1024", "16384", "--video-pixels", "1024", "65536"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def single(converted, vl_data, tmp_path_factory):
    return recipe(tmp_path_factory.mktemp("single_vl"), *FLAGS, nproc=1, LOAD=str(converted),
                  VL_DATA_PATH=str(vl_data), run_name="single", **SETTINGS)


def test_single_process_trains_on_images_with_mtp(single):
    assert sorted(single.losses) == [1, 2, 3] and "mtp_1 loss" in single.stdout + single.stderr


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vl_recipe_at_layout_logs_the_single_process_losses(layout, converted, vl_data, single, tmp_path):
    ranks, settings = LAYOUTS[layout]
    run = recipe(tmp_path, *FLAGS, nproc=ranks, LOAD=str(converted), VL_DATA_PATH=str(vl_data), run_name=layout,
                 **SETTINGS, **settings)
    assert sorted(single.losses) == sorted(run.losses) == [1, 2, 3], (single.losses, run.losses)
    for step in single.losses:
        for what, want, got in (("lm loss", single.losses[step], run.losses[step]),
                                ("grad norm", single.grad_norms[step], run.grad_norms[step])):
            assert abs(got - want) <= REL_TOL[step] * abs(want), (layout, step, what, got, want)


def test_text_batches_on_a_vl_model_with_overlapped_gather_and_reduce(converted, tmp_path):
    """Text-only data (mock) on the VL model at DP2 with the recipe's distributed optimizer, overlapped parameter
    gather and gradient reduce, and buckets small enough that the tower has its own (as a real-size ViT has): the
    tower takes part in every step (vl_model.py), so megatron's bucket bookkeeping does not stall (before: an
    assertion in its parameter gather at step 3), and the steps equal the single process's."""
    flags = ("--ddp-bucket-size", "2000")
    text = dict(PRESET=PRESET, MOCK_DATA="1")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    single = recipe(tmp_path / "one", *flags, nproc=1, LOAD=str(converted), run_name="text_single", **text)
    run = recipe(tmp_path / "two", *flags, nproc=2, LOAD=str(converted), run_name="text_dp2", **text)
    assert sorted(single.losses) == sorted(run.losses) == [1, 2, 3], (single.losses, run.losses)
    for step in single.losses:
        for want, got in ((single.losses[step], run.losses[step]), (single.grad_norms[step], run.grad_norms[step])):
            assert abs(got - want) <= REL_TOL[step] * abs(want), (step, got, want)


# Image chats (data/sft's demo set: three questions about data/vl's images and a two-turn sum), packed two to a
# sequence: fine-tuning a VL checkpoint on conversations, each packed conversation with its own mRoPE positions and
# images, its attention, Gated DeltaNet state and MTP separated from its neighbour's.
CHAT_SETTINGS = dict(PRESET=PRESET, MOCK_DATA="0", SEQ_LEN="360", EVAL_ITERS="0")  # 218 + 133 tokens fit, also
# aligned to 2 x CP = 4 (220 + 136)
# (tests/parallel/test_sft_layouts.py: smooth Adam updates for the layouts; the MoE aux loss is a statistic of each
# micro-batch's tokens, so it is off where packed and unpacked runs are compared; packed text chats prove it in the
# layouts in test_lora_layouts.py)
CHAT_FLAGS = ("--adam-eps", "1e-4", "--moe-aux-loss-coeff", "0")


@pytest.fixture(scope="module")
def vl_chats(tmp_path_factory):
    import json

    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.data.sft_dataset import Qwen35SFTDataset, sft_samples

    root = tmp_path_factory.mktemp("vl_chats")
    rows = [json.loads(line) for line in (REPO / "data/sft/chats.jsonl").read_text().splitlines()]
    images = [r for r in rows if '"image"' in json.dumps(r)][:3]
    text = [r for r in rows if '"image"' not in json.dumps(r) and "tools" not in r][:1]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (images[0], text[0], *images[1:])))
    subprocess.run([sys.executable, str(REPO / "tools/data/preprocess_sft.py"), "--input", str(root / "chats.jsonl"),
                    "--output-dir", str(root / "sft"), "--qwen35-preset", PRESET, "--media-dir", str(REPO / "data/vl"),
                    "--image-pixels", "1024", "16384"], check=True, capture_output=True)
    samples = sft_samples(root / "sft")
    for align in (1, 4):  # one process / TP2, and CP2: the same two pairs
        packed = Qwen35SFTDataset(samples, list(range(4)), int(CHAT_SETTINGS["SEQ_LEN"]), 2,
                                  vision=qwen35_preset(PRESET).vision, align=align)
        assert [len(s) for s in packed.sequences] == [2, 2], (align, packed.sequences)
    return root / "sft"


@pytest.fixture(scope="module")
def single_chat(converted, vl_chats, tmp_path_factory):
    return recipe(tmp_path_factory.mktemp("single_vl_chat"), *CHAT_FLAGS, nproc=1, LOAD=str(converted),
                  SFT_DATA_PATH=str(vl_chats), GLOBAL_BATCH="2", run_name="single", **CHAT_SETTINGS)


def test_packed_image_chats_train_as_the_same_chats_one_per_sequence(converted, vl_chats, single_chat, tmp_path):
    one_each = recipe(tmp_path, *CHAT_FLAGS, nproc=1, LOAD=str(converted), SFT_DATA_PATH=str(vl_chats),
                      SFT_PACKING="0", GLOBAL_BATCH="4", run_name="one_each", **CHAT_SETTINGS)
    assert "mtp_1 loss" in single_chat.stdout + single_chat.stderr
    assert_same_steps(one_each, single_chat, "packed vs one per sequence")


@pytest.mark.parametrize("layout", list(CHAT_LAYOUTS))
def test_image_chat_recipe_at_layout_logs_the_single_process_losses(layout, converted, vl_chats, single_chat,
                                                                    tmp_path):
    """PP2 keeps the tower on stage 0 and hands the packed sequences' MTP inputs to stage 1; EP2 gives each rank one
    packed sequence of the two (data parallel) and half the experts; CP2 splits each packed conversation over the two
    ranks (its image features placed before the split); DP2 gives each rank one packed sequence, the optimizer's
    state split."""
    ranks, settings = CHAT_LAYOUTS[layout]
    run = recipe(tmp_path, *CHAT_FLAGS, nproc=ranks, LOAD=str(converted), SFT_DATA_PATH=str(vl_chats),
                 GLOBAL_BATCH="2", run_name=layout, **{**CHAT_SETTINGS, **settings})
    assert_same_steps(single_chat, run, layout)


@pytest.mark.usefixtures("megatron_single_process")
def test_lora_with_the_tower_adapted_trains_on_image_chats_and_exports_for_transformers_and_peft(
        converted, vl_chats, tmp_path):
    """LORA_VISION=1: adapters on every linear of the language model and of the vision tower, trained through the
    recipe on image chats; the checkpoint records them and holds the tower's; exported merged (--base-dir) and as
    a peft adapter (--adapter-only), transformers on the merged model and peft on the Hugging Face base give
    load_model's logits on a batch with images and a video (fp32), as does that adapter imported back
    (hf_to_megatron.py --adapter)."""
    import json
    import runpy

    import torch
    from peft import PeftModel

    from megatron_qwen35.checkpoint import iteration_dir
    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.convert.torch_dist import TorchDistReader
    from megatron_qwen35.inference import load_model
    from megatron_qwen35.layers.rotary import token_types
    from megatron_qwen35.lora.peft_format import ADAPTER_CONFIG
    from megatron_qwen35.lora.targets import VISION_PEFT_TARGETS
    from tests.test_released_layouts import _transformers_release_model
    from tests.test_vl_model import vl_batch

    run = recipe(tmp_path, *CHAT_FLAGS, nproc=1, LOAD=str(converted), SFT_DATA_PATH=str(vl_chats), GLOBAL_BATCH="2",
                 run_name="lora_vision", LORA_RANK="4", LORA_ALPHA="8", LORA_VISION="1", TRAIN_ITERS="2",
                 **CHAT_SETTINGS)
    assert sorted(run.losses) == [1, 2]
    saved = tmp_path / "ckpt-lora_vision"
    assert json.loads((saved / "qwen35_config.json").read_text())["metadata"]["lora"]["vision"] is True
    reader = TorchDistReader(iteration_dir(saved, 2))
    try:
        tower = {n: reader.read(n) for n in reader.tensors if n.startswith("vision_model.") and ".lora.B_" in n}
    finally:
        reader.close()
    cfg = qwen35_preset(PRESET)
    # megatron stacks the blocks' tensors ([depth, ...]): qkv, proj, fc1, fc2 of every block, and the merger's two
    assert len(tower) == 4 + 2 and all(t.shape[0] == cfg.vision.depth for n, t in tower.items() if ".layers." in n)
    for name, b in tower.items():  # every block's and the merger's adapters trained (B starts at zero)
        per_block = b.flatten(1) if ".layers." in name else b.flatten().unsqueeze(0)
        assert (per_block.abs().amax(1) > 0).all(), name

    tool = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")
    assert tool["main"](["--megatron-dir", str(saved), "--base-dir", str(converted), "--out-dir",
                         str(tmp_path / "merged"), "--no-progress"]) == 0
    assert tool["main"](["--megatron-dir", str(saved), "--adapter-only", "--out-dir", str(tmp_path / "adapter")]) == 0
    assert set(VISION_PEFT_TARGETS) <= set(json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())[
        "target_modules"])
    batch = vl_batch(cfg)
    with torch.no_grad():
        want = load_model(saved, base=converted)(**batch)
        base = load_model(converted)(**batch)
        merged = _transformers_release_model(tmp_path / "merged", is_moe=True)(
            **batch, mm_token_type_ids=token_types(batch["input_ids"], cfg.vision)).logits
        peft = PeftModel.from_pretrained(_transformers_release_model(converted.parent / "hf", is_moe=True),
                                         tmp_path / "adapter").eval()
        on_base = peft(**batch, mm_token_type_ids=token_types(batch["input_ids"], cfg.vision)).logits
        imported = qwen35_hf_to_megatron(converted.parent / "hf", tmp_path / "imported",
                                         adapter=tmp_path / "adapter", progress=False)  # and back, beside its base
        back = load_model(imported)(**batch)
    assert (base - want).abs().max().item() > 1e-3  # the adapters changed the model
    for got in (merged, on_base, back):
        assert (got - want).abs().max().item() <= 1e-4
