"""LoRA through the path users run (recipes/common.sh with LORA_RANK -> torchrun -> pretrain_qwen35.py ->
megatron.training.pretrain, gloo), on chat data, from a converted tiny MoE + MTP checkpoint that holds no adapters:

- every layout (TP2 + SP, PP2, EP2 with per-expert adapters, CP2, DP2) logs the single process's losses and gradient
  norms (adapters only, the routers' included: the base has no gradient), step after step;
- the single process's checkpoint holds the adapters alone (and their optimizer state), records its settings and its
  base's fingerprint, and resumes at EP2 (one optimizer becoming two, the state resharded over EP and DP), the base
  named again (LOAD=), to the uninterrupted run's next step, and so at PP2 with virtual stages (27b's interleaved
  schedule) and at CP2; TP2 + SP's resumes in one process (two becoming one):
  the recipe saves LoRA's optimizer state in megatron's fully reshardable format (with two runtime fixes:
  runtime/register.py's chained_optimizer_count_change and distopt_torch_adam_step);
- a resume with other LoRA settings, without its base, or on another base is refused by name before any rank.
- the run's checkpoint exports merged onto its base and as a peft adapter; a peft adapter imported with its base
  trains on from its weights;
- with one adapter shared by each layer's experts (LORA_EXPERTS=shared): the single process's checkpoint resumes at
  TP2 + SP and at EP2 to its next step, and exports merged and as a peft adapter (every expert holding a copy).
"""

import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest

from megatron_qwen35.checkpoint import TRAINING_STATE_KEY, iteration_dir
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.torch_dist import TorchDistReader
from megatron_qwen35.lora.base import LORA_BASE, base_fingerprint
from tests.parallel.test_sft_layouts import FLAGS, PRESET, assert_same_steps, chats, converted  # noqa: F401
from tests.pretrain_runs import REPO, TINY_RECIPE, recipe
from tests.test_convert import make_hf_checkpoint

pytestmark = pytest.mark.slow

LORA = dict(LORA_RANK="4", LORA_ALPHA="8", LORA_ROUTER="1", PRESET="tiny-moe", MOCK_DATA="0", SEQ_LEN="704",
            EVAL_ITERS="0", TRAIN_ITERS="3", GLOBAL_BATCH="2")  # every linear and the routers
LAYOUTS = {"pp2": (2, dict(PP="2")), "ep2": (2, dict(EP="2")), "cp2": (2, dict(CP="2")),
           "dp2": (2, {})}  # and tp2_sp below; dp2: the adapters' optimizer state split over the two ranks


def _saving_run(base, data, root, run_name: str, nproc: int, settings: dict):
    """(root, run): the recipe's 3 steps on the chats `data` from checkpoint `base`, saved at step 2 too."""
    return root, recipe(root, *FLAGS, nproc=nproc, LOAD=str(base), SFT_DATA_PATH=str(data), run_name=run_name,
                        SAVE_INTERVAL="2", **settings)


@pytest.fixture(scope="module")
def single(converted, chats, tmp_path_factory):  # noqa: F811
    return _saving_run(converted, chats, tmp_path_factory.mktemp("single_lora"), "single", 1, LORA)


@pytest.fixture(scope="module")
def tp2_sp(converted, chats, tmp_path_factory):  # noqa: F811
    return _saving_run(converted, chats, tmp_path_factory.mktemp("tp2_sp_lora"), "tp2_sp", 2, {**LORA, "TP": "2"})


def test_lora_run_from_a_base_saves_its_adapters_alone_and_records_the_base(single, converted):  # noqa: F811
    root, run = single
    assert f"--pretrained-checkpoint {converted} holds no LoRA adapters: its weights are the frozen base" in run.stdout
    metadata = json.loads((root / "ckpt-single" / "qwen35_config.json").read_text())["metadata"]
    record = metadata["lora"]
    assert record["rank"] == 4 and record["alpha"] == 8 and "experts" in record["target_modules"]
    assert record["dropout"] == 0.0
    assert metadata[LORA_BASE] == base_fingerprint(converted)
    reader = TorchDistReader(iteration_dir(root / "ckpt-single", 2))
    try:
        model = [k for k in reader.tensors if not TRAINING_STATE_KEY.match(k)]
    finally:
        reader.close()
    assert model and all(".lora." in k for k in model)  # no frozen base weight in the checkpoint
    assert any(".experts." in k for k in model) and not any(k.startswith("mtp.") for k in model)  # LORA_MTP=0
    assert any(".mlp.router.lora." in k for k in model)  # LORA_ROUTER=1
    assert run.losses[3] < run.losses[1]  # the adapters train (step 1 runs at warm-up's learning rate 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_recipe_at_layout_logs_the_single_process_losses(layout, converted, chats, single, tmp_path):  # noqa: F811
    ranks, settings = LAYOUTS[layout]
    run = recipe(tmp_path, *FLAGS, nproc=ranks, LOAD=str(converted), SFT_DATA_PATH=str(chats), run_name=layout,
                 **{**LORA, **settings})
    assert_same_steps(single[1], run, layout)


def test_lora_recipe_at_tp2_sp_logs_the_single_process_losses(single, tp2_sp):
    assert_same_steps(single[1], tp2_sp[1], "tp2_sp")


def _assert_resumed_step_3(want, got):
    assert sorted(got.losses) == [3], got.losses
    for name, a, b in (("lm loss", want.losses[3], got.losses[3]), ("grad norm", want.grad_norms[3],
                                                                     got.grad_norms[3])):
        assert abs(b - a) <= 1e-4 * abs(a), (name, a, b)


def test_lora_checkpoint_of_one_process_resumes_at_ep2_to_its_next_step(converted, chats, single, tmp_path):  # noqa: F811
    """The single process saved at step 2 (SAVE_INTERVAL 2, one optimizer over every adapter); resumed there
    (--ckpt-step 2) at EP2 (the experts' adapters split over the ranks, with an optimizer of their own, the other
    adapters' Adam state split over two data-parallel ranks), its base loaded from LOAD, step 3 logs the
    uninterrupted run's loss and gradient norm: the recipe saves LoRA's optimizer state fully reshardable."""
    saved = tmp_path / "adapters"
    shutil.copytree(single[0] / "ckpt-single", saved)
    ep2 = recipe(tmp_path, *FLAGS, "--ckpt-step", "2", nproc=2, LOAD=str(converted), SAVE=str(saved),
                 SFT_DATA_PATH=str(chats), run_name="ep2", **{**LORA, "EP": "2"})
    _assert_resumed_step_3(single[1], ep2)


@pytest.mark.parametrize("layout", ["pp2_vpp2", "cp2"])
def test_lora_checkpoint_of_one_process_resumes_at_pp2_with_virtual_stages_and_at_cp2_to_its_next_step(  # noqa: F811
        layout, converted, chats, single, tmp_path):  # noqa: F811
    """The single process's checkpoint of step 2 resumed at PP2 with two virtual stages of one layer each (the
    interleaved schedule recipes/27b.sh runs: the base loaded into every virtual chunk once all are built, then the
    adapters and their optimizer state), and at CP2 (each packed conversation split over the ranks), logs the
    uninterrupted run's step 3."""
    saved = tmp_path / "adapters"
    shutil.copytree(single[0] / "ckpt-single", saved)
    settings = {"pp2_vpp2": dict(PP="2", VPP="1"), "cp2": dict(CP="2")}[layout]
    run = recipe(tmp_path, *FLAGS, "--ckpt-step", "2", nproc=2, LOAD=str(converted), SAVE=str(saved),
                 SFT_DATA_PATH=str(chats), run_name=layout, **{**LORA, **settings})
    _assert_resumed_step_3(single[1], run)


def test_lora_checkpoint_of_tp2_sp_resumes_in_one_process_to_its_next_step(converted, chats, single, tp2_sp,  # noqa: F811
                                                                          tmp_path):
    """The other way: TP2 + SP's checkpoint of step 2 (two optimizers: the experts' and the rest) resumed by one
    process (one optimizer) logs the single process's step 3."""
    saved = tmp_path / "adapters"
    shutil.copytree(tp2_sp[0] / "ckpt-tp2_sp", saved)
    one = recipe(tmp_path, *FLAGS, "--ckpt-step", "2", nproc=1, LOAD=str(converted), SAVE=str(saved),
                 SFT_DATA_PATH=str(chats), run_name="one", **LORA)
    _assert_resumed_step_3(single[1], one)


def _preflight(monkeypatch, capsys, **settings) -> tuple[int, str]:
    """recipes/common.sh's check before torchrun (training/preflight.py's main, here in this process) on the arguments
    the recipe launches with (its DRY_RUN): its exit code and error output."""
    from megatron_qwen35.training import preflight

    env = {**os.environ, **TINY_RECIPE, "PYTHON": sys.executable, **settings, "DRY_RUN": "1"}
    argv = subprocess.run(["bash", str(REPO / "recipes/common.sh")], env=env, check=True, capture_output=True,
                          text=True).stdout.splitlines()
    monkeypatch.setenv("WORLD_SIZE", settings.get("GPUS_PER_NODE", "1"))  # as the recipe passes it
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    return preflight.main(argv), capsys.readouterr().err


def test_lora_adapters_of_another_shape_without_their_base_or_on_another_base_are_refused(  # noqa: F811
        converted, chats, single, tmp_path, monkeypatch, capsys):  # noqa: F811
    saved = str(single[0] / "ckpt-single")
    code, err = _preflight(monkeypatch, capsys, LOAD=str(converted), SAVE=saved, SFT_DATA_PATH=str(chats),
                           **{**LORA, "LORA_RANK": "8"})
    assert code == 2 and "holds LoRA adapters of another shape (rank 4, alpha 8, targets all, routers) than this " \
        "run's (rank 8" in err, err
    code, err = _preflight(monkeypatch, capsys, LOAD=str(converted), SAVE=saved, SFT_DATA_PATH=str(chats),
                           LORA_VISION="1", **LORA)
    assert code == 2 and f"--lora-vision (LORA_VISION=1): model '{PRESET}' has no vision tower" in err, err
    code, err = _preflight(monkeypatch, capsys, SAVE=saved, SFT_DATA_PATH=str(chats), **LORA)  # LOAD: SAVE's
    assert code == 2 and "holds LoRA adapters without their frozen base" in err, err
    assert f"(its training run named the base {str(converted)!r})" in err, err
    other = qwen35_hf_to_megatron(make_hf_checkpoint(tmp_path / "hf", PRESET, how="packed", mtp_layout="per_expert",
                                                     seed=4), tmp_path / "other", progress=False)
    code, err = _preflight(monkeypatch, capsys, LOAD=str(other), SAVE=saved, SFT_DATA_PATH=str(chats), **LORA)
    assert code == 2 and f"{other} is not the base the adapters in {saved} were trained on" in err, err
    code, err = _preflight(monkeypatch, capsys, LOAD=str(converted), SAVE=saved, SFT_DATA_PATH=str(chats), TP="2",
                           ETP="2", GPUS_PER_NODE="2", **LORA)  # a layout the expert adapters cannot follow
    assert code == 2 and "--expert-tensor-parallel-size 2 with LoRA on the routed experts" in err, err
    code, err = _preflight(monkeypatch, capsys, LOAD=str(converted), SAVE=saved, SFT_DATA_PATH=str(chats),
                           **{**LORA, "PRESET": "tiny"})  # LORA_ROUTER=1 on a dense model
    assert code == 2 and "--lora-router (LORA_ROUTER=1): model 'tiny' has no MoE router" in err, err
    code, err = _preflight(monkeypatch, capsys, LOAD=str(converted), SAVE=str(converted), SFT_DATA_PATH=str(chats),
                           **LORA)  # the adapters' checkpoints would become the base folder's newest
    assert code == 2 and f"--load {converted} is the base of this LoRA run and its --save" in err, err
    tool = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")["main"]
    assert tool(["--megatron-dir", saved, "--base-dir", str(other), "--out-dir", str(tmp_path / "merged"),
                 "--no-progress"]) == 2  # a merge into a base of another model
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{other} is not the base the adapters in {saved} were trained on" in err
    assert not (tmp_path / "merged").exists()


# LORA_EXPERTS=shared: one adapter for all of a layer's routed experts, its gradient gathered from every rank's experts
SHARED = {**LORA, "LORA_EXPERTS": "shared"}


@pytest.fixture(scope="module")
def single_shared(converted, chats, tmp_path_factory):  # noqa: F811
    return _saving_run(converted, chats, tmp_path_factory.mktemp("single_shared"), "single", 1, SHARED)


SHARED_RESUME_LAYOUTS = {"tp2_sp": {"TP": "2"}, "ep2": {"EP": "2"}}


@pytest.mark.parametrize("layout", list(SHARED_RESUME_LAYOUTS))
def test_one_adapter_shared_by_the_experts_resumes_at_tp2_sp_and_ep2_to_the_single_process_step(  # noqa: F811
        layout, converted, chats, single_shared, tmp_path):  # noqa: F811
    """The single process's checkpoint of step 2 (one replicated entry per layer and linear, no per-expert adapter)
    resumed at TP2 + SP (each rank's experts see its half of the tokens: the shared adapter's gradient summed over
    TP) and at EP2 (each rank two of the four experts: summed over the data-parallel ranks) logs its step 3."""
    root, single = single_shared
    reader = TorchDistReader(iteration_dir(root / "ckpt-single", 2))
    try:
        model = [k for k in reader.tensors if not TRAINING_STATE_KEY.match(k)]
    finally:
        reader.close()
    assert any(".experts.lora_shared_fc1.lora." in k for k in model)
    assert not any(".local_experts." in k or ".experts.experts." in k for k in model)
    saved = tmp_path / "adapters"
    shutil.copytree(root / "ckpt-single", saved)
    resumed = recipe(tmp_path, *FLAGS, "--ckpt-step", "2", nproc=2, LOAD=str(converted), SAVE=str(saved),
                     SFT_DATA_PATH=str(chats), run_name=layout, **SHARED, **SHARED_RESUME_LAYOUTS[layout])
    _assert_resumed_step_3(single, resumed)


@pytest.mark.usefixtures("megatron_single_process")
def test_one_adapter_shared_by_the_experts_exports_merged_and_as_a_peft_adapter(converted, single_shared, tmp_path):  # noqa: F811
    """Merged, the shared adapter updates every expert's weights; as a PEFT adapter every expert holds a copy:
    transformers and peft give load_model's logits."""
    from peft import PeftModel

    from megatron_qwen35.inference import load_model
    from tests.test_lora_export import TOL, _hf_model, _ids, _logits, _megatron_logits

    saved = single_shared[0] / "ckpt-single"
    tool = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")
    assert tool["main"](["--megatron-dir", str(saved), "--base-dir", str(converted), "--out-dir",
                         str(tmp_path / "merged"), "--no-progress"]) == 0
    assert tool["main"](["--megatron-dir", str(saved), "--adapter-only", "--out-dir", str(tmp_path / "adapter")]) == 0
    ids = _ids()
    want = _megatron_logits(load_model(saved, base=converted), ids)
    assert (_megatron_logits(load_model(converted), ids) - want).abs().max().item() > 1e-3
    assert (_logits(_hf_model(tmp_path / "merged"), ids) - want).abs().max().item() <= TOL
    peft = PeftModel.from_pretrained(_hf_model(converted.parent / "hf"), tmp_path / "adapter").eval()
    assert (_logits(peft, ids) - want).abs().max().item() <= TOL


@pytest.mark.usefixtures("megatron_single_process")
def test_lora_run_checkpoint_exports_merged_on_its_base_and_as_a_peft_adapter(converted, single, tmp_path, capsys):  # noqa: F811
    """The trained adapters (the run's checkpoint at step 3) on their base: megatron_to_hf.py with --base-dir writes
    the merged model, whose transformers logits are load_model's LoRA model's; --adapter-only writes a PEFT adapter
    that peft puts on the Hugging Face base to the same logits. Without --base-dir the export is refused by name and
    writes nothing."""
    import torch
    from peft import PeftModel

    from megatron_qwen35.inference import load_model
    from tests.test_lora_export import TOL, _hf_model, _ids, _logits, _megatron_logits

    saved = single[0] / "ckpt-single"
    tool = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")
    assert tool["main"](["--megatron-dir", str(saved), "--out-dir", str(tmp_path / "alone"), "--no-progress"]) == 2
    assert ("holds LoRA adapters without their frozen base: name the checkpoint they were trained on with --base-dir "
            f"(its training run named the base {str(converted)!r})") in capsys.readouterr().err
    assert not (tmp_path / "alone").exists()
    assert tool["main"](["--megatron-dir", str(saved), "--base-dir", str(converted), "--out-dir",
                         str(tmp_path / "merged"), "--no-progress"]) == 0
    assert tool["main"](["--megatron-dir", str(saved), "--adapter-only", "--out-dir", str(tmp_path / "adapter")]) == 0
    with pytest.raises(ValueError, match="holds LoRA adapters without their frozen base: give `base`"):
        load_model(saved)
    ids = _ids()
    want = _megatron_logits(load_model(saved, base=converted), ids)
    assert (_megatron_logits(load_model(converted), ids) - want).abs().max().item() > 1e-3  # the adapters trained
    assert (_logits(_hf_model(tmp_path / "merged"), ids) - want).abs().max().item() <= TOL
    peft = PeftModel.from_pretrained(_hf_model(converted.parent / "hf"), tmp_path / "adapter").eval()
    assert (_logits(peft, ids) - want).abs().max().item() <= TOL
    assert torch.isfinite(want).all()
    # tools/generate.py --base: the adapters on their base, peft's greedy tokens
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    tokenizer, prompt = Qwen35Tokenizer(), "ab c"
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        greedy = peft.generate(input_ids=prompt_ids, max_new_tokens=6, do_sample=False)[0, prompt_ids.shape[1]:]
    capsys.readouterr()
    generate = runpy.run_path(str(REPO / "tools/generate.py"), run_name="cli")["main"]
    assert generate(["--checkpoint", str(saved), "--base", str(converted), "--prompt", prompt,
                     "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(greedy.tolist()) + "\n"


@pytest.mark.usefixtures("megatron_single_process")
def test_a_peft_adapter_imported_with_its_base_trains_on_from_its_weights(converted, chats, single, tmp_path):  # noqa: F811
    """hf_to_megatron.py --adapter writes the base and a peft adapter in one checkpoint, its own base: a LoRA run
    from it (LOAD=) starts from base + adapter, so its first loss is that of a run with fresh adapters (B = 0) on
    the merged export of the same checkpoint, converted back."""
    import torch
    from peft import get_peft_model

    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
    from tests.test_lora import peft_config
    from tests.test_lora_export import _hf_model

    hf = converted.parent / "hf"
    torch.manual_seed(5)
    get_peft_model(_hf_model(hf), peft_config(qwen35_preset(PRESET), rank=4, alpha=8, router=True)).save_pretrained(
        tmp_path / "adapter")
    imported = qwen35_hf_to_megatron(hf, tmp_path / "imported", adapter=tmp_path / "adapter", progress=False)
    merged = qwen35_hf_to_megatron(qwen35_megatron_to_hf(imported, tmp_path / "merged_hf", progress=False),
                                   tmp_path / "merged", progress=False)
    one = {**LORA, "TRAIN_ITERS": "1", "WARMUP": "0"}
    on_adapter = recipe(tmp_path, *FLAGS, nproc=1, LOAD=str(imported), SFT_DATA_PATH=str(chats),
                        run_name="on_adapter", **one)
    on_merged = recipe(tmp_path, *FLAGS, nproc=1, LOAD=str(merged), SFT_DATA_PATH=str(chats),
                       run_name="on_merged", **one)
    a, b = on_adapter.losses[1], on_merged.losses[1]
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    assert abs(a - single[1].losses[1]) > 1e-3  # the base alone (fresh adapters on it) gives another loss
    # its merged export, with the base the run named (which holds the adapters it started from): that base's
    # weights alone and the run's adapters, the same bytes as merged into the plain converted base
    trained = tmp_path / "ckpt-on_adapter"
    on_imported = qwen35_megatron_to_hf(trained, tmp_path / "on_imported", base_dir=imported, progress=False)
    on_plain = qwen35_megatron_to_hf(trained, tmp_path / "on_plain", base_dir=converted, progress=False)
    files = sorted(p.name for p in on_plain.iterdir())
    assert files == sorted(p.name for p in on_imported.iterdir()) and any(f.endswith(".safetensors") for f in files)
    for name in files:
        assert (on_imported / name).read_bytes() == (on_plain / name).read_bytes(), name


@pytest.mark.usefixtures("megatron_single_process")
def test_lora_on_the_mtp_layer_trains_and_merges_into_it(converted, chats, tmp_path, capsys):  # noqa: F811
    """LORA_MTP=1: the MTP layer's linears get adapters too, which train with the others, are saved, and merge into
    the MTP weights of the export (W + alpha / r B A, here checked on its attention output projection); the PEFT
    form, which transformers' MTP-less model has no place for, is refused by name with nothing written."""
    import torch

    from megatron_qwen35.convert.safetensors_files import SafetensorsCheckpoint

    recipe(tmp_path, *FLAGS, LOAD=str(converted), SFT_DATA_PATH=str(chats), run_name="mtp",
           **{**LORA, "LORA_MTP": "1", "TRAIN_ITERS": "2"})
    saved = tmp_path / "ckpt-mtp"
    linear = "mtp.layers.0.transformer_layer.self_attention.linear_proj"  # (its checkpoint name)
    reader = TorchDistReader(iteration_dir(saved, 2))
    try:
        adapters = sorted(k for k in reader.tensors if k.startswith(f"{linear}.lora."))
        assert len(adapters) == 2, adapters  # its A and B
        a, b = (reader.read(k).double() for k in adapters)  # A_<part>, then B_0
    finally:
        reader.close()
    assert b.abs().max().item() > 0  # trained (step 1 ran at warm-up's learning rate 0)
    tool = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")["main"]
    assert tool(["--megatron-dir", str(saved), "--base-dir", str(converted), "--out-dir", str(tmp_path / "merged"),
                 "--no-progress"]) == 0
    name = "mtp.layers.0.self_attn.o_proj.weight"
    base = SafetensorsCheckpoint(converted.parent / "hf")[name]
    merged = SafetensorsCheckpoint(tmp_path / "merged")[name]
    want = base.double() + int(LORA["LORA_ALPHA"]) / int(LORA["LORA_RANK"]) * (b @ a)
    assert (merged.double() - want).abs().max().item() <= 1e-6 and not torch.equal(merged, base)
    capsys.readouterr()
    assert tool(["--megatron-dir", str(saved), "--adapter-only", "--out-dir", str(tmp_path / "adapter")]) == 2
    assert "MTP" in capsys.readouterr().err and not (tmp_path / "adapter").exists()
