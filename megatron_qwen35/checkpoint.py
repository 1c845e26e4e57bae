"""Megatron distributed (torch_dist) checkpoints with the model's Qwen3.5 config beside the weights.

Layout, as megatron.training's `--load` expects it:
    DIR/latest_checkpointed_iteration.txt     the iteration number, or "release" (written last: a checkpoint without
                                              it is incomplete)
    DIR/iter_0000100/  or  DIR/release/       megatron-core dist_checkpointing (parallelism-agnostic shards)
    DIR/qwen35_config.json                    our Qwen35Config plus metadata (e.g. the source's expert layout)
A "release" checkpoint holds weights only, as megatron's own converters write them: megatron.training starts it at
iteration 0 and asks for no optimizer or RNG state (what a converted Hugging Face model is). Training writes iter_*.
Any TP/PP/EP layout can load what any other saved: our modules' sharded_state_dict keeps that promise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.file_names import plain_file_name

# megatron's optimizer sharded_state_dict keys: "optimizer.*", or "chained_{i}.optimizer.*" where a ChainedOptimizer
# holds several (MoE expert parameters, the distributed optimizer at TP / EP > 1; megatron-core 0.19.2): a training
# checkpoint's state beside the model's tensors
TRAINING_STATE_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")
TRACKER = "latest_checkpointed_iteration.txt"
CONFIG = "qwen35_config.json"
RELEASE = "release"  # the tracker's word (and the directory) for weights without a training state
# qwen35_config.json metadata: the config of the checkpoint a run loaded from its own --save, kept until the run's
# first save there (training/launch.py writes it; read_config answers with it while that checkpoint is the newest)
UNTIL_NEXT_SAVE = "until_next_save"


def iteration_dir(ckpt_dir: Path | str, iteration: int | str) -> Path:
    """The directory of one checkpoint: iter_XXXXXXX, or release/ (megatron.training's names)."""
    return Path(ckpt_dir) / (RELEASE if iteration == RELEASE else f"iter_{iteration:07d}")


def _model_state(model) -> dict[str, Any]:
    """Megatron's convention: one chunk under "model", virtual pipeline chunks under "model0", "model1", ..."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_config(ckpt_dir: Path | str, cfg: Qwen35Config, metadata: dict[str, Any] | None = None) -> None:
    """qwen35_config.json, replaced in one step (a reader never sees half a file)."""
    path = Path(ckpt_dir) / CONFIG
    partial = path.with_name(f".{CONFIG}.{os.getpid()}")
    partial.write_text(json.dumps({"config": cfg.to_dict(), "metadata": metadata or {}}, indent=2) + "\n")
    os.replace(partial, path)


def read_config(ckpt_dir: Path | str) -> tuple[Qwen35Config, dict[str, Any]]:
    """The model config and metadata stored with a checkpoint written by this project, for its newest checkpoint: a
    run that loaded from its own --save and changed what its checkpoints hold (the MTP layer) wrote its config with
    the loaded one kept (UNTIL_NEXT_SAVE), which answers until the run has saved (a run that fails before its first
    save leaves the folder describing what it holds)."""
    path = Path(ckpt_dir) / CONFIG
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} "
                                f"{'is a file' if Path(ckpt_dir).exists() else 'does not exist'}")
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron_qwen35 checkpoint: {CONFIG} is missing")
    try:  # a damaged or crafted file is bad input, named: not a KeyError / TypeError deep in a reader
        d = json.loads(path.read_text())
        metadata = d.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError(f"'metadata' is a {type(metadata).__name__}, not an object")
        loaded = metadata.pop(UNTIL_NEXT_SAVE, None)
        run = Qwen35Config.from_dict(d["config"]), metadata
        if loaded is not None:
            loaded = str(loaded["iteration"]), Qwen35Config.from_dict(loaded["config"]), dict(loaded["metadata"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json's decode error is a ValueError
        raise ValueError(f"{path} is not a readable {CONFIG} ({type(e).__name__}: {e})") from None
    if loaded is not None and (Path(ckpt_dir) / TRACKER).is_file() and str(latest_iteration(ckpt_dir)) == loaded[0]:
        return loaded[1:]  # the run that wrote `run` has not saved here yet
    return run


def latest_iteration(ckpt_dir: Path | str) -> int | str:
    """The newest complete checkpoint's iteration, or RELEASE."""
    tracker = Path(ckpt_dir) / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint: {TRACKER} is missing")
    text = tracker.read_text().strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold an iteration number or '{RELEASE}', found '{text}'")
    return int(text)


def _full_state(model, optimizer, *, is_loading: bool) -> dict[str, Any]:
    """megatron.training's checkpoint layout: model chunks, and the optimizer's state sharded like the model."""
    state = _model_state(model)
    if optimizer is not None:
        from megatron.core import parallel_state

        metadata = {  # megatron.training's choices: optimizer state reshardable across data-parallel sizes
            "distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def save_checkpoint(model, cfg: Qwen35Config, ckpt_dir: Path | str, *, iteration: int = 0, optimizer=None,
                    metadata: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None) -> Path:
    """Save `model` (a module or its virtual-pipeline chunks), and the optimizer if given, from every rank."""
    ckpt_dir = Path(ckpt_dir)
    target = iteration_dir(ckpt_dir, iteration)
    if _rank0():
        target.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {**_full_state(model, optimizer, is_loading=False), "checkpoint_version": 3.0, "iteration": iteration,
             **(extra_state or {})}
    dist_checkpointing.save(state, str(target))
    if _rank0():
        write_config(ckpt_dir, cfg, metadata)
        (ckpt_dir / TRACKER).write_text(f"{iteration}\n")
    _barrier()
    return target


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated or malformed; the message names the file (and tensor)."""


def check_checkpoint_files(source: Path | str) -> None:
    """Name a missing or cut-off data file and the first tensor it loses, before dist_checkpointing would fail deep
    inside torch naming neither (a copy interrupted, a full disk during save). Reads only metadata and file sizes."""
    from torch.distributed.checkpoint import FileSystemReader

    source = Path(source)
    try:
        metadata = FileSystemReader(str(source)).read_metadata()
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a missing or corrupt .metadata
        raise CheckpointFileError(f"{source}: its .metadata cannot be read ({type(e).__name__}: {e})") from None
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        path = source / plain_file_name(info.relative_path, source=source / ".metadata")
        if info.relative_path not in sizes:
            sizes[info.relative_path] = path.stat().st_size if path.is_file() else -1
        size = sizes[info.relative_path]
        if size < 0:
            raise CheckpointFileError(f"{path} is missing (it holds '{index.fqn}')")
        if info.offset + info.length > size:
            raise CheckpointFileError(f"{path} is cut off at {size} bytes: '{index.fqn}' needs bytes "
                                       f"{info.offset}-{info.offset + info.length}")


def load_checkpoint(model, ckpt_dir: Path | str, *, iteration: int | None = None, optimizer=None,
                    strict: bool = True) -> dict[str, Any]:
    """Load weights (and optimizer state) saved at any parallel layout into this rank's shards.

    Returns the checkpoint's other entries (iteration, and whatever `extra_state` the saver added).
    """
    iteration = latest_iteration(ckpt_dir) if iteration is None else iteration
    source = iteration_dir(ckpt_dir, iteration)
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint directory {source} is missing")
    check_checkpoint_files(source)
    loaded = dist_checkpointing.load(_full_state(model, optimizer, is_loading=True), str(source))
    chunks = model if isinstance(model, (list, tuple)) else [model]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys, strict=True):
        chunk.load_state_dict(loaded.pop(key), strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded.pop("optimizer"))
    return loaded
