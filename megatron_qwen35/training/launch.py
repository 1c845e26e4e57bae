"""What pretrain_qwen35.py does before `megatron.training.pretrain`: the command line, the checks, the config file.

- `qwen35_argv`: the architecture flags (flags.py), the project's defaults and, where CUDA is absent, the flags a CPU
  needs, in front of the user's own flags, so a user passes the same flags on a laptop as on a GPU node;
- `parse_qwen35_args`: megatron.training's own `parse_and_validate_args`, then every flag that contradicts the
  architecture refused by name, before anything is built;
- `prepare_checkpoint_config`: `qwen35_config.json` beside megatron.training's checkpoints (load_model and the
  exporter read it), carrying a loaded checkpoint's conversion record; a `--load` checkpoint of another model refused
  with the differing fields named.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import CONFIG, read_config, write_config
from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.training.flags import (
    add_qwen35_args,
    architecture_from_argv,
    check_args_match,
    qwen35_config_from_args,
    qwen35_megatron_flags,
)

# Defaults on every machine (a user's later flag wins where megatron has one for it).
PROJECT_FLAGS = (
    # megatron's data loader would build an s x s mask per sample (1 GiB at 32k) that no Qwen3.5 layer reads: TE's
    # attention and ours are causal by type, and the mask would turn off the local attention's flash path
    "--no-create-attention-mask-in-dataloader",
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def parse_qwen35_args(argv: list[str]):
    """megatron.training's parsed and validated args for `argv` (set as its global args), and the architecture."""
    from megatron.training.arguments import parse_and_validate_args

    _single_process_environment()
    saved, sys.argv = sys.argv, [sys.argv[0], *qwen35_argv(argv)]
    try:
        args = parse_and_validate_args(extra_args_provider=add_qwen35_args, args_defaults=ARGS_DEFAULTS)
    finally:
        sys.argv = saved
    cfg = qwen35_config_from_args(args)
    check_args_match(args, cfg)
    return args, cfg


def architecture_differences(saved: Qwen35Config, run: Qwen35Config) -> dict[str, tuple]:
    """{field: (checkpoint's, run's)} for the fields that fix the model's weights and function (the vision tower's
    included)."""
    ignored = {"name", "router_aux_loss_coef", "max_position_embeddings", "full_attention_interval"}
    a, b = saved.to_dict(), run.to_dict()
    return {k: (a[k], b[k]) for k in a if k not in ignored and a[k] != b[k]}


def prepare_checkpoint_config(args, cfg: Qwen35Config) -> None:
    """Refuse a --load checkpoint of another model; write qwen35_config.json into --save, keeping the loaded
    checkpoint's conversion record (rank 0)."""
    saved_cfg, metadata = cfg, {}
    if args.load and (Path(args.load) / CONFIG).is_file():
        saved_cfg, metadata = read_config(args.load)
        differences = architecture_differences(saved_cfg, cfg)
        if differences:
            detail = "; ".join(f"{k}: checkpoint {v[0]!r}, this run {v[1]!r}" for k, v in differences.items())
            raise SystemExit(f"error: --load {args.load} holds another model than this run's "
                             f"'{cfg.name}' ({detail}); give the matching --qwen35-preset / --hf-config, or another "
                             "--load")
    if not args.save or args.rank != 0:
        return
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    write_config(save, saved_cfg, metadata)


__all__ = ["PROJECT_FLAGS", "NO_CUDA_FLAGS", "ARGS_DEFAULTS", "qwen35_argv", "parse_qwen35_args",
           "prepare_checkpoint_config", "architecture_differences"]
