"""Launch mistakes are refused before any rank starts, in one line, with nothing written; valid inputs that used to be
refused (a checkpoint without MTP weights, a small corpus with evaluation off) train. Everything through the commands
users run: recipes/common.sh (its preflight, then torchrun), pretrain_qwen35.py launched directly, the data tools."""

import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qwen35.checkpoint import CONFIG
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
from megatron_qwen35.convert.safetensors_files import SafetensorsCheckpoint
from tests.pretrain_runs import REPO, TINY_RUN, pretrain, recipe
from tests.test_convert import make_hf_checkpoint
from tests.test_file_names import tree

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def assert_refused_in_one_line(run, *, says: str) -> str:
    """The launch printed exactly one line, the error, and exited 2: no rank started, no traceback."""
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines[-40:]
    assert run.returncode == 2, run.returncode
    return lines[0]


def recipe_refused(tmp_path: Path, *flags: str, says: str, nproc: int = 1, **settings) -> str:
    """The recipe (extra Megatron `flags` last) refuses the launch in one line and leaves tmp_path exactly as it was
    (no --save, no TensorBoard folder, nothing changed in its inputs)."""
    before = tree(tmp_path)
    # Python's warnings on, as a user's shell has them (the other runs of the suite ignore them)
    run = recipe(tmp_path, *flags, nproc=nproc, check=False, **{"PYTHONWARNINGS": "default", **settings})
    line = assert_refused_in_one_line(run, says=says)
    assert tree(tmp_path) == before
    return line


def test_a_vl_dataset_naming_a_shard_outside_its_folder_is_refused_at_launch(tmp_path):
    """A crafted index.json in VL_DATA_PATH: its shard names are data, refused by name before any rank reads one."""
    from megatron_qwen35.data.preprocess_vl import FORMAT, INDEX

    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / INDEX).write_text(json.dumps({"format": FORMAT, "vision": {}, "eod_id": 0, "patch_dim": 1,
                                                     "shards": [{"file": "../x.safetensors", "samples": 1}]}))
    recipe_refused(tmp_path, PRESET="tiny-vl-moe", MOCK_DATA="0", VL_DATA_PATH=str(tmp_path / "vl"),
                   says="'../x.safetensors', which is not a plain file name")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tiny-moe with MTP weights, converted: a release checkpoint."""
    root = tmp_path_factory.mktemp("converted")
    hf = make_hf_checkpoint(root / "hf", "tiny-moe", how="packed", mtp_layout="per_expert", seed=3)
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


@pytest.fixture
def checkpoint(converted, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(converted, copy)
    return copy


def test_a_layout_the_heads_cannot_split_is_refused_before_any_rank_starts(tmp_path):
    """tiny has 2 GDN key heads: TP4 was a megatron-core assert deep in the build, on every rank (159 lines)."""
    recipe_refused(tmp_path, nproc=4, PRESET="tiny", TP="4",
                   says="linear_num_key_heads=2 is not divisible by tensor_parallel=4")


def test_an_expert_layout_that_does_not_tile_the_ranks_is_refused_before_any_rank_starts(tmp_path):
    """EP2 x ETP2 on 2 ranks: megatron-core's initialize_model_parallel raised on every rank after torchrun started."""
    recipe_refused(tmp_path, nproc=2, EP="2", ETP="2",
                   says="the layout's EP 2 x expert-TP 2 x PP 1 = 4 does not divide the job's 2 process(es)")


def test_pretrain_launched_directly_refuses_on_rank_0_only_and_without_a_traceback(tmp_path):
    """3 KV heads at TP2, launched as `torchrun pretrain_qwen35.py` (no recipe): every rank runs the same check,
    rank 0 says it once, no rank prints a traceback, nothing is written."""
    hf = make_config_json("tiny", num_key_value_heads=3, num_attention_heads=6)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    base = tuple(str(tmp_path / "config.json") if a == "tiny-moe" else "--hf-config" if a == "--qwen35-preset"
                 else a for a in TINY_RUN)
    before = tree(tmp_path)
    run = pretrain(tmp_path, "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "save"),
                   "--save-interval", "1", nproc=2, base=base, check=False)
    out = run.stdout + run.stderr
    assert out.count("num_query_groups=3 neither divides nor is divisible by tensor_parallel=2") == 1, out[-3000:]
    assert "pretrain_qwen35.py\", line" not in out and not run.losses
    assert tree(tmp_path) == before


def test_an_moe_model_at_tp2_without_sequence_parallelism_is_refused_on_rank_0_without_a_traceback(tmp_path):
    """megatron-core's MoE layer refuses training at TP > 1 without SP in its first forward, on every rank, after the
    model and optimizer are built; launched directly, the check before the build says it once."""
    run = pretrain(tmp_path, "--tensor-model-parallel-size", "2", nproc=2, check=False)
    out = run.stdout + run.stderr
    assert out.count("MoE model 'tiny-moe' at --tensor-model-parallel-size 2 trains with --sequence-parallel") == 1, \
        out[-3000:]
    assert "pretrain_qwen35.py\", line" not in out and not run.losses  # (torchrun reports the ranks' exit code 2)


def make_config_json(preset: str, **changes) -> dict:
    from megatron_qwen35.config import qwen35_config_to_hf, qwen35_preset

    hf = qwen35_config_to_hf(qwen35_preset(preset))
    hf.update(changes)
    return hf


def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path):
    recipe_refused(tmp_path, TRAIN_ITERS="100", WARMUP="2000", says="--lr-warmup-iters 2000 (WARMUP) must be below")


def test_an_optimizer_the_distributed_optimizer_cannot_hold_is_refused(tmp_path):
    """--optimizer sgd beside the recipes' --use-distributed-optimizer: megatron-core's DistributedOptimizer asserted
    on every rank after building the model."""
    recipe_refused(tmp_path, "--optimizer", "sgd",
                   says="--optimizer sgd with --use-distributed-optimizer (the recipes set it)")


def test_a_run_without_a_length_is_refused(tmp_path):
    """TRAIN_ITERS=0: megatron raised 'either train-iters or train-samples should be provided' on every rank after
    building the model and optimizer."""
    recipe_refused(tmp_path, TRAIN_ITERS="0", WARMUP="0", says="--train-iters 0 (TRAIN_ITERS): give the run a length")


def test_a_missing_data_path_is_refused(tmp_path):
    recipe_refused(tmp_path, MOCK_DATA="0", DATA_PATH=str(tmp_path / "corpus"),
                   says=f"--data-path {tmp_path / 'corpus'}: {tmp_path / 'corpus'}.bin and")


def test_no_training_data_or_two_sources_of_it_are_refused_by_the_recipe(tmp_path):
    """No data was bash's own `DATA_PATH: set ...` (exit 1); two sources silently trained on one of them: the recipe
    passes every source given and pretrain_qwen35.py's check names them."""
    recipe_refused(tmp_path, MOCK_DATA="0", says="error: no training data: give --data-path PREFIX (DATA_PATH;")
    recipe_refused(tmp_path, SFT_DATA_PATH=str(tmp_path / "chats"),
                   says="--mock-data (MOCK_DATA=1) and --sft-data-path (SFT_DATA_PATH) both name training data")
    recipe_refused(tmp_path, MOCK_DATA="0", DATA_PATH=str(tmp_path / "c"), VL_DATA_PATH=str(tmp_path / "vl"),
                   says="--data-path (DATA_PATH) and --vl-data-path (VL_DATA_PATH) both name training data")


def test_lora_settings_without_a_rank_or_on_a_layer_the_run_lacks_are_refused(tmp_path):
    """A LoRA setting without a rank trained the whole model without a word (recipe and flag alike); LORA_MTP=1 with
    MTP=0 recorded adapters on an MTP layer the run did not have."""
    recipe_refused(tmp_path, LORA_ALPHA="16", says="--lora-alpha is a LoRA setting, and --lora-rank (LORA_RANK) is 0")
    before = tree(tmp_path)
    run = recipe(tmp_path, "--lora-target-modules", "q_proj", check=False)
    assert_refused_in_one_line(run, says="--lora-target-modules is a LoRA setting, and --lora-rank (LORA_RANK) is 0")
    assert tree(tmp_path) == before
    recipe_refused(tmp_path, LORA_RANK="4", LORA_MTP="1", MTP="0", LOAD=str(tmp_path / "base"),
                   says="--lora-mtp (LORA_MTP=1): this run's 'tiny-moe' has no MTP layer")


def test_a_bare_megatron_assert_and_a_save_folder_with_a_link_loop_are_named(tmp_path):
    """GLOBAL_BATCH=0: megatron's assert has no message, so its own line is quoted (the refusal said nothing after
    'argument check:'); a link loop in --save was a RuntimeError traceback from the link check."""
    line = recipe_refused(tmp_path, GLOBAL_BATCH="0", says="megatron's argument check: assert ")
    assert "global_batch_size" in line and "arguments.py:" in line, line
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "loop").symlink_to("loop")
    recipe_refused(tmp_path, SAVE=str(tmp_path / "save"), says=f"--save {tmp_path / 'save'}: {tmp_path / 'save'}/loop "
                                                               "is a link to loop")


def test_a_vl_data_folder_without_samples_is_refused(tmp_path):
    (tmp_path / "vl").mkdir()
    recipe_refused(tmp_path, PRESET="tiny-vl-moe", MOCK_DATA="0", VL_DATA_PATH=str(tmp_path / "vl"),
                   says=f"--vl-data-path {tmp_path / 'vl'}: {tmp_path / 'vl'} is not a VL dataset directory")


def preprocessed(tmp_path: Path, tool: str, preset: str) -> Path:
    """CHAT_AND_VL_TOOLS' rows through `tool` for `preset`, in tmp_path/<tool's stem>-<preset>."""
    rows, _ = CHAT_AND_VL_TOOLS[tool]
    (tmp_path / "rows.jsonl").write_text(rows + "\n")
    out = tmp_path / f"{Path(tool).stem}-{preset}"
    main = runpy.run_path(str(REPO / "tools/data" / tool), run_name="cli")["main"]
    assert main(["--input", str(tmp_path / "rows.jsonl"), "--output-dir", str(out), "--qwen35-preset", preset]) == 0
    return out


def test_chat_data_that_does_not_fit_the_run_is_refused_at_launch(tmp_path):
    """SFT_DATA_PATH made for another model, a conversation longer than SEQ_LEN, more than one packed sequence per
    micro-batch (a --micro-batch-size after the recipe's, which sets 1): one line each, before any rank starts."""
    chats = preprocessed(tmp_path, "preprocess_sft.py", "tiny-moe")
    vl_chats = preprocessed(tmp_path, "preprocess_sft.py", "tiny-vl")
    recipe_refused(tmp_path, MOCK_DATA="0", SFT_DATA_PATH=str(vl_chats), SEQ_LEN="256",
                   says=f"--sft-data-path {vl_chats} was preprocessed for model 'tiny-vl' (vocabulary 512, vision "
                        "tower); this run's 'tiny-moe' differs (vocabulary 512, no vision tower)")
    recipe_refused(tmp_path, MOCK_DATA="0", SFT_DATA_PATH=str(chats), SEQ_LEN="16",
                   says="tokens, more than --seq-length 16 holds")
    recipe_refused(tmp_path, "--micro-batch-size", "2", MOCK_DATA="0", SFT_DATA_PATH=str(chats), SEQ_LEN="256",
                   says="--micro-batch-size 1 (a packed sequence already holds several conversations), not 2")
    run = recipe(tmp_path, MOCK_DATA="0", SFT_DATA_PATH=str(chats), SEQ_LEN="256", TRAIN_ITERS="1", WARMUP="0",
                 GLOBAL_BATCH="1")  # the same data and run otherwise train
    assert list(run.losses) == [1]


def test_vl_data_for_another_vision_config_or_without_samples_is_refused_at_launch(tmp_path):
    """VL_DATA_PATH made for tiny-vl (vision token ids in a 512-token vocabulary) on tiny-vl-demo (the real
    vocabulary's ids), and an index listing no samples."""
    from megatron_qwen35.data.preprocess_vl import INDEX

    samples = preprocessed(tmp_path, "preprocess_vl.py", "tiny-vl")
    recipe_refused(tmp_path, PRESET="tiny-vl-demo", MOCK_DATA="0", VL_DATA_PATH=str(samples),
                   says=f"--vl-data-path {samples} was preprocessed for another vision config than model "
                        "'tiny-vl-demo' (field: data, model): {'image_token_id': (508, 248056)")
    index = json.loads((samples / INDEX).read_text())
    (samples / INDEX).write_text(json.dumps({**index, "shards": []}))
    recipe_refused(tmp_path, PRESET="tiny-vl", MOCK_DATA="0", VL_DATA_PATH=str(samples),
                   says=f"--vl-data-path {samples} holds no samples")


def test_a_hugging_face_folder_or_a_checkpoint_missing_a_data_file_as_load_is_refused(checkpoint, tmp_path):
    """LOAD= a Hugging Face folder (not converted), or a Megatron checkpoint whose .distcp file is gone or cut off (a
    copy interrupted): named before any rank starts, where dist_checkpointing failed deep in torch on every rank."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    recipe_refused(tmp_path, LOAD=str(hf), says=f"--pretrained-checkpoint {hf} is a Hugging Face checkpoint, not a "
                                                 "Megatron one: convert it first")
    data = sorted((checkpoint / "release").glob("*.distcp"))[0]
    os.truncate(data, data.stat().st_size // 2)
    recipe_refused(tmp_path, LOAD=str(checkpoint), says=f"{data} is cut off at {data.stat().st_size} bytes")
    data.unlink()
    recipe_refused(tmp_path, LOAD=str(checkpoint), says=f"{data} is missing (it holds '")


def test_another_tools_checkpoint_of_another_model_is_named_by_its_tensors_and_left_unchanged(checkpoint, tmp_path):
    """No qwen35_config.json (a checkpoint another tool wrote), --load = --save as the recipes default: refused from
    its own tensor metadata, naming the first differing tensors, and the checkpoint is not written to."""
    (checkpoint / CONFIG).unlink()
    line = recipe_refused(tmp_path, PRESET="tiny", LOAD=str(checkpoint), SAVE=str(checkpoint),
                          says=f"--load {checkpoint} holds another model than this run's 'tiny' (no {CONFIG}; "
                               "its tensors:")
    assert "decoder.layers.0.mlp.linear_fc1.weight' is missing" in line


def test_another_tools_checkpoint_of_this_model_fine_tunes(checkpoint, tmp_path):
    """... and one that holds this model loads, and the run then writes its qwen35_config.json into --save. The same
    command run again (a job requeued after it stopped at step 1) resumes its SAVE at step 2, not LOAD at step 1."""
    (checkpoint / CONFIG).unlink()
    same = dict(LOAD=str(checkpoint), SAVE=str(tmp_path / "tuned"), TRAIN_ITERS="2", WARMUP="0")
    run = recipe(tmp_path, "--exit-interval", "1", run_name="stopped", **same)
    assert list(run.losses) == [1] and (tmp_path / "tuned" / CONFIG).is_file()
    again = recipe(tmp_path, run_name="requeued", **same)
    assert list(again.losses) == [2], again.stderr[-3000:]
    assert f"--load {tmp_path / 'tuned'} holds iteration 1: the run resumes it" in again.stdout + again.stderr
    recipe_refused(tmp_path, **same, says=f"ends the run there: nothing is left to train; to train on, raise it and "
                                          "add --override-opt_param-scheduler (megatron otherwise holds the run to the "
                                          f"saved schedule); to start again from --pretrained-checkpoint {checkpoint} "
                                          "(LOAD), --save (SAVE) a new folder")


def test_a_load_that_names_no_checkpoint_is_refused_not_trained_from_random(checkpoint, tmp_path):
    """megatron warns and trains from random weights when --load holds no tracker: a file, one iteration folder of a
    checkpoint (a common slip), a missing or an empty folder as the recipe's LOAD (its --pretrained-checkpoint, SAVE
    being empty), and a --load other than --save that holds nothing (pretrain_qwen35.py launched directly) are
    refused by name."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for load, says in [(tmp_path / "notes.txt", "is a file"),
                       (checkpoint / "release",
                        f"is one iteration of the checkpoint {checkpoint}: --pretrained-checkpoint {checkpoint}"),
                       (tmp_path / "missing", "does not exist: it names the checkpoint a run starts from"),
                       (tmp_path / "empty", "holds no checkpoint (latest_checkpointed_iteration.txt is missing)")]:
        recipe_refused(tmp_path, LOAD=str(load), SAVE=str(tmp_path / "tuned"),
                       says=f"--pretrained-checkpoint {load} {says}")
    direct = pretrain(tmp_path, "--train-iters", "1", "--load", str(tmp_path / "empty"), "--save",
                      str(tmp_path / "tuned"), "--save-interval", "1", check=False)
    assert f"--load {tmp_path / 'empty'} holds no checkpoint" in direct.stderr and "it is not --save" in direct.stderr
    assert direct.returncode == 2 and not direct.losses and not (tmp_path / "tuned").exists()
    # (LOAD=SAVE still empty, the recipes' default, trains: every recipe run of the suite without LOAD= does)


CRAFTED_RECORDS = {  # how the loaded checkpoint's record was changed -> what the refusal says
    "a file outside": (lambda meta: meta["hf_files"].update({"../escaped.txt": "x"}),
                       "'../escaped.txt' among the Hugging Face side files"),
    "a field missing": (lambda meta: meta.pop("source_dtype"),
                        "a damaged conversion record (KeyError: 'source_dtype')"),
}


@pytest.mark.parametrize("crafted", list(CRAFTED_RECORDS))
def test_a_crafted_conversion_record_in_the_loaded_checkpoint_is_refused_at_launch(checkpoint, tmp_path, crafted):
    """Training copies the record into --save: a crafted or damaged one is refused before it travels."""
    change, says = CRAFTED_RECORDS[crafted]
    config = json.loads((checkpoint / CONFIG).read_text())
    change(config["metadata"])
    (checkpoint / CONFIG).write_text(json.dumps(config))
    recipe_refused(tmp_path, LOAD=str(checkpoint), SAVE=str(tmp_path / "tuned"), says=says)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """201 short documents, tokenized with the real tokenizer (the README's fine-tuning flow on a small corpus)."""
    root = tmp_path_factory.mktemp("small")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"Document {i}: a short line."}) + "\n"
                                             for i in range(201)))
    tool = runpy.run_path(str(REPO / "tools/data/preprocess.py"), run_name="cli")["main"]
    assert tool(["--input", str(root / "docs.jsonl"), "--output-prefix", str(root / "corpus")]) == 0
    return root / "corpus"


def test_cut_off_or_damaged_data_is_named_at_launch(small_corpus, tmp_path):
    """A cut-off .idx or .bin (evaluation off: nothing else reads them before the ranks do), a cut-off chat shard and
    a damaged VL index: one line naming the file, where the ranks crashed (writing into --save) or preflight raised."""
    corpus = tmp_path / "data" / "corpus"
    corpus.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{small_corpus}{suffix}", f"{corpus}{suffix}")
    os.truncate(f"{corpus}.bin", os.path.getsize(f"{corpus}.bin") // 2)
    recipe_refused(tmp_path, PRESET="tiny-demo", MOCK_DATA="0", DATA_PATH=str(corpus), SEQ_LEN="64",
                   says=f"--data-path {corpus}: {corpus}.bin is cut off")
    os.truncate(f"{corpus}.idx", 20)
    recipe_refused(tmp_path, PRESET="tiny-demo", MOCK_DATA="0", DATA_PATH=str(corpus), SEQ_LEN="64",
                   says=f"{corpus}.idx is not a readable Megatron index (no index header)")
    chats = preprocessed(tmp_path, "preprocess_sft.py", "tiny-moe")
    shard = chats / "shard_00000.safetensors"
    os.truncate(shard, shard.stat().st_size - 8)
    recipe_refused(tmp_path, MOCK_DATA="0", SFT_DATA_PATH=str(chats), SEQ_LEN="64",
                   says=f"{shard}: not a readable shard")
    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / "index.json").write_text("[]")
    recipe_refused(tmp_path, PRESET="tiny-vl-moe", MOCK_DATA="0", VL_DATA_PATH=str(tmp_path / "vl"),
                   says="index.json: format 'list', expected one of ['qwen35-vl-samples/1']")
    recipe_refused(tmp_path, MOCK_DATA="0", SFT_DATA_PATH=str(tmp_path / "corpus"), SEQ_LEN="64",
                   says="is not a chat dataset directory: it has no index.json (tools/data/preprocess_sft.py")


def test_a_small_corpus_fine_tunes_with_evaluation_off(small_corpus, tmp_path):
    """--split 99,1,0 (the recipe's) leaves a validation part without one full sequence; with EVAL_ITERS=0 nothing
    needs it (megatron asserted 'no sample to consume: 0' on every rank after building the model)."""
    run = recipe(tmp_path, PRESET="tiny-demo", MOCK_DATA="0", DATA_PATH=str(small_corpus), SEQ_LEN="256",
                 TRAIN_ITERS="1", WARMUP="0", EVAL_ITERS="0")
    assert list(run.losses) == [1]


def test_an_empty_validation_part_is_named_when_evaluation_is_on(small_corpus, tmp_path):
    recipe_refused(tmp_path, PRESET="tiny-demo", MOCK_DATA="0", DATA_PATH=str(small_corpus), SEQ_LEN="256",
                   EVAL_ITERS="1", says=f"--split 99,1,0 leaves the validation part of {small_corpus} 2 of 201 "
                                        "documents")


@pytest.fixture(scope="module")
def without_mtp(tmp_path_factory):
    """A tiny-moe checkpoint as transformers' save_pretrained writes it (no MTP weights), converted."""
    root = tmp_path_factory.mktemp("no_mtp")
    hf = make_hf_checkpoint(root / "hf", "tiny-moe", seed=4)
    assert not any(n.startswith("mtp.") for n in SafetensorsCheckpoint(hf))
    return hf, qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


@pytest.mark.parametrize("mtp", ["fresh", "off"])
def test_a_checkpoint_without_mtp_weights_fine_tunes_through_the_recipe(without_mtp, tmp_path, mtp):
    """The recipe of its size (MTP on) starts the MTP layer from its initialisation, saying so; MTP=0 trains
    without. At learning rate 0 the export is the source to the bit (the load took every weight), plus the MTP
    layer the run trained (none with MTP=0). Resuming MTP=0's iteration with MTP on is refused: an iteration's
    optimizer state covers the parameters it was saved with."""
    hf, converted = without_mtp
    settings = dict(LOAD=str(converted), SAVE=str(tmp_path / "tuned"), TRAIN_ITERS="1", WARMUP="0", LR="0", MIN_LR="0",
                    **({"MTP": "0"} if mtp == "off" else {}))
    run = recipe(tmp_path, "--weight-decay", "0", **settings)
    assert list(run.losses) == [1]
    assert ("MTP layer(s) start from their initialisation" in run.stdout + run.stderr) == (mtp == "fresh")
    qwen35_megatron_to_hf(tmp_path / "tuned", tmp_path / "export", progress=False)
    source, export = SafetensorsCheckpoint(hf), SafetensorsCheckpoint(tmp_path / "export")
    mtp_names = {n for n in export if n.startswith("mtp.")}
    assert bool(mtp_names) == (mtp == "fresh")
    assert set(export) - mtp_names == set(source)
    for name in source:
        assert export[name].equal(source[name]), name
    if mtp == "off":
        recipe_refused(tmp_path, LOAD=str(tmp_path / "tuned"), SAVE=str(tmp_path / "tuned"), TRAIN_ITERS="2",
                       says="resumes an iteration saved with no MTP layer(s), this run has 1")


def test_a_run_saving_into_the_checkpoint_it_loaded_leaves_it_describing_what_it_holds_until_it_saves(
        without_mtp, tmp_path):
    """LOAD = SAVE (the recipes' default) on a checkpoint without MTP weights, MTP on: a run that dies after the
    load and before its first save (a NaN loss at step 2, megatron's rerun machine off so it saves nothing) leaves
    the folder exporting the source to the bit, no MTP; the same command then trains from it (the MTP layer fresh,
    said again) and, once it has saved, the folder holds and exports the MTP layer it trained. Launched again as it
    was, the finished run is refused; with a longer run, the schedule that differs from the saved one is named, and
    with --override-opt_param-scheduler it trains on."""
    hf, converted = without_mtp
    folder = tmp_path / "ckpt"
    shutil.copytree(converted, folder)
    same = dict(LOAD=str(folder), SAVE=str(folder), WARMUP="0")
    failed = recipe(tmp_path, "--rerun-mode", "disabled", check=False, run_name="failed", LR="1e30", MIN_LR="1e30",
                    **same)
    assert failed.returncode != 0 and list(failed.losses) == [1], failed.stderr[-3000:]
    assert "found NaN" in failed.stdout + failed.stderr and not list(folder.glob("iter_*"))
    qwen35_megatron_to_hf(folder, tmp_path / "after_failure", progress=False)
    source, export = SafetensorsCheckpoint(hf), SafetensorsCheckpoint(tmp_path / "after_failure")
    assert set(export) == set(source) and all(export[n].equal(source[n]) for n in source)
    run = recipe(tmp_path, run_name="again", TRAIN_ITERS="1", **same)
    assert list(run.losses) == [1] and "MTP layer(s) start from their initialisation" in run.stdout + run.stderr
    qwen35_megatron_to_hf(folder, tmp_path / "trained", progress=False)
    assert any(n.startswith("mtp.") for n in SafetensorsCheckpoint(tmp_path / "trained"))
    # the same command once more: the run is done (megatron asserted 'no samples left to consume' on every rank)
    recipe_refused(tmp_path, TRAIN_ITERS="1", **same,
                   says=f"--load {folder} is at iteration 1, and --train-iters 1 (TRAIN_ITERS) ends the run there")
    # TRAIN_ITERS raised to train on: megatron's scheduler asserted the saved decay on every rank once all was built
    recipe_refused(tmp_path, TRAIN_ITERS="2", **same,
                   says="resumes a run saved with another learning-rate schedule: lr_decay_steps 4 saved, 8 now")
    # the learning rate changed too (the decay as saved), named by its flag and the recipe's setting
    recipe_refused(tmp_path, "--lr-decay-iters", "1", TRAIN_ITERS="2", **{**same, "LR": "2e-3"},
                   says="resumes a run saved with another learning-rate schedule: max_lr 0.001 saved, 0.002 now "
                        "(--lr (LR))")
    run = recipe(tmp_path, "--override-opt_param-scheduler", run_name="on", TRAIN_ITERS="2", **same)
    assert list(run.losses) == [2], run.stderr[-3000:]
    # its common state (iteration, args, schedule) cut out of the index: named, not torch's per-rank traceback
    metadata = folder / "iter_0000002" / ".metadata"
    index = pickle.loads(metadata.read_bytes())
    index.state_dict_metadata = {k: v for k, v in index.state_dict_metadata.items() if not k.startswith("common")}
    metadata.write_bytes(pickle.dumps(index))
    recipe_refused(tmp_path, TRAIN_ITERS="3", **same,
                   says="iter_0000002's common state (where megatron keeps the iteration, the arguments and the "
                        "learning-rate schedule) cannot be read: RuntimeError: Missing key in checkpoint state_dict")


@pytest.mark.parametrize("linked", ["iteration", "tracker"])
def test_a_save_folder_linking_outside_itself_is_refused_and_nothing_is_written_there(checkpoint, tmp_path, linked):
    """A crafted checkpoint given as LOAD = SAVE (the recipes' default) whose iteration folder or tracker is a link to
    another folder: megatron's save would follow it and write there (measured before: a user's file overwritten, a
    checkpoint written into the other folder, exit 0). Refused before any rank starts; nothing anywhere changes."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    if linked == "iteration":
        (checkpoint / "iter_0000002").symlink_to(victim, target_is_directory=True)
    else:
        tracker = checkpoint / "latest_checkpointed_iteration.txt"
        (victim / tracker.name).write_text(tracker.read_text())
        tracker.unlink()
        tracker.symlink_to(victim / tracker.name)
    link = checkpoint / ("iter_0000002" if linked == "iteration" else "latest_checkpointed_iteration.txt")
    recipe_refused(tmp_path, LOAD=str(checkpoint), SAVE=str(checkpoint),
                   says=f"--save {checkpoint}: {link} is a link to {victim}")


@pytest.mark.parametrize("tool, flags", [
    ("tools/convert/hf_to_megatron.py", ("--hf-dir", "{missing}", "--out-dir", "{out}")),
    ("tools/generate.py", ("--checkpoint", "{missing}", "--prompt", "hi")),
    ("tools/data/preprocess_sft.py", ("--input", "{missing}", "--output-prefix", "{out}/chats", "--qwen35-preset",
                                      "tiny")),
], ids=["convert", "generate", "preprocess_sft"])
def test_a_tool_run_from_a_shell_refuses_in_one_line_without_library_notices(tool, flags, tmp_path):
    """As a user's shell runs them (Python's warnings on): megatron's ten notices that Transformer Engine / Apex are
    absent, FLA's and torch's are kept out of a tool's output, and a missing input is named before any progress bar or
    output folder appears."""
    names = dict(missing=str(tmp_path / "missing"), out=str(tmp_path / "out"))
    env = {**os.environ, "PYTHONWARNINGS": "default", "TORCHDYNAMO_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(REPO / tool), *(f.format(**names) for f in flags)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert_refused_in_one_line(done, says=f"{tmp_path / 'missing'}")
    assert not (tmp_path / "out").exists()


def test_preprocess_names_an_unwritable_output_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    tool = runpy.run_path(str(REPO / "tools/data/preprocess.py"), run_name="cli")["main"]
    (tmp_path / "a.txt").write_text("One paragraph.\n")

    def unwritable(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "__init__", unwritable)
    assert tool(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "out" / "corpus")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Permission denied") and "corpus.tmp" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


CHAT_AND_VL_TOOLS = {  # tool -> (its input rows, its model)
    "preprocess_sft.py": ('{"messages": [{"role": "user", "content": "Hi"}, '
                          '{"role": "assistant", "content": "Hello"}]}', "tiny-moe"),
    "preprocess_vl.py": ('{"text": "A line of text."}', "tiny-vl"),
}


@pytest.mark.parametrize("tool", list(CHAT_AND_VL_TOOLS))
def test_the_chat_and_vl_tools_name_a_full_disk_in_one_line_and_leave_nothing(tool, tmp_path, capsys, monkeypatch):
    """A shard that cannot be written (the disk full mid-run, where the shard's bytes reach the file): one error
    line naming the shard, exit 2, no output folder and no temporary one left beside it."""
    import errno
    import types

    from megatron_qwen35.convert import output_dir

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_dir, "os", types.SimpleNamespace(**{**vars(os), "write": full_disk}))
    rows, preset = CHAT_AND_VL_TOOLS[tool]
    (tmp_path / "rows.jsonl").write_text(rows + "\n")
    main = runpy.run_path(str(REPO / "tools/data" / tool), run_name="cli")["main"]
    assert main(["--input", str(tmp_path / "rows.jsonl"), "--output-dir", str(tmp_path / "out" / "data"),
                 "--qwen35-preset", preset]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "processing:" not in line]
    assert len(err) == 1 and err[0].startswith("error: No space left on device"), err
    assert "shard_00000.safetensors" in err[0] and "free space and run again" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]


@pytest.mark.parametrize("tool", list(CHAT_AND_VL_TOOLS))
def test_the_chat_and_vl_tools_never_replace_their_media_folder(tool, tmp_path, capsys):
    """--output-dir naming the --media-dir (or a folder holding it) with --overwrite would delete the images: refused
    in one line, exit 2, the media folder untouched to the byte."""
    rows, preset = CHAT_AND_VL_TOOLS[tool]
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes((REPO / "data/vl/images/00_red_circle.png").read_bytes())
    (tmp_path / "rows" / "rows.jsonl").parent.mkdir()
    (tmp_path / "rows" / "rows.jsonl").write_text(rows + "\n")
    main = runpy.run_path(str(REPO / "tools/data" / tool), run_name="cli")["main"]
    before = tree(tmp_path)
    assert main(["--input", str(tmp_path / "rows" / "rows.jsonl"), "--media-dir", str(media), "--output-dir",
                 str(media), "--qwen35-preset", preset, "--overwrite"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "processing:" not in line]
    assert len(err) == 1 and err[0] == f"error: output {media} would replace the input {media}; choose another " \
        "output directory", err
    assert tree(tmp_path) == before


def test_preprocess_of_a_rejected_input_leaves_no_output_folder(tmp_path, capsys):
    tool = runpy.run_path(str(REPO / "tools/data/preprocess.py"), run_name="cli")["main"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert tool(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "out" / "c")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


@pytest.mark.parametrize("tool", ["make_vl_demo.py", "make_sft_demo.py"])
def test_the_demo_set_writers_name_an_unwritable_output_in_one_line_and_leave_nothing(tool, tmp_path, capsys):
    """tools/data/make_*_demo.py with --out under a file (a folder that cannot be made): one line, exit 2, nothing
    created; the chat set without images to ask about is named the same way."""
    (tmp_path / "file").write_text("x")
    main = runpy.run_path(str(REPO / "tools/data" / tool), run_name="cli")["main"]
    assert main(["--out", str(tmp_path / "file" / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "file" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["file"]
    if tool == "make_sft_demo.py":
        assert main(["--out", str(tmp_path / "out"), "--media-dir", str(tmp_path)]) == 2
        assert f"error: no images in {tmp_path / 'images'}" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == ["file"]
