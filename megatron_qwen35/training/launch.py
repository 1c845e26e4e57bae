"""What pretrain_qwen35.py does before `megatron.training.pretrain`: the command line, the checks, the config file.

- `qwen35_argv`: the architecture flags (flags.py), the project's defaults and, where CUDA is absent, the flags a CPU
  needs, in front of the user's own flags, so a user passes the same flags on a laptop as on a GPU node;
- `parse_qwen35_args`: megatron.training's own parsing and validation, with every launch check (preflight.py) before
  megatron sets anything up: a flag that contradicts the architecture, a layout, data or checkpoint that cannot
  work is refused by name before anything is built or written;
- `datasets_after_load`: `qwen35_config.json` into --save once the load has succeeded (load_model and the exporter
  read it), carrying a loaded checkpoint's conversion record.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import CONFIG, UNTIL_NEXT_SAVE, latest_iteration, read_config, write_config
from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.training.flags import (
    add_qwen35_args,
    architecture_from_argv,
    check_args_match,
    qwen35_config_from_args,
    qwen35_megatron_flags,
)
from megatron_qwen35.training.preflight import LaunchRefused, check_launch

# Defaults on every machine (a user's later flag wins where megatron has one for it).
PROJECT_FLAGS = (
    # megatron's data loader would build an s x s mask per sample (1 GiB at 32k) that no Qwen3.5 layer reads: TE's
    # attention and ours are causal by type, and the mask would turn off the local attention's flash path
    "--no-create-attention-mask-in-dataloader",
    # the loss is the mean over every loss token of the global batch, not a mean of micro-batch means: packing,
    # masked (prompt, padding) tokens and context parallelism's split then leave the objective as it is
    "--calculate-per-token-loss",
)
# Where CUDA is absent: the unfused paths (same numbers), the local backend, gloo, weights built on the CPU.
NO_CUDA_FLAGS = (
    "--transformer-impl", "local", "--distributed-backend", "gloo", "--use-cpu-initialization",
    "--no-rope-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion", "--no-persist-layer-norm",
)
# megatron.training's defaults that stop a run (upstream 0.19.2): --eval-interval None raises a TypeError while
# counting samples even with --eval-iters 0; 1000 is the interval megatron used before it became None.
ARGS_DEFAULTS = {"eval_interval": 1000}


def gradient_accumulation_fusion_available() -> bool:
    """Whether APEX's fused weight-gradient kernel imports: megatron's own linears (the output layer) raise without it
    when gradient accumulation fusion is on, its default."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def qwen35_argv(argv: list[str], *, without_cuda: bool | None = None) -> list[str]:
    """The command line pretrain_qwen35.py hands to megatron.training: ours in front of the user's (`without_cuda`:
    this machine's answer when None)."""
    without_cuda = not torch.cuda.is_available() if without_cuda is None else without_cuda
    cfg = architecture_from_argv(argv)
    front = qwen35_megatron_flags(cfg) if cfg is not None else []
    front += PROJECT_FLAGS
    if not gradient_accumulation_fusion_available():
        front.append("--no-gradient-accumulation-fusion")
    if without_cuda:
        front += NO_CUDA_FLAGS
    return [*front, *argv]


def _single_process_environment() -> None:
    """megatron initialises torch.distributed from the environment (env://): give a run without a launcher one."""
    if "WORLD_SIZE" in os.environ:
        return
    from megatron_qwen35.runtime import free_local_port

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # a port is drawn only where none is given
        os.environ["MASTER_PORT"] = str(free_local_port())


def _parse_and_validate(argv: list[str]):
    """megatron.training's parse_and_validate_args without its last step (set_global_variables, which builds the
    tokenizer and the TensorBoard writer): parsing and validating write nothing. Megatron's own refusals (its
    asserts) become one line."""
    from megatron.training.arguments import parse_args, validate_args

    saved, sys.argv = sys.argv, [sys.argv[0], *qwen35_argv(argv)]
    try:
        args = parse_args(add_qwen35_args)
    finally:
        sys.argv = saved
    cfg = qwen35_config_from_args(args)
    check_args_match(args, cfg)
    if not args.mtp_num_layers:
        args.mtp_num_layers = None  # megatron's "no MTP" (some of its checks read 0 as on)
    try:
        if args.use_checkpoint_args:  # as megatron's parse_and_validate_args
            from megatron.training.checkpointing import load_args_from_checkpoint

            load_args_from_checkpoint(args)
        if args.yaml_cfg is not None:
            from megatron.training.yaml_arguments import validate_yaml

            args = validate_yaml(args, ARGS_DEFAULTS)
        else:
            validate_args(args, ARGS_DEFAULTS)
    except AssertionError as e:
        raise LaunchRefused(f"megatron's argument check: {str(e) or _failed_assert(e)}") from None
    return args, cfg


def _failed_assert(e: AssertionError) -> str:
    """A bare assert's own line and place (megatron asserts e.g. `args.global_batch_size > 0` with no message)."""
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{frame.line} ({Path(frame.filename).name}:{frame.lineno})"


def parse_qwen35_args(argv: list[str], *, set_globals: bool = True):
    """megatron.training's parsed and validated args for `argv` and the architecture, after every launch check
    (training/preflight.py; LaunchRefused names what is wrong). With `set_globals`, megatron's global args,
    tokenizer and writers are then set up, and rank 0 prints the checks' notes."""
    from megatron.training.global_vars import set_global_variables

    _single_process_environment()
    args, cfg = _parse_and_validate(argv)
    notes = check_launch(args, cfg)
    if torch.cuda.is_available() and not gradient_accumulation_fusion_available():
        notes.append("APEX's fused weight-gradient kernel (fused_weight_gradient_mlp_cuda) does not import here: "
                     "gradient-accumulation fusion is off (--no-gradient-accumulation-fusion); install apex for it")
    if set_globals:
        set_global_variables(args)
        if args.rank == 0:
            for note in notes:
                print(f"note: {note}", flush=True)
    return args, cfg


def architecture_differences(saved: Qwen35Config, run: Qwen35Config) -> dict[str, tuple]:
    """{field: (checkpoint's, run's)} for the fields that fix the model's weights and function (the vision tower's
    included; not the MTP layer, a training aid beside the model: training/checkpoint_check.py decides about it)."""
    ignored = {"name", "router_aux_loss_coef", "max_position_embeddings", "full_attention_interval", "mtp_num_layers"}
    a, b = saved.to_dict(), run.to_dict()
    return {k: (a[k], b[k]) for k in a if k not in ignored and a[k] != b[k]}


def write_checkpoint_config(args, cfg: Qwen35Config) -> None:
    """qwen35_config.json into --save (rank 0): the loaded checkpoint's config and conversion record (load_model and
    the exporter read them), or the run's architecture for a run from scratch; the MTP layers are the run's (what
    it trains is what its checkpoints hold), and so are the LoRA adapters' settings (`lora`) and the fingerprint of
    their base (lora/base.py). Called once the load
    has succeeded (`datasets_after_load`): a refused or failed run writes nothing into --save, which may be the
    --load it failed to load; where --save is the checkpoint just loaded and the run changes what it holds, the
    loaded config stays the answer until the run's first save there (checkpoint.UNTIL_NEXT_SAVE)."""
    if not args.save or args.rank != 0:
        return
    from megatron_qwen35.lora.base import LORA_BASE, LORA_BASE_NAMED
    from megatron_qwen35.training.checkpoint_check import checkpoint_to_load
    from megatron_qwen35.training.flags import lora_settings_from_args

    loaded, _ = checkpoint_to_load(args)
    has_config = loaded is not None and (loaded / CONFIG).is_file()
    saved, loaded_metadata = read_config(loaded) if has_config else (cfg, {})
    lora = lora_settings_from_args(args)
    metadata = {k: v for k, v in loaded_metadata.items() if k not in ("lora", LORA_BASE, LORA_BASE_NAMED)}
    if lora is not None:  # its checkpoints hold the adapters; the base they train on, where there is one
        base = getattr(args, "qwen35_lora_base_fingerprint", None)
        metadata |= {"lora": lora.to_record()} | ({LORA_BASE: base, LORA_BASE_NAMED: args.qwen35_lora_base_named}
                                                  if base else {})
    save = Path(args.save)
    run_config = saved.replace(mtp_num_layers=cfg.mtp_num_layers)
    if has_config and save.resolve() == loaded.resolve() and (run_config, metadata) != (saved, loaded_metadata):
        # --save is the checkpoint just loaded (the recipes' LOAD=SAVE): it keeps describing what it holds until
        # this run's first save there (checkpoint.read_config)
        metadata[UNTIL_NEXT_SAVE] = {"iteration": str(latest_iteration(loaded)), "config": saved.to_dict(),
                                     "metadata": loaded_metadata}
    save.mkdir(parents=True, exist_ok=True)
    write_config(save, run_config, metadata)


def datasets_after_load(provider):
    """megatron.training's datasets provider, first writing qwen35_config.json into --save: pretrain() calls the
    provider right after the model is built and its checkpoint loaded, before the first save."""
    from megatron.training import get_args

    from megatron_qwen35.training.flags import qwen35_config_from_args

    def provide(train_val_test_num_samples, vp_stage=None):
        args = get_args()
        write_checkpoint_config(args, qwen35_config_from_args(args))
        return provider(train_val_test_num_samples, vp_stage)

    provide.is_distributed = getattr(provider, "is_distributed", False)
    return provide


__all__ = ["PROJECT_FLAGS", "NO_CUDA_FLAGS", "ARGS_DEFAULTS", "qwen35_argv", "parse_qwen35_args",
           "architecture_differences", "write_checkpoint_config", "datasets_after_load"]
