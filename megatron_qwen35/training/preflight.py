"""What a launch is checked for before megatron.training builds anything: one process, nothing written.

`recipes/common.sh` runs `python -m megatron_qwen35.training.preflight ARGS` with the job's world size before torchrun
starts a rank; `pretrain_qwen35.py` runs the same checks on every rank between parsing and building (launched
directly, without the recipe). A refusal is one line naming the culprit and exit code 2, no traceback, no rank
started, nothing written anywhere (megatron's tensorboard writer and every save come later):
- the architecture flags against the model (training/flags.py), and megatron's own argument validation;
- the parallel layout against the model's heads, experts, widths, layers and the sequence length
  (`parallel_layout.check_parallel_layout`, which megatron-core would otherwise hit as a bare assert deep in a layer);
- the learning-rate schedule (a warm-up as long as the decay is megatron's assert once the optimizer is built);
- the data: every --data-path prefix's .bin and .idx, a --vl-data-path directory's samples and vision config, and,
  where evaluation is on, a validation split that holds at least one sequence;
- the --load checkpoint against the model (`checkpoint_check.py`).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from megatron_qwen35.config import Qwen35Config


class LaunchRefused(SystemExit):
    """A launch that cannot run as given; the message names the flag, file or field (one line). A SystemExit, so a
    user's script that calls our checks without catching it ends with the message, as argparse's errors do."""

    def __str__(self) -> str:
        return str(self.code)


def check_layout(args, cfg: Qwen35Config) -> None:
    """The parallel layout the parsed args ask for, against the model (the project's one layout check)."""
    from megatron_qwen35.parallel_layout import ParallelLayoutError, check_parallel_layout

    try:
        check_parallel_layout(
            cfg, tensor_parallel=args.tensor_model_parallel_size, pipeline_parallel=args.pipeline_model_parallel_size,
            expert_parallel=args.expert_model_parallel_size,
            virtual_pipeline_parallel=args.virtual_pipeline_model_parallel_size,
            expert_tensor_parallel=args.expert_tensor_parallel_size, context_parallel=args.context_parallel_size,
            batch_p2p_comm=not args.overlap_p2p_comm if args.virtual_pipeline_model_parallel_size else None,
            uneven_pipeline=bool(args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers
                                 or args.pipeline_model_parallel_layout),
            seq_length=args.seq_length)
    except ParallelLayoutError as e:
        raise LaunchRefused(str(e)) from None


def check_schedule(args) -> None:
    """The learning-rate warm-up ends before the decay does (megatron's scheduler asserts it once the model and
    optimizer are built: a short fine-tune with a recipe's default warm-up)."""
    if args.train_iters and args.lr_warmup_fraction is None:
        decay = args.lr_decay_iters or args.train_iters
        if args.lr_warmup_iters >= decay:
            raise LaunchRefused(f"--lr-warmup-iters {args.lr_warmup_iters} (WARMUP) must be below the "
                                f"{decay} iterations the learning rate decays over (--lr-decay-iters, else "
                                "--train-iters)")


def evaluation_is_on(args) -> bool:
    """Whether megatron.training will evaluate (and so read a validation split)."""
    return bool(args.eval_iters)


def _split_ranges(split: str, count: int) -> list[tuple[int, int]]:
    """(begin, end) of the train / valid / test parts of `count` documents under megatron's --split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [(0, 0) if b is None else (int(round(b[0] * count)), int(round(b[1] * count))) for b in matrix]


def check_indexed_data(args) -> None:
    """Every --data-path (or per-split / args-file) prefix has its .bin and .idx; where evaluation is on, each
    prefix's validation part holds at least one --seq-length sequence."""
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    flag = "--data-path" if args.data_path else "--data-args-path" if args.data_args_path else "the data flags"
    if blend is None and blend_per_split is None:
        raise LaunchRefused("no training data: give --data-path PREFIX (tools/data/preprocess.py), --vl-data-path "
                            "DIR (tools/data/preprocess_vl.py) or --mock-data")
    prefixes = list(blend[0]) if blend is not None else [p for b in blend_per_split if b for p in b[0]]
    for prefix in prefixes:
        missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(f"{prefix}{s}").is_file()]
        if missing:
            raise LaunchRefused(f"{flag} {prefix}: {' and '.join(missing)} "
                                f"{'does' if len(missing) == 1 else 'do'} not exist (tools/data/preprocess.py "
                                "writes PREFIX.bin and PREFIX.idx)")
    if blend is None or not evaluation_is_on(args):
        return
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = dataset.sequence_lengths.copy()  # a view of the index's mapping, which closes with the dataset
        del dataset
        begin, end = _split_ranges(args.split, len(lengths))[1]
        tokens = int(lengths[begin:end].sum())
        if tokens - 1 < args.seq_length:  # a sample is seq_length + 1 tokens (the labels' extra one)
            raise LaunchRefused(
                f"--split {args.split} leaves the validation part of {prefix} {end - begin} of {len(lengths)} "
                f"documents, {tokens} tokens: not one {args.seq_length}-token sequence for evaluation "
                f"(--eval-iters {args.eval_iters}); give a larger validation share (--split), more data, or "
                "--eval-iters 0 (EVAL_ITERS=0) to train without evaluation")


def check_vl_data(args, cfg: Qwen35Config) -> None:
    """A --vl-data-path directory with samples, made for this model's vision config."""
    from megatron_qwen35.data.preprocess_vl import VISION_FIELDS
    from megatron_qwen35.data.vl_dataset import Qwen35VLSamples

    if cfg.vision is None:
        raise LaunchRefused(f"--vl-data-path needs a model with a vision tower; '{cfg.name}' has none")
    try:
        samples = Qwen35VLSamples(args.vl_data_path)
    except (OSError, ValueError, KeyError) as e:
        raise LaunchRefused(f"--vl-data-path {args.vl_data_path}: {e.args[0] if isinstance(e, KeyError) else e}"
                            ) from None
    if len(samples) == 0:
        raise LaunchRefused(f"--vl-data-path {args.vl_data_path} holds no samples (tools/data/preprocess_vl.py)")
    differ = {f: (samples.vision[f], getattr(cfg.vision, f)) for f in VISION_FIELDS
              if samples.vision.get(f) != getattr(cfg.vision, f)}
    if differ:
        raise LaunchRefused(f"--vl-data-path {args.vl_data_path} was preprocessed for another vision config than "
                            f"model '{cfg.name}' (field: data, model): {differ}")
    if evaluation_is_on(args):
        from megatron_qwen35.training.steps import vl_split

        begin, end = _split_ranges(vl_split(args), len(samples))[1]
        if end <= begin:
            raise LaunchRefused(f"--split {vl_split(args)} leaves no validation sample of the {len(samples)} in "
                                f"--vl-data-path {args.vl_data_path} for evaluation (--eval-iters {args.eval_iters}); "
                                "give a larger validation share (--split), more data, or --eval-iters 0 "
                                "(EVAL_ITERS=0) to train without evaluation")


def check_data(args, cfg: Qwen35Config) -> None:
    if getattr(args, "vl_data_path", None):
        check_vl_data(args, cfg)
    elif not args.mock_data:
        check_indexed_data(args)


def check_launch(args, cfg: Qwen35Config) -> list[str]:
    """Every check above on parsed, validated args; returns notes to print (e.g. what a load will initialise)."""
    from megatron_qwen35.training.checkpoint_check import check_load

    check_layout(args, cfg)
    check_schedule(args)
    check_data(args, cfg)
    return check_load(args, cfg)


def main(argv: list[str]) -> int:
    """The recipe's check before torchrun: 0 and silent when the launch can run, else one `error:` line and 2.
    WORLD_SIZE is the job's (GPUs per node x nodes), as megatron's argument validation reads it."""
    import logging

    # The verdict is the output: torch's notice that a machine has no CUDA runtime (when megatron imports its extension
    # builder) and megatron's own log lines (e.g. building a model to read a checkpoint's keys) stay out of it.
    for logger in ("torch.utils.cpp_extension", "megatron"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    from megatron_qwen35.runtime import apply_runtime_patches
    from megatron_qwen35.training.launch import parse_qwen35_args

    apply_runtime_patches()  # as pretrain_qwen35.py: megatron's validation reads the GPU generation, e.g.
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # megatron prints its argument table while validating
            parse_qwen35_args(argv, set_globals=False)
    except LaunchRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # the package's own module: `python -m` runs this file as __main__, whose LaunchRefused the checks do not raise
    from megatron_qwen35.training import preflight

    sys.exit(preflight.main(sys.argv[1:]))
