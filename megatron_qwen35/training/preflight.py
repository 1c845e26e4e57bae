"""What a launch is checked for before megatron.training builds anything: one process, nothing written.

`recipes/common.sh` runs `python -m megatron_qwen35.training.preflight ARGS` with the job's world size before torchrun
starts a rank; `pretrain_qwen35.py` runs the same checks on every rank between parsing and building (launched
directly, without the recipe). A refusal is one line naming the culprit and exit code 2, no traceback, no rank
started, nothing written anywhere (megatron's tensorboard writer and every save come later):
- the architecture flags against the model (training/flags.py), and megatron's own argument validation;
- the parallel layout against the model's heads, experts, widths, layers and the sequence length
  (`parallel_layout.check_parallel_layout`, which megatron-core would otherwise hit as a bare assert deep in a layer);
- the learning-rate schedule (a warm-up as long as the decay is megatron's assert once the optimizer is built), and an
  optimizer the distributed optimizer can hold;
- the data: every --data-path prefix's .bin and .idx, a --vl-data-path directory's samples and vision config, and,
  where evaluation is on, a validation split that holds at least one sequence;
- the --load checkpoint against the model, and a resumed run's schedule against the saved one (`checkpoint_check.py`).
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
    from megatron_qwen35.parallel_layout import ParallelLayoutError, check_parallel_layout, check_world_size

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
        check_world_size(args.world_size, tensor_parallel=args.tensor_model_parallel_size,
                         pipeline_parallel=args.pipeline_model_parallel_size,
                         context_parallel=args.context_parallel_size, expert_parallel=args.expert_model_parallel_size,
                         expert_tensor_parallel=args.expert_tensor_parallel_size)
    except ParallelLayoutError as e:
        raise LaunchRefused(str(e)) from None
    if cfg.is_moe and args.tensor_model_parallel_size > 1 and not args.sequence_parallel and not args.skip_train:
        # megatron-core's MoELayer raises this at the first training forward, on every rank, once all is built
        raise LaunchRefused(f"MoE model '{cfg.name}' at --tensor-model-parallel-size "
                            f"{args.tensor_model_parallel_size} trains with --sequence-parallel (megatron-core's MoE "
                            "layer refuses training without it); add --sequence-parallel, as the recipes do")


def check_schedule(args) -> None:
    """A run length, and the learning-rate warm-up ends before the decay does (megatron's scheduler raises on either
    once the model and optimizer are built: a short fine-tune with a recipe's default warm-up)."""
    if not args.train_iters and not args.train_samples and not args.skip_train:
        raise LaunchRefused(f"--train-iters {args.train_iters} (TRAIN_ITERS): give the run a length (or "
                            "--train-samples; --skip-train to evaluate only)")
    if args.train_iters and args.lr_warmup_fraction is None:
        decay = args.lr_decay_iters or args.train_iters
        if args.lr_warmup_iters >= decay:
            raise LaunchRefused(f"--lr-warmup-iters {args.lr_warmup_iters} (WARMUP) must be below the "
                                f"{decay} iterations the learning rate decays over (--lr-decay-iters, else "
                                "--train-iters)")


def check_optimizer(args) -> None:
    """An optimizer megatron-core's distributed optimizer (the recipes') can hold: 0.19.2 builds SGD without the state
    initialiser its checkpoints need, and DistributedOptimizer asserts on every rank once the model is built."""
    if args.use_distributed_optimizer and args.optimizer == "sgd" and not args.optimizer_cpu_offload:
        raise LaunchRefused("--optimizer sgd with --use-distributed-optimizer (the recipes set it): megatron-core's "
                            "distributed optimizer holds adam or lion, not sgd; use --optimizer adam, or launch "
                            "pretrain_qwen35.py without --use-distributed-optimizer")


def evaluation_is_on(args) -> bool:
    """Whether megatron.training will evaluate (and so read a validation split)."""
    return bool(args.eval_iters)


def _validation_range(split: str, count: int) -> tuple[int, int]:
    """(begin, end) of the validation part of `count` samples under megatron's --split ((0, 0): none)."""
    from megatron_qwen35.data.vl_dataset import split_ranges

    return split_ranges(split, count)[1] or (0, 0)


def _indexed_lengths(flag: str, prefix: str, keep: bool):
    """The document lengths (when `keep`, else None) of a PREFIX.idx that megatron's IndexedDataset reads, with
    PREFIX.bin as long as the index says; a cut-off or damaged pair is refused by name (megatron would fail on every
    rank, once all is built)."""
    import struct

    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    def refused(why: str) -> LaunchRefused:
        return LaunchRefused(f"{flag} {prefix}: {prefix}.idx is not a readable Megatron index ({why}); tokenize again "
                             "(tools/data/preprocess.py)")

    # the header and the arrays it promises, first: megatron's reader half-built on a cut-off index raises again in
    # its __del__ (magic 9 bytes, version 8, dtype 1, sequences 8, documents 8; int32 lengths, int64 pointers and
    # int64 document indices follow)
    with open(f"{prefix}.idx", "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise refused("no index header" if len(head) < 34 else "not an index header")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    wanted = 34 + 12 * sequences + 8 * documents
    if Path(f"{prefix}.idx").stat().st_size < wanted:
        raise refused(f"cut off: {Path(f'{prefix}.idx').stat().st_size} bytes, its header promises {wanted}")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths, pointers, item = dataset.sequence_lengths, dataset.index.sequence_pointers, dataset.index.dtype_size
        needed = int(pointers[-1]) + int(lengths[-1]) * item if len(lengths) else 0
        lengths = lengths.copy() if keep else None  # a view of the index's mapping, which closes with the dataset
        del dataset, pointers
    except (AssertionError, struct.error, ValueError, TypeError, IndexError, OSError) as e:
        raise refused(str(e) or type(e).__name__) from None
    size = Path(f"{prefix}.bin").stat().st_size
    if size < needed:
        raise LaunchRefused(f"{flag} {prefix}: {prefix}.bin is cut off ({size} bytes; its index needs {needed}); "
                            "tokenize again (tools/data/preprocess.py)")
    return lengths


def check_indexed_data(args) -> None:
    """Every --data-path (or per-split / args-file) prefix has its .bin and .idx; where evaluation is on, each
    prefix's validation part holds at least one --seq-length sequence."""
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    flag = "--data-path" if args.data_path else "--data-args-path" if args.data_args_path else "the data flags"
    if blend is None and blend_per_split is None:
        raise LaunchRefused("no training data: give --data-path PREFIX (DATA_PATH; tools/data/preprocess.py), "
                            "--sft-data-path DIR (SFT_DATA_PATH; tools/data/preprocess_sft.py), --vl-data-path DIR "
                            "(VL_DATA_PATH; tools/data/preprocess_vl.py) or --mock-data (MOCK_DATA=1)")
    prefixes = list(blend[0]) if blend is not None else [p for b in blend_per_split if b for p in b[0]]
    for prefix in prefixes:
        missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(f"{prefix}{s}").is_file()]
        if missing:
            raise LaunchRefused(f"{flag} {prefix}: {' and '.join(missing)} "
                                f"{'does' if len(missing) == 1 else 'do'} not exist (tools/data/preprocess.py "
                                "writes PREFIX.bin and PREFIX.idx)")
    evaluation = blend is not None and evaluation_is_on(args)
    lengths_of = {prefix: _indexed_lengths(flag, prefix, keep=evaluation) for prefix in prefixes}
    if not evaluation:
        return
    for prefix in prefixes:
        lengths = lengths_of[prefix]
        begin, end = _validation_range(args.split, len(lengths))
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

        begin, end = _validation_range(vl_split(args), len(samples))
        if end <= begin:
            raise LaunchRefused(f"--split {vl_split(args)} leaves no validation sample of the {len(samples)} in "
                                f"--vl-data-path {args.vl_data_path} for evaluation (--eval-iters {args.eval_iters}); "
                                "give a larger validation share (--split), more data, or --eval-iters 0 "
                                "(EVAL_ITERS=0) to train without evaluation")


def check_sft_data(args, cfg: Qwen35Config) -> None:
    """A --sft-data-path directory of conversations made for this model, one packed sequence per micro-batch, every
    conversation within --seq-length (aligned for context parallelism), a validation part where evaluation is on."""
    from megatron_qwen35.data.packing import aligned
    from megatron_qwen35.data.sft_dataset import sft_samples
    from megatron_qwen35.training.steps import vl_split

    flag = f"--sft-data-path {args.sft_data_path}"
    if args.micro_batch_size != 1:
        raise LaunchRefused(f"{flag} trains on packed sequences, one per micro-batch: --micro-batch-size 1 (a packed "
                            f"sequence already holds several conversations), not {args.micro_batch_size}")
    try:
        samples = sft_samples(args.sft_data_path)
    except (OSError, ValueError, KeyError) as e:
        raise LaunchRefused(f"{flag}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    if len(samples) == 0:
        raise LaunchRefused(f"{flag} holds no conversations (tools/data/preprocess_sft.py)")
    if (samples.vision is None) != (cfg.vision is None) or samples.index["vocab_size"] != cfg.vocab_size:
        raise LaunchRefused(f"{flag} was preprocessed for model '{samples.index['model']}' (vocabulary "
                            f"{samples.index['vocab_size']}, {'no ' if samples.vision is None else ''}vision tower); "
                            f"this run's '{cfg.name}' differs (vocabulary {cfg.vocab_size}, "
                            f"{'no ' if cfg.vision is None else ''}vision tower)")
    if cfg.vision is not None:
        differ = {f: (v, getattr(cfg.vision, f)) for f, v in samples.vision.items() if v != getattr(cfg.vision, f)}
        if differ:
            raise LaunchRefused(f"{flag} was preprocessed for another vision config than model '{cfg.name}' "
                                f"(field: data, model): {differ}")
    cp = args.context_parallel_size
    align = 2 * cp if cp > 1 else 1
    lengths = samples.sizes["tokens"]
    too_long = [i for i, n in enumerate(lengths.tolist()) if aligned(n, align) > args.seq_length]
    if too_long:
        raise LaunchRefused(f"{samples.where(too_long[0])} is {lengths[too_long[0]]} tokens, more than --seq-length "
                            f"{args.seq_length} holds{f' aligned to 2 x CP = {align}' if align > 1 else ''} "
                            f"({len(too_long)} conversations); raise --seq-length, or preprocess with --seq-length and "
                            "--too-long truncate / skip")
    if evaluation_is_on(args):
        begin, end = _validation_range(vl_split(args), len(samples))
        if end <= begin:
            raise LaunchRefused(f"--split {vl_split(args)} leaves no validation conversation of the {len(samples)} in "
                                f"{flag} for evaluation (--eval-iters {args.eval_iters}); give a larger validation "
                                "share (--split), more data, or --eval-iters 0 (EVAL_ITERS=0)")


def check_document_resets(args) -> None:
    """--reset-attention-mask / --reset-position-ids separate a pretraining sequence's documents through the packed
    (THD) path: one sequence per micro-batch, and documents as they fall (context parallelism would need every
    document's length a multiple of 2 x CP)."""
    from megatron_qwen35.training.flags import DOCUMENT_RESET_DESTS, flag_name, separates_documents

    if not separates_documents(args):
        return
    flag = " / ".join(flag_name(d) for d in DOCUMENT_RESET_DESTS if getattr(args, d))
    if args.micro_batch_size != 1:
        raise LaunchRefused(f"{flag} separates each sequence's documents as a packed sequence, one per micro-batch: "
                            f"--micro-batch-size 1, not {args.micro_batch_size}")
    if args.context_parallel_size > 1:
        raise LaunchRefused(f"{flag} with context parallelism: CP cuts every document into 2 x CP equal chunks, and a "
                            "pretraining sequence's documents fall at any length; train with CP=1, or chat data "
                            "(--sft-data-path), whose conversations are aligned")


def check_lora(args, cfg: Qwen35Config) -> None:
    """--lora-* settings (lora/): valid values, and a layout the adapters can follow."""
    from megatron_qwen35.lora.targets import EXPERTS
    from megatron_qwen35.training.flags import lora_settings_from_args

    lora = lora_settings_from_args(args)
    if lora is not None and lora.vision and cfg.vision is None:
        raise LaunchRefused(f"--lora-vision (LORA_VISION=1): model '{cfg.name}' has no vision tower")
    if lora is not None and lora.mtp and not cfg.mtp_num_layers:
        raise LaunchRefused(f"--lora-mtp (LORA_MTP=1): this run's '{cfg.name}' has no MTP layer (--mtp-num-layers 0 "
                            "or MTP=0 turns it off)")
    if lora is not None and lora.router and not cfg.is_moe:
        raise LaunchRefused(f"--lora-router (LORA_ROUTER=1): model '{cfg.name}' has no MoE router")
    if lora is None or not cfg.is_moe or EXPERTS not in lora.target_modules:
        return
    if args.moe_grouped_gemm:
        raise LaunchRefused("--moe-grouped-gemm with LoRA on the routed experts: each expert gets its own adapter on "
                            "its own linear (megatron's SequentialMLP); drop --moe-grouped-gemm, or leave 'experts' "
                            "out of --lora-target-modules (LORA_TARGETS)")
    if args.expert_tensor_parallel_size > 1:
        raise LaunchRefused(f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size} with LoRA on the routed "
                            "experts: the expert adapters are not split over TP; use ETP=1 (experts spread over EP)")


DATA_SOURCES = (  # (flag, args field, the recipes' setting)
    ("--mock-data", "mock_data", "MOCK_DATA=1"), ("--data-path", "data_path", "DATA_PATH"),
    ("--sft-data-path", "sft_data_path", "SFT_DATA_PATH"), ("--vl-data-path", "vl_data_path", "VL_DATA_PATH"))


def check_data(args, cfg: Qwen35Config) -> None:
    """One source of training data (each with the recipes' name for it), then its own checks."""
    given = [f"{flag} ({recipe})" for flag, dest, recipe in DATA_SOURCES if getattr(args, dest, None)]
    if len(given) > 1:
        raise LaunchRefused(f"{given[0]} and {given[1]} both name training data; give one")
    check_document_resets(args)
    if getattr(args, "sft_data_path", None):
        check_sft_data(args, cfg)
    elif getattr(args, "vl_data_path", None):
        check_vl_data(args, cfg)
    elif not args.mock_data:
        check_indexed_data(args)


def check_save(args) -> None:
    """--save holds no link leading outside it (file_names.link_leaving): the run writes there by name."""
    from megatron_qwen35.file_names import link_leaving

    if not args.save or not Path(args.save).is_dir():
        return
    link = link_leaving(Path(args.save))
    if link is not None:
        raise LaunchRefused(f"--save {args.save}: {link[0]} is a link to {link[1]}, outside it; a run writes its "
                            "checkpoints into --save by name and would write there: save into a folder without such "
                            "links")


def check_launch(args, cfg: Qwen35Config) -> list[str]:
    """Every check above on parsed, validated args; returns notes to print (e.g. what a load will initialise)."""
    from megatron_qwen35.training.checkpoint_check import check_load

    check_layout(args, cfg)
    check_save(args)
    check_lora(args, cfg)
    check_schedule(args)
    check_optimizer(args)
    check_data(args, cfg)
    return check_load(args, cfg)


def main(argv: list[str]) -> int:
    """The recipe's check before torchrun: 0 and silent when the launch can run, else one `error:` line and 2.
    WORLD_SIZE is the job's (GPUs per node x nodes), as megatron's argument validation reads it."""
    import logging
    import warnings

    # The verdict is the output: torch's notice that a machine has no CUDA runtime (when megatron imports its extension
    # builder), megatron's own log lines (e.g. building a model to read a checkpoint's keys) and the Python warnings
    # of both (megatron's 'Overriding default arguments', torch's on reading a checkpoint outside a process group)
    # stay out of it; the run torchrun then starts prints them as usual.
    from megatron_qwen35.cli import quiet_library_notices

    quiet_library_notices()  # as the tools: torch's no-CUDA log line among them
    logging.getLogger("megatron").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")  # stricter than the tools: the verdict is the whole output
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
