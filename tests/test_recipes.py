"""Every recipe's flags go through Megatron's own argument parser and build the model on the meta device."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qwen35.training.flags import add_qwen35_args, check_args_match, qwen35_config_from_args
from megatron_qwen35.training.launch import qwen35_argv

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.sh")  # the public sizes' (not the launcher, the demos)
                 if p.stem != "common" and not p.stem.startswith("tiny"))


def recipe_args(name: str, **env) -> list[str]:
    """The pretrain_qwen35.py arguments a recipe would launch with (its DRY_RUN mode)."""
    out = subprocess.run(["bash", str(REPO / "recipes" / f"{name}.sh")], check=True, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "MOCK_DATA": "1", **env})
    return out.stdout.splitlines()


def parse_megatron_args(argv: list[str], monkeypatch):
    """Megatron's parse_args + validate_args on `argv`, for a world just big enough for its layout."""
    import megatron.training.arguments as megatron_arguments
    from megatron.training.arguments import parse_args, validate_args

    # The recipes are written for H100 nodes: validate as Megatron would there (it reads the GPU architecture).
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(sys, "argv", ["pretrain_qwen35.py"] + qwen35_argv(argv, without_cuda=False))
    probe = parse_args(extra_args_provider=add_qwen35_args)
    world = (probe.tensor_model_parallel_size * probe.pipeline_model_parallel_size
             * probe.context_parallel_size * max(probe.expert_model_parallel_size, 1))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # common.sh exports it before launching
    args = parse_args(extra_args_provider=add_qwen35_args)
    validate_args(args, {})
    return args


def test_every_public_size_has_a_recipe():
    assert RECIPES == sorted(["0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b"])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_builds_on_meta(name, monkeypatch, megatron_single_process):
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_qwen35.config import PRESETS
    from megatron_qwen35.provider import qwen35_gpt_model

    args = parse_megatron_args(recipe_args(name), monkeypatch)
    cfg = qwen35_config_from_args(args)
    assert cfg == PRESETS[name]
    check_args_match(args, cfg)
    assert args.transformer_impl == "transformer_engine" and args.distributed_backend == "nccl"  # a GPU node's
    assert not args.create_attention_mask_in_dataloader  # no s x s mask per sample (1 GiB at 32k)
    assert not args.gradient_accumulation_fusion  # no APEX kernel here: megatron's output layer would raise
    args.apply_rope_fusion = False  # a Transformer Engine kernel choice; TE is absent here, the model is the same
    config = core_transformer_config_from_args(args)
    # Build one process's worth of the same model: parallel sizes to 1, the architecture untouched.
    single = dataclasses.replace(config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
                                 expert_tensor_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
                                 num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
                                 apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
                                 gradient_accumulation_fusion=False, perform_initialization=False,
                                 use_cpu_initialization=True)
    with torch.device("meta"):
        model = qwen35_gpt_model(cfg, single, backend="local")
    assert len(model.decoder.layers) == cfg.num_layers
    assert sum(p.numel() for p in model.parameters()) > 0.9 * float(name.split("b")[0]) * 1e9


def test_environment_overrides_a_recipe_setting():
    args = recipe_args("9b", TP="2", MICRO_BATCH="3")
    assert args[args.index("--tensor-model-parallel-size") + 1] == "2"
    assert args[args.index("--micro-batch-size") + 1] == "3"


def test_load_is_save_however_the_folder_is_spelt(tmp_path):
    """LOAD naming SAVE's folder (a trailing slash, ./, a link to it, existing or not yet) resumes SAVE as LOAD=SAVE
    does; only another folder becomes megatron's --pretrained-checkpoint."""
    save = tmp_path / "ckpt"
    (tmp_path / "link").symlink_to(save)
    for load in (f"{save}/", f"{tmp_path}/./ckpt", f"{tmp_path}/other/../ckpt", str(tmp_path / "link")):
        args = recipe_args("0.8b", SAVE=str(save), LOAD=load)
        assert "--pretrained-checkpoint" not in args, load
        assert args[args.index("--load") + 1] == load
    save.mkdir()
    args = recipe_args("0.8b", SAVE=str(save), LOAD=str(tmp_path / "link"))
    assert "--pretrained-checkpoint" not in args
    args = recipe_args("0.8b", SAVE=str(save), LOAD=str(tmp_path / "base"))
    assert args[args.index("--load") + 1] == str(save)
    assert args[args.index("--pretrained-checkpoint") + 1] == str(tmp_path / "base")


def test_flag_contradicting_the_architecture_is_named(monkeypatch):
    from megatron_qwen35.config import PRESETS

    args = parse_megatron_args(recipe_args("0.8b") + ["--num-query-groups", "4"], monkeypatch)
    with pytest.raises(SystemExit, match=r"contradict it: --num-query-groups 4 \(needs 2\)"):
        check_args_match(args, PRESETS["0.8b"])


@pytest.mark.parametrize("flag", ["--reset-attention-mask", "--reset-position-ids"])
def test_document_reset_flags_run_packed_and_name_what_packing_cannot_split(flag, monkeypatch):
    """The flags fit the architecture (they run through the packed path); a layout the packed path cannot take
    (several sequences per micro-batch, context parallelism) is refused by name."""
    from megatron_qwen35.config import PRESETS
    from megatron_qwen35.training.preflight import LaunchRefused, check_document_resets

    args = parse_megatron_args(recipe_args("0.8b", MICRO_BATCH="1") + [flag], monkeypatch)
    check_args_match(args, PRESETS["0.8b"])
    check_document_resets(args)
    args.micro_batch_size = 2
    with pytest.raises(LaunchRefused, match=f"{flag} separates .* --micro-batch-size 1, not 2"):
        check_document_resets(args)
    args.micro_batch_size, args.context_parallel_size = 1, 2
    with pytest.raises(LaunchRefused, match=f"{flag} with context parallelism"):
        check_document_resets(args)


def test_readme_long_context_layout_fits_and_a_wider_cp_is_named(monkeypatch, megatron_single_process):
    """README's `CP=2 SEQ_LEN=32768 recipes/9b.sh` (TP4 x CP2) passes the layout rules with its sequence length;
    CP8 at TP4 would leave half a GDN key head per rank and is refused by name (megatron's TransformerConfig says so
    first when the config is built from flags)."""
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_qwen35.parallel_layout import check_parallel_layout, check_transformer_config_layout

    args = parse_megatron_args(recipe_args("9b", CP="2", SEQ_LEN="32768"), monkeypatch)
    args.apply_rope_fusion = False  # a Transformer Engine kernel choice; TE is absent here
    cfg = qwen35_config_from_args(args)
    check_transformer_config_layout(cfg, core_transformer_config_from_args(args), args.seq_length)

    args = parse_megatron_args(recipe_args("9b", CP="8", SEQ_LEN="32768"), monkeypatch)
    args.apply_rope_fusion = False
    with pytest.raises(AssertionError, match=r"linear_num_key_heads=16 must be a multiple of "
                                             r"\(self.tensor_model_parallel_size=4 \* self.context_parallel_size=8\)"):
        core_transformer_config_from_args(args)
    with pytest.raises(ValueError, match="linear_num_key_heads=16 split over tensor_parallel=4 leaves 4 per rank, "
                                         "not divisible by context_parallel=8"):
        check_parallel_layout(cfg, tensor_parallel=4, context_parallel=8, seq_length=32768)


def test_vl_data_path_trains_on_images_at_any_size(monkeypatch):
    """VL_DATA_PATH gives a recipe megatron's --vl-data-path (instead of --data-path), and every size, a VL model,
    runs without TE's fused rope, which reads one position row for the whole batch."""
    argv = recipe_args("9b", MOCK_DATA="0", VL_DATA_PATH="/data/vl-9b")
    assert "--data-path" not in argv and argv[argv.index("--vl-data-path") + 1] == "/data/vl-9b"
    args = parse_megatron_args(argv, monkeypatch)
    assert args.vl_data_path == "/data/vl-9b" and not args.apply_rope_fusion


def test_lora_settings_reach_the_flags_and_adapted_experts_run_without_grouped_gemm(monkeypatch):
    """LORA_* become --lora-* flags megatron's parser takes; with the routed experts adapted (the default) the MoE
    recipe drops its grouped GEMM (each expert its own linear, its own adapter), without them it keeps it; a grouped
    GEMM the user asks for beside expert adapters, or an unknown target, is refused by name."""
    from megatron_qwen35.config import PRESETS
    from megatron_qwen35.training.flags import lora_settings_from_args
    from megatron_qwen35.training.preflight import LaunchRefused, check_lora

    argv = recipe_args("35b-a3b", LORA_RANK="16", LORA_ALPHA="16")
    assert "--moe-grouped-gemm" not in argv
    args = parse_megatron_args(argv, monkeypatch)
    lora = lora_settings_from_args(args)
    assert (lora.rank, lora.alpha, "experts" in lora.target_modules) == (16, 16.0, True)
    check_lora(args, PRESETS["35b-a3b"])
    args.moe_grouped_gemm = True
    with pytest.raises(LaunchRefused, match="--moe-grouped-gemm with LoRA on the routed experts"):
        check_lora(args, PRESETS["35b-a3b"])
    kept = recipe_args("35b-a3b", LORA_RANK="16", LORA_TARGETS="q_proj o_proj")
    assert "--moe-grouped-gemm" in kept and kept[kept.index("--lora-target-modules") + 1:][:2] == ["q_proj", "o_proj"]
    args = parse_megatron_args(recipe_args("9b", LORA_RANK="8", LORA_TARGETS="qkv"), monkeypatch)
    with pytest.raises(LaunchRefused, match="--lora-target-modules qkv: not a linear"):
        lora_settings_from_args(args)
