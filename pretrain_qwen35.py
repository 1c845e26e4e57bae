#!/usr/bin/env python
"""Pretrain Qwen3.5 with Megatron: this project's pretrain_gpt.py.

    python pretrain_qwen35.py --qwen35-preset 9b [any Megatron flags]      (or: --hf-config path/to/config.json)

`--qwen35-preset` / `--hf-config` fill every architecture flag (megatron_qwen35/training/flags.py); everything else
is Megatron's own flags. With CUDA this runs `megatron.training.pretrain`. Without CUDA the same model_provider,
forward_step and datasets provider train through a compact loop built from megatron-core's schedules, DDP,
optimizer and dist_checkpointing (megatron_qwen35/training/cpu_loop.py): megatron.training itself assumes CUDA in
dozens of places, while megatron-core runs on CPU through megatron_qwen35.runtime.
"""

import os
import sys
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import write_config
from megatron_qwen35.provider import model_provider
from megatron_qwen35.training.flags import add_qwen35_args, architecture_from_argv, expand_argv
from megatron_qwen35.training.steps import forward_step, train_valid_test_datasets_provider


def _write_config_beside_checkpoints(cfg, argv: list[str]) -> None:
    """megatron.training's checkpoints do not record our config; load_model and the exporter read it from --save."""
    save = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--save"), None)
    if cfg is not None and save and int(os.environ.get("RANK", "0")) == 0:
        Path(save).mkdir(parents=True, exist_ok=True)
        write_config(save, cfg)


def main(argv: list[str]) -> None:
    cfg = architecture_from_argv(argv)
    argv = expand_argv(argv)
    if torch.cuda.is_available():
        from megatron.core.enums import ModelType
        from megatron.training import pretrain

        _write_config_beside_checkpoints(cfg, argv)
        sys.argv = [sys.argv[0]] + argv
        pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                 extra_args_provider=add_qwen35_args)
    else:
        from megatron_qwen35.training.cpu_loop import pretrain_on_cpu

        pretrain_on_cpu(argv, train_valid_test_datasets_provider, model_provider, forward_step,
                        extra_args_provider=add_qwen35_args)


if __name__ == "__main__":
    main(sys.argv[1:])
