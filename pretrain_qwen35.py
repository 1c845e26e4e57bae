#!/usr/bin/env python
"""Pretrain Qwen3.5 with Megatron: this project's pretrain_gpt.py.

    python pretrain_qwen35.py --qwen35-preset 9b [any Megatron flags]      (or: --hf-config path/to/config.json)

`--qwen35-preset` / `--hf-config` fill every architecture flag (megatron_qwen35/training/flags.py); everything else
is Megatron's own flags. Every machine runs `megatron.training.pretrain`: where CUDA is absent, the register of
run-time patches (megatron_qwen35/runtime/register.py) adapts megatron-core and megatron.training to the CPU and
training/launch.py adds the flags a CPU needs (local backend, gloo, no fusions), so the same command runs on a
laptop and on a GPU node. Before megatron builds anything, the launch is checked (training/preflight.py: flags,
layout, data, the --load checkpoint); a refusal is one `error:` line and exit code 2, with nothing written.
"""

import os
import sys
import time

# Every import is inside main(): megatron's asynchronous checkpoint save (--async-save) starts its writer's results
# manager with multiprocessing's 'spawn', which re-imports this script in the new process; with the imports here at the
# top that child spent 6.5 s importing megatron before the save could finish (measured on a tiny model, CPU).
# Synchronous saves start no such process (runtime/upstream_costs.py).


def main(argv: list[str]) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_qwen35.runtime import apply_runtime_patches
    from megatron_qwen35.training.launch import datasets_after_load, parse_qwen35_args
    from megatron_qwen35.training.model_provider import model_provider
    from megatron_qwen35.training.preflight import LaunchRefused
    from megatron_qwen35.training.steps import forward_step, train_valid_test_datasets_provider

    apply_runtime_patches()  # upstream fixes everywhere; the CPU adaptations where CUDA is absent
    try:  # every rank checks the same launch (training/preflight.py); a refusal is one line, on rank 0
        args, _ = parse_qwen35_args(argv)
    except LaunchRefused as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # torchrun stops every rank when the first one exits: the others wait for rank 0 to have said why
            time.sleep(30)
        sys.exit(2)
    try:
        pretrain(pretrain_cfg_container_from_args(args), datasets_after_load(train_valid_test_datasets_provider),
                 ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    except SystemExit:  # megatron's early ends (--exit-interval, --exit-duration-in-mins, a signal), after a barrier
        _end_process_groups()
        raise
    _end_process_groups()


def _end_process_groups() -> None:
    """megatron.training returns with its process groups alive; torch asks every program to destroy them before it
    ends. Left to the interpreter's shutdown, gloo's worker threads outlive it: a DP2 rank died of SIGSEGV near the
    end of its run (once in CI; timing, no stack), and a two-rank gloo script that skipped this aborted at exit (1 run
    in 120; none in 80 with it)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
