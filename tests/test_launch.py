"""pretrain_qwen35.py's launch: the flags it puts in front of the user's, the architecture written once (flags, the
argument check and the provider's check read one table), and every refusal named before anything is built."""

import json
import sys

import pytest
import torch

from megatron_qwen35.config import PRESETS, megatron_fields, qwen35_transformer_config
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.training import launch
from megatron_qwen35.training.flags import add_qwen35_args, check_args_match, qwen35_config_from_args
from tests.pretrain_runs import REPO, TINY_RUN, pretrain
from tests.test_convert import make_hf_checkpoint


def parse(argv: list[str]):
    """megatron.training's parser on the command line pretrain_qwen35.py would hand it (no global state set)."""
    from megatron.training.arguments import parse_args

    saved, sys.argv = sys.argv, ["pretrain_qwen35.py", *launch.qwen35_argv(argv)]
    try:
        return parse_args(add_qwen35_args)
    finally:
        sys.argv = saved


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_architecture_flags_parse_back_to_the_table(preset):
    """Each architecture row, rendered as flags and parsed by megatron's own parser, has the table's value."""
    args = parse(["--qwen35-preset", preset])
    cfg = PRESETS[preset]
    for f in megatron_fields(cfg):
        assert getattr(args, f.dest) == f.value(cfg), f.dest
    check_args_match(args, cfg)
    assert args.hidden_dropout == args.attention_dropout == 0.0  # Qwen3.5 trains without dropout


@pytest.mark.parametrize("flags,named", [
    (["--norm-epsilon", "1e-5"], "--norm-epsilon 1e-05 (needs 1e-06)"),
    (["--moe-layer-freq", "2"], "--moe-layer-freq 2 (needs 1)"),
    (["--rotary-interleaved"], "--rotary-interleaved True (needs False)"),
    (["--moe-router-pre-softmax"], "--moe-router-pre-softmax True (needs False)"),
    (["--moe-router-score-function", "sigmoid"], "--moe-router-score-function 'sigmoid' (needs 'softmax')"),
    (["--mtp-num-layers", "2"], "--mtp-num-layers 2 (needs 1)"),
    (["--num-layers", "8", "--window-size", "4,0"], "--num-layers 8 (needs 4); --window-size (4, 0) (needs None)"),
    (["--make-vocab-size-divisible-by", "128"], "--make-vocab-size-divisible-by 128 (needs 1)"),
])
def test_a_flag_that_contradicts_the_architecture_is_refused_by_name(flags, named):
    args = parse(["--qwen35-preset", "tiny-moe", *flags])
    with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
        check_args_match(args, qwen35_config_from_args(args))


def test_project_and_no_cuda_flags_come_first_and_the_users_last():
    args = parse(["--qwen35-preset", "tiny", "--hidden-dropout", "0.1"])
    assert not args.create_attention_mask_in_dataloader  # no s x s mask per sample; every layer is causal by type
    assert (args.transformer_impl, args.distributed_backend, args.use_cpu_initialization) == ("local", "gloo", True)
    assert not (args.apply_rope_fusion or args.masked_softmax_fusion or args.bias_swiglu_fusion)
    assert args.hidden_dropout == 0.1  # a training knob: the user's later flag wins


def test_gradient_accumulation_fusion_is_off_where_apex_cannot_fuse(monkeypatch):
    """megatron's own output layer raises at build time with gradient accumulation fusion on and no APEX kernel."""
    monkeypatch.setattr(launch, "gradient_accumulation_fusion_available", lambda: False)
    assert "--no-gradient-accumulation-fusion" in launch.qwen35_argv(["--qwen35-preset", "tiny"])
    monkeypatch.setattr(launch, "gradient_accumulation_fusion_available", lambda: True)
    assert "--no-gradient-accumulation-fusion" not in launch.qwen35_argv(["--qwen35-preset", "tiny"])


def test_the_config_builder_takes_device_and_backend_from_its_caller(monkeypatch):
    """Nothing probes the machine: megatron's fused rope (Transformer Engine's) is on only for backend 'te' on CUDA
    (a CUDA machine without TE raised in TransformerConfig when it was probed), CUDA fusions only on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what the machine says does not matter
    cpu = qwen35_transformer_config(PRESETS["tiny"])
    assert (cpu.transformer_impl, cpu.apply_rope_fusion, cpu.use_cpu_initialization) == ("local", False, True)
    local_cuda = qwen35_transformer_config(PRESETS["tiny"], backend="local", device="cuda",
                                           use_cpu_initialization=True)
    assert (local_cuda.apply_rope_fusion, local_cuda.masked_softmax_fusion) == (False, True)


def test_refused_flag_stops_before_anything_is_built(tmp_path):
    run = pretrain(tmp_path, "--train-iters", "1", "--norm-epsilon", "1e-5", "--save", str(tmp_path / "ckpt"),
                   "--save-interval", "1", check=False)
    assert "--norm-epsilon 1e-05 (needs 1e-06)" in run.stderr + run.stdout
    assert not (tmp_path / "ckpt").exists() and not run.losses


@pytest.fixture(scope="module")
def converted_vl(tmp_path_factory):
    """A converted tiny MoE vision-language checkpoint (text model, vision tower, MTP)."""
    root = tmp_path_factory.mktemp("vl")
    hf = make_hf_checkpoint(root / "hf", "tiny-vl-moe", mtp_layout="packed", how="packed")
    return qwen35_hf_to_megatron(hf, root / "megatron", progress=False)


def test_fine_tuning_keeps_the_conversion_record_and_the_vision_tower(converted_vl, tmp_path):
    """--load a converted VL checkpoint, --save=DIR (one token) elsewhere: the new checkpoint's qwen35_config.json
    carries the converter's record, and the export after training writes the source's names back, the vision
    tower's included (trained with the model: text-only steps leave it as weight decay leaves it)."""
    from megatron_qwen35.checkpoint import CONFIG
    from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf
    from megatron_qwen35.convert.safetensors_files import SafetensorsCheckpoint

    tuned = tmp_path / "tuned"
    pretrain(tmp_path, "--qwen35-preset", "tiny-vl-moe", "--train-iters", "1", "--load", str(converted_vl),
             f"--save={tuned}", "--save-interval", "1")
    source, saved = (json.loads((d / CONFIG).read_text()) for d in (converted_vl, tuned))
    assert saved == source and saved["metadata"]["source"] == "huggingface"
    qwen35_megatron_to_hf(tuned, tmp_path / "hf", progress=False)
    names = set(SafetensorsCheckpoint(tmp_path / "hf"))
    assert names == set(SafetensorsCheckpoint(converted_vl.parent / "hf"))
    assert any(n.startswith("model.visual.blocks.") for n in names)


def test_load_of_another_model_is_refused_naming_the_fields(converted_vl, tmp_path):
    run = pretrain(tmp_path, "--train-iters", "1", "--load", str(converted_vl), check=False,
                   base=tuple("tiny" if a == "tiny-moe" else a for a in TINY_RUN))
    message = run.stderr + run.stdout
    assert f"--load {converted_vl} holds another model" in message
    assert "num_experts: checkpoint 4, this run None" in message and not run.losses


def test_a_checkpoint_that_differs_only_in_vocabulary_is_refused():
    """megatron would load the embedding cut to the run's vocabulary and train on silently; what only names the
    checkpoint or serves training (name, aux-loss weight, rope cache length, the carried ViT) is no difference."""
    run = PRESETS["tiny-moe"]
    assert launch.architecture_differences(run.replace(vocab_size=256), run) == {"vocab_size": (256, 512)}
    assert launch.architecture_differences(run.replace(name="hf", router_aux_loss_coef=0.01,
                                                       max_position_embeddings=64), run) == {}


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path):
    """The tiny preset (512 tokens) on text tokenized with the real Qwen3.5 vocabulary."""
    from megatron_qwen35.data.preprocess import tokenize_to_indexed

    tokenize_to_indexed([REPO / "data" / "tiny_corpus.txt"], tmp_path / "corpus", workers=1)
    base = tuple(a for a in TINY_RUN if a not in ("--mock-data",))
    base = tuple("tiny" if a == "tiny-moe" else a for a in base)
    run = pretrain(tmp_path, "--train-iters", "1", "--data-path", str(tmp_path / "corpus"), "--split", "100,0,0",
                   base=base, check=False)
    assert "outside the 512-token vocabulary of the model 'tiny'" in run.stderr + run.stdout
    assert f"--data-path {tmp_path / 'corpus'}" in run.stderr + run.stdout


def test_a_chosen_transformer_engine_that_does_not_import_is_an_error_naming_why(monkeypatch):
    """No quiet switch to the local backend (slower; found out from the step time): the import failure is named,
    with the explicit ways to choose the local backend."""
    from megatron_qwen35 import provider

    config = qwen35_transformer_config(PRESETS["tiny"], backend="te")
    monkeypatch.setattr(provider, "transformer_engine_import_error",
                        lambda: ImportError("libtransformer_engine.so: cannot open shared object file"))
    with pytest.raises(RuntimeError, match=r"transformer_engine does not import here \(ImportError: "
                                           r"libtransformer_engine.so.*--transformer-impl local"):
        provider.qwen35_gpt_model(PRESETS["tiny"], config)
    assert provider.resolve_backend(config, "local") == "local"


def test_the_key_schema_leaves_no_process_group_behind():
    """Reading a model's checkpoint keys (converters, the launch check) builds it in a one-rank world of its own, and
    leaves the caller's random stream and megatron's RNG tracker as they were (it seeded them for the build)."""
    import subprocess

    code = ("import torch; from megatron.core import parallel_state as ps;"
            "from megatron.core.tensor_parallel import get_cuda_rng_tracker;"
            "from megatron_qwen35.runtime import apply_runtime_patches; apply_runtime_patches();"
            "from megatron_qwen35.config import qwen35_preset;"
            "from megatron_qwen35.convert.megatron_keys import MegatronLayout;"
            "torch.manual_seed(5); before = torch.get_rng_state();"
            "keys = MegatronLayout(qwen35_preset('tiny-moe'));"
            "assert keys.checkpoint_shapes() and keys.read is not None;"
            "assert torch.equal(torch.get_rng_state(), before), 'the random stream moved';"
            "assert not get_cuda_rng_tracker().is_initialized() and not get_cuda_rng_tracker().get_states();"
            "assert not torch.distributed.is_initialized() and not ps.model_parallel_is_initialized(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TORCHDYNAMO_DISABLE": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
