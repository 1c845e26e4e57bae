"""The --load checkpoint against the run's model, checked before anything is built (training/preflight.py).

- Nothing to load yet (no tracker file): megatron starts from scratch, as when a recipe's LOAD=SAVE is still empty;
  a --load that names nothing else (a Hugging Face folder, a file, one iteration folder, an empty or missing folder
  other than --save) is refused by name, where megatron would warn and train from random weights.
- Every data file the checkpoint's `.metadata` names is a plain name that exists and is long enough.
- The architecture: from our qwen35_config.json where the checkpoint has one (the differing fields named), else from
  the checkpoint's own tensor metadata against the keys and shapes the run's model saves (the first differing
  tensors named): a checkpoint written by another tool loads when it holds this model.
- The conversion record it carries (copied into --save by training) is checked like the exporter checks it.
- The multi-token-prediction layer may differ, within what megatron can load: a weights-only (release, or
  --finetune) checkpoint without MTP weights (what transformers' save_pretrained writes) starts the run's MTP layer
  from its initialisation (the model hides it from the load: `model.Qwen35GPTModel.hide_loss_modules`), and a run
  with MTP off leaves a checkpoint's MTP weights unread; a resumed iteration needs the MTP it was saved with (its
  optimizer state covers exactly those parameters).
- A resumed iteration's learning-rate schedule equals the run's (megatron's own scheduler built for the run, against
  the saved one), unless --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler says which wins.
- Which checkpoint loads is megatron's rule: --load where it holds one, else --pretrained-checkpoint (weights only,
  as megatron's --finetune). The recipes pass a LOAD other than SAVE as --pretrained-checkpoint with --load SAVE: a
  fine-tuning command run again (a requeued job) resumes its own newest iteration instead of starting over from the
  release and saving over the iterations it had.
- LoRA (lora/): a checkpoint records its adapters' settings (qwen35_config.json's `lora`). A LoRA run from a
  checkpoint without adapters loads its weights only (megatron's --finetune; the model hides its adapters from the
  load, which keep their initialisation) and records that base's fingerprint (lora/base.py); its checkpoints hold
  the adapters alone. Resuming one needs the same rank, alpha, targets and MTP choice, and its base named by
  --pretrained-checkpoint, which must have the recorded fingerprint (model_provider loads it); a run without LoRA
  does not load a LoRA checkpoint (export it merged first).
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_qwen35.checkpoint import (
    CONFIG,
    RELEASE,
    TRACKER,
    TRAINING_STATE_KEY,
    CheckpointFileError,
    check_checkpoint_files,
    iteration_dir,
    latest_iteration,
    read_config,
)
from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.training.preflight import LaunchRefused

_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")


def model_checkpoint_shapes(cfg: Qwen35Config) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: global shape} of every tensor `cfg`'s model saves, read off the model built on the meta
    device (convert/megatron_keys.py) in a one-rank world of its own that is gone afterwards."""
    from megatron_qwen35.convert.megatron_keys import MegatronLayout
    from megatron_qwen35.runtime import one_rank_world

    with one_rank_world():
        return MegatronLayout(cfg).checkpoint_shapes()


def _mtp_layers(keys) -> int:
    return len({m.group(1) for k in keys if (m := _MTP_LAYER.match(k))})


def _tensor_differences(directory: Path, cfg: Qwen35Config) -> tuple[list[str], int]:
    """(what differs between the checkpoint's model tensors and `cfg`'s, MTP left aside; its MTP layers)."""
    from megatron_qwen35.convert.torch_dist import TorchDistReader

    reader = TorchDistReader(directory)
    try:
        present = {k: tuple(md.size) for k, md in reader.tensors.items()
               if not TRAINING_STATE_KEY.match(k) and ".lora." not in k}  # adapters: the recorded settings decide
    finally:
        reader.close()
    saved_mtp = _mtp_layers(present)
    expected = model_checkpoint_shapes(cfg.replace(mtp_num_layers=saved_mtp) if saved_mtp else cfg)
    if not saved_mtp:
        expected = {k: v for k, v in expected.items() if not _MTP_LAYER.match(k)}
    differences = [f"the model's '{k}' is missing" for k in sorted(set(expected) - set(present))]
    differences += [f"'{k}' is not this model's" for k in sorted(set(present) - set(expected))]
    differences += [f"'{k}' is {list(present[k])}, the model's {list(v)}" for k, v in expected.items()
                    if k in present and present[k] != v]
    return differences, saved_mtp


def _mtp_note(args, named: str, cfg: Qwen35Config, saved_mtp: int, weights_only: bool) -> list[str]:
    """What happens to the MTP layer when the checkpoint's and the run's differ (see the module docstring)."""
    run_mtp = cfg.mtp_num_layers
    if saved_mtp == run_mtp:
        return []
    if not weights_only:
        raise LaunchRefused(
            f"{named} resumes an iteration saved with {saved_mtp or 'no'} MTP layer(s), this run has "
            f"{run_mtp or 'none'}: its optimizer state covers the parameters it was saved with; resume with "
            f"{'--mtp-num-layers 0 (MTP=0)' if not saved_mtp else 'MTP on (no --mtp-num-layers 0)'}, or start a "
            "new run from its weights with --finetune")
    if not saved_mtp and getattr(args, "lora_rank", 0):
        raise LaunchRefused(f"{named} holds no MTP weights, and a LoRA run trains only adapters: its MTP "
                            "layer would stay at its random initialisation; train without it: MTP=0 "
                            "(--mtp-num-layers 0)")
    if not saved_mtp:
        args.finetune = True  # megatron then asks the model to hide its loss modules while loading
        args.qwen35_mtp_absent_from_load = True  # model_provider: the MTP layer is what the model hides
        return [f"{named} holds no MTP weights (transformers' save_pretrained drops them): the run's "
                f"{run_mtp} MTP layer(s) start from their initialisation and train with the model; MTP=0 "
                "(--mtp-num-layers 0) trains without"]
    return [f"{named} holds {saved_mtp} MTP layer(s), which this run leaves out (--mtp-num-layers 0): "
            "they are not loaded, and its checkpoints and exports hold none"]


def _check_base_is_not_overwritten(args, load: Path, named: str) -> None:
    """A LoRA run's checkpoints hold the adapters alone: saved into the folder of the base they load (the recipes'
    LOAD=SAVE), they would become its newest checkpoint, and no run could name that base again."""
    if args.save and Path(args.save).resolve() == load.resolve():
        raise LaunchRefused(f"{named} is the base of this LoRA run and its --save: the run's checkpoints (the adapters "
                            "alone) would hide the base; save the adapters in a folder of their own (SAVE= in the "
                            "recipes, with LOAD= the base)")


def _lora_note(args, load: Path, named: str, metadata: dict, weights_only: bool) -> list[str]:
    """What a load does with LoRA adapters, the checkpoint's (its record) against the run's; where the run's base
    comes from (`args.qwen35_lora_base`) and its fingerprint and name (`args.qwen35_lora_base_fingerprint`,
    `args.qwen35_lora_base_named`: rank 0)."""
    from megatron_qwen35.lora import LoRASettings
    from megatron_qwen35.lora.base import base_fingerprint, base_named_by_the_run, check_base, recorded_base
    from megatron_qwen35.training.flags import lora_settings_from_args

    run = lora_settings_from_args(args)
    saved = LoRASettings.from_record(metadata["lora"]) if metadata.get("lora") else None
    if saved is None and run is None:
        return []
    if run is not None and (saved is None or recorded_base(metadata) is None):
        _check_base_is_not_overwritten(args, load, named)
    if saved is None:
        if not weights_only:
            raise LaunchRefused(f"{named} resumes an iteration of full training: its optimizer state is "
                                "the whole model's; start LoRA from its weights with --finetune")
        args.finetune = True  # megatron then asks the model to hide its adapters while loading
        args.qwen35_lora_absent_from_load = True
        if args.rank == 0:
            args.qwen35_lora_base_fingerprint, args.qwen35_lora_base_named = base_fingerprint(load), str(load)
        return [f"{named} holds no LoRA adapters: its weights are the frozen base, the adapters "
                f"({run.describe()}) start from peft's initialisation (B = 0: the model starts as the base); the "
                "run's checkpoints hold the adapters, resumed with this base as --pretrained-checkpoint"]
    if run is None:
        raise LaunchRefused(f"{named} holds LoRA adapters ({saved.describe()}): train on with the same "
                            "--lora-* settings (LORA_RANK=...), or export it merged (tools/convert/megatron_to_hf.py) "
                            "and convert that back for full training")
    if saved.shape() != run.shape():
        raise LaunchRefused(f"{named} holds LoRA adapters of another shape ({saved.describe()}) than this "
                            f"run's ({run.describe()}): give the checkpoint's --lora-* settings, or export it merged "
                            "and start new adapters on that")
    fingerprint = recorded_base(metadata)
    if fingerprint is None:  # it holds its base too (hf_to_megatron.py --adapter)
        args.qwen35_lora_base = str(load)
        if args.rank == 0:
            args.qwen35_lora_base_fingerprint, args.qwen35_lora_base_named = base_fingerprint(load), str(load)
        return []
    base = args.pretrained_checkpoint
    if not base or Path(base).resolve() == load.resolve():
        raise LaunchRefused(f"{named} holds LoRA adapters without their frozen base: name the checkpoint they "
                            "were trained on with --pretrained-checkpoint (LOAD= in the recipes, the run resuming "
                            f"from SAVE){base_named_by_the_run(metadata)}")
    if args.rank == 0:  # kilobytes per tensor; the other ranks follow rank 0's refusal
        try:
            check_base(base, fingerprint, load)
        except (ValueError, OSError) as e:
            raise LaunchRefused(f"--pretrained-checkpoint: {e}") from None
        args.qwen35_lora_base_fingerprint, args.qwen35_lora_base_named = fingerprint, str(base)
    args.qwen35_lora_base = str(base)
    return []


def checkpoint_to_load(args) -> tuple[Path | None, bool]:
    """(the checkpoint megatron.training loads, whether it is --pretrained-checkpoint): --load where it holds one,
    else --pretrained-checkpoint, which megatron loads as a --finetune (weights only)."""
    if args.load and (Path(args.load) / TRACKER).is_file():
        return Path(args.load), False
    if getattr(args, "pretrained_checkpoint", None):
        return Path(args.pretrained_checkpoint), True
    return (Path(args.load) if args.load else None), False


def _check_nothing_to_load(args, load: Path | None, pretrained: bool) -> None:
    """Where no checkpoint loads (megatron starts from scratch): refuse a Hugging Face folder, a file, one iteration
    folder of a checkpoint, a --load other than --save that holds nothing (megatron would warn and train from random
    weights: the path was meant to name a checkpoint), a --pretrained-checkpoint without a checkpoint, and LoRA (it
    adapts a base). --load equal to --save and still empty is a first launch of a resumable run."""
    from megatron_qwen35.training.flags import lora_settings_from_args

    flag = "--pretrained-checkpoint" if pretrained else "--load"
    if load is not None and load.is_dir() and (any(load.glob("*.safetensors")) or (load / "config.json").is_file()):
        raise LaunchRefused(f"{flag} {load} is a Hugging Face checkpoint, not a Megatron one: convert it first "
                            f"(python tools/convert/hf_to_megatron.py --hf-dir {load} --out-dir DIR) and "
                            f"{flag} DIR")
    if load is not None and load.exists() and not load.is_dir():
        raise LaunchRefused(f"{flag} {load} is a file; it names a checkpoint folder (the one holding {TRACKER})")
    if load is not None and (load.parent / TRACKER).is_file() and re.fullmatch(r"release|iter_\d{7}", load.name):
        raise LaunchRefused(f"{flag} {load} is one iteration of the checkpoint {load.parent}: {flag} {load.parent}")
    if pretrained:
        where = "does not exist" if not load.exists() else f"holds no checkpoint ({TRACKER} is missing)"
        raise LaunchRefused(f"--pretrained-checkpoint {load} {where}: it names the checkpoint a run starts from "
                            "(LOAD= in the recipes: a converted release, or a run's SAVE)")
    if load is not None and (not args.save or load.resolve() != Path(args.save).resolve()):
        where = "does not exist" if not load.exists() else f"holds no checkpoint ({TRACKER} is missing)"
        raise LaunchRefused(f"--load {load} {where}, and it is not --save (a resumable run's own folder): the run "
                            "would train from random weights; name a checkpoint, or leave --load out to start "
                            "from scratch")
    if lora_settings_from_args(args) is not None:
        raise LaunchRefused(f"LoRA (--lora-rank {args.lora_rank}) trains adapters on a frozen base, and "
                            f"{f'--load {load}' if load else 'no --load'} holds no checkpoint: name the base with "
                            "--load or --pretrained-checkpoint (LOAD= in the recipes: a converted release)")


def check_load(args, cfg: Qwen35Config) -> list[str]:
    """Refuse (LaunchRefused) a --load checkpoint the run cannot load; return notes on what the load will do."""
    from megatron_qwen35.training.flags import lora_settings_from_args

    load, pretrained = checkpoint_to_load(args)
    if load is None or not (load / TRACKER).is_file():
        _check_nothing_to_load(args, load, pretrained)
        return []  # nothing saved there yet: megatron starts from scratch
    flag = "--pretrained-checkpoint" if pretrained else "--load"
    metadata = {}
    try:
        step = None if pretrained else getattr(args, "ckpt_step", None)  # megatron's --ckpt-step: that iteration
        iteration = latest_iteration(load) if step is None else step
        directory = iteration_dir(load, iteration)
        if not directory.is_dir():
            named_by = f"--ckpt-step {step}" if step is not None else str(load / TRACKER)
            raise CheckpointFileError(f"{named_by} names {directory.name}, which is missing")
        check_checkpoint_files(directory)
        if (load / CONFIG).is_file():
            from megatron_qwen35.convert.record import ConversionRecord
            from megatron_qwen35.training.launch import architecture_differences

            saved, metadata = read_config(load)
            ConversionRecord.from_metadata(metadata, source=load / CONFIG)
            detail = [f"{k}: checkpoint {v[0]!r}, this run {v[1]!r}"
                      for k, v in architecture_differences(saved, cfg).items()]
            saved_mtp, how = saved.mtp_num_layers, f"its {CONFIG}"
        else:
            detail, saved_mtp = _tensor_differences(directory, cfg)
            how = f"no {CONFIG}; its tensors"
    except (ValueError, OSError) as e:
        raise LaunchRefused(f"{flag} {load}: {e}") from None
    if detail:
        more = f" (and {len(detail) - 5} more)" if len(detail) > 5 else ""
        raise LaunchRefused(f"{flag} {load} holds another model than this run's '{cfg.name}' ({how}: "
                            f"{'; '.join(detail[:5])}{more}); give the matching --qwen35-preset / --hf-config, or "
                            "another checkpoint")
    weights_only = iteration == RELEASE or args.finetune or pretrained
    named = f"{flag} {load}"
    notes = _lora_note(args, load, named, metadata, weights_only)
    notes += _mtp_note(args, named, cfg, saved_mtp, weights_only=weights_only)
    if not pretrained and getattr(args, "pretrained_checkpoint", None) and lora_settings_from_args(args) is None:
        notes.append(f"{named} holds iteration {iteration}: the run resumes it (megatron reads "
                     f"--pretrained-checkpoint {args.pretrained_checkpoint}, where it started, only while --load "
                     "holds no checkpoint)")
    if not weights_only and args.train_iters and iteration >= args.train_iters and not args.skip_train:
        # megatron asserts 'no samples left to consume' on every rank once all is built
        raise LaunchRefused(f"{named} is at iteration {iteration}, and --train-iters {args.train_iters} "
                            "(TRAIN_ITERS) ends the run there: nothing is left to train; to train on, raise it and add "
                            "--override-opt_param-scheduler (megatron otherwise holds the run to the saved schedule)"
                            f"{_start_again(args)}")
    if not weights_only:
        _check_schedule(args, directory, named)
    return notes


# What sets each value of megatron's saved learning-rate schedule (OptimizerParamScheduler.state_dict; steps count
# samples: iterations x the global batch size).
_SCHEDULE_SETTINGS = {
    "max_lr": "--lr (LR)", "min_lr": "--min-lr (MIN_LR)", "lr_decay_style": "--lr-decay-style",
    "lr_warmup_steps": "--lr-warmup-iters (WARMUP) or --lr-warmup-fraction, x --global-batch-size (GLOBAL_BATCH)",
    "lr_decay_steps": "--lr-decay-iters, else --train-iters (TRAIN_ITERS), x --global-batch-size (GLOBAL_BATCH)",
    "start_wd": "--start-weight-decay / --weight-decay", "end_wd": "--end-weight-decay / --weight-decay",
    "wd_incr_style": "--weight-decay-incr-style", "wd_incr_steps": "--train-iters (TRAIN_ITERS) x --global-batch-size",
}


def _this_runs_schedule(args) -> dict:
    """The schedule megatron.training builds for this run (its own get_optimizer_param_scheduler, on a copy of the args
    set as its global args for the call; the stub optimizer has no parameter group to set a learning rate on)."""
    import copy
    import types

    from megatron.training import global_vars
    from megatron.training.training import get_optimizer_param_scheduler

    previous = global_vars._GLOBAL_ARGS  # None before parse_qwen35_args sets the globals (after these checks)
    global_vars.set_args(copy.copy(args))  # megatron fills in e.g. lr_decay_iters on the args it reads
    try:
        return get_optimizer_param_scheduler(types.SimpleNamespace(param_groups=[])).state_dict()
    finally:
        global_vars.set_args(previous)


def _check_schedule(args, directory: Path, named: str) -> None:
    """A resumed run's learning-rate schedule against the saved one: megatron's OptimizerParamScheduler asserts them
    equal when it loads the optimizer, once the model and optimizer are built, on every rank (changing TRAIN_ITERS,
    GLOBAL_BATCH or LR between two launches of a run), unless told which one to keep."""
    if (args.finetune or args.no_load_optim or args.skip_train or args.ckpt_format != "torch_dist"
            or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        return  # megatron loads no schedule, or is told which one wins
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        saved = load_common_state_dict(str(directory)).get("opt_param_scheduler")
    except (Exception, CheckpointException) as e:  # noqa: BLE001  megatron's load would raise it too, on every rank
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's CheckpointException holds each rank's traceback: its last line is the error
        why = lines[-1] if isinstance(e, CheckpointException) and lines else f"{type(e).__name__}: {(lines or [''])[0]}"
        raise LaunchRefused(f"{named}: {directory.name}'s common state (where megatron keeps the iteration, the "
                            f"arguments and the learning-rate schedule) cannot be read: {why[:300]}") from None
    if saved is None:
        return  # saved without an optimizer: megatron has no schedule to compare
    run = _this_runs_schedule(args)
    differing = [f"{key} {saved[key]!r} saved, {run[key]!r} now ({_SCHEDULE_SETTINGS.get(key, key)})"
                 for key in run if key != "num_steps" and key in saved and saved[key] != run[key]]
    if differing:
        raise LaunchRefused(f"{named} resumes a run saved with another learning-rate schedule: {'; '.join(differing)}; "
                            "launch with the saved settings, or add --override-opt_param-scheduler (this run's "
                            f"schedule from here on) or --use-checkpoint-opt_param-scheduler (the saved one)"
                            f"{_start_again(args)}")


def _start_again(args) -> str:
    """The way out of a refused resume where the run was meant to start over from its --pretrained-checkpoint."""
    start = getattr(args, "pretrained_checkpoint", None)
    return f"; to start again from --pretrained-checkpoint {start} (LOAD), --save (SAVE) a new folder" if start else ""


__all__ = ["check_load", "checkpoint_to_load", "model_checkpoint_shapes"]
