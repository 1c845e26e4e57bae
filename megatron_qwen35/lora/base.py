"""The frozen base of a LoRA run's checkpoints.

A LoRA run's checkpoints hold what it trains, the adapters and their optimizer state, not the base it leaves
unchanged (the model's `checkpoint_adapters_only`, model.py): a checkpoint of a 397B-A17B run with rank-16 adapters
holds 5.6B parameters, not 397B. The base is named wherever it is needed: training's `--pretrained-checkpoint`
(megatron's flag for the checkpoint a fine-tune starts from; `LOAD=` in the recipes), the merged export's
`--base-dir`, load_model's `base=`, tools/generate.py's `--base`. It is never read from the checkpoint's own files (a
name read from a file is data, not a path). The checkpoint records the base's fingerprint instead (`LORA_BASE` in its
qwen35_config.json metadata), and a named base is checked against it before anything loads.

The fingerprint is a sha256 over every model tensor's name and global shape and the values (as float64) of its first
row's first elements, `t[0, ..., 0, :16]`: kilobytes read from a checkpoint of any size, the same for a copy of the
base, for any of its dtypes and for any parallel layout that saved it (where each stored shard's rows are 16 elements
or wider, as in every released size). Another model, or another checkpoint of the same
model whose weights changed where it is read (a fine-tune changes every tensor's leading row; a merged LoRA export
changes each adapted weight's), gives another fingerprint.

A checkpoint that holds its base and its adapters (tools/convert/hf_to_megatron.py --adapter writes one) records no
fingerprint and is its own base.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import (
    CONFIG,
    TRACKER,
    TRAINING_STATE_KEY,
    iteration_dir,
    latest_iteration,
    load_checkpoint,
    read_config,
)

LORA_BASE = "lora_base"  # qwen35_config.json metadata: the base's fingerprint, in a checkpoint of adapters only
# ... and the base as the training run named it: text for a message that asks for the base, never opened
LORA_BASE_NAMED = "lora_base_named"
FINGERPRINT_ELEMENTS = 16


def base_fingerprint(ckpt_dir: Path | str) -> str:
    """The fingerprint of the model tensors (adapters and optimizer state aside) of `ckpt_dir`'s newest checkpoint."""
    from megatron_qwen35.convert.torch_dist import TorchDistReader

    reader = TorchDistReader(iteration_dir(ckpt_dir, latest_iteration(ckpt_dir)))
    digest = hashlib.sha256()
    try:
        for key in sorted(reader.tensors):
            if TRAINING_STATE_KEY.match(key) or ".lora." in key:
                continue
            values = reader.leading_values(key, FINGERPRINT_ELEMENTS).to(torch.float64)
            digest.update(f"{key}{list(reader.tensors[key].size)}".encode())
            digest.update(values.numpy().tobytes())
    finally:
        reader.close()
    return digest.hexdigest()


def recorded_base(metadata: dict) -> str | None:
    """The base fingerprint a checkpoint's metadata records: a checkpoint of adapters only; None where it holds its
    base (or holds no adapters)."""
    return metadata.get(LORA_BASE) or None


def base_named_by_the_run(metadata: dict) -> str:
    """How a message asking for the base can help: the path the training run named its base by, quoted as text (a
    name read from a file is data: shown, never opened)."""
    named = metadata.get(LORA_BASE_NAMED)
    return f" (its training run named the base {str(named)[:300]!r})" if named else ""


def check_base(base_dir: Path | str, fingerprint: str, lora_dir: Path | str) -> None:
    """Refuse (ValueError) a `base_dir` other than the base `lora_dir`'s adapters were trained on."""
    base_dir, lora_dir = Path(base_dir), Path(lora_dir)
    if not (base_dir / TRACKER).is_file():
        raise ValueError(f"the base {base_dir} is not a Megatron checkpoint ({TRACKER} is missing)")
    if (base_dir / CONFIG).is_file() and recorded_base(read_config(base_dir)[1]):
        raise ValueError(f"the base {base_dir} is itself a LoRA checkpoint of adapters only; name the checkpoint "
                         f"the adapters in {lora_dir} were trained on")
    if base_fingerprint(base_dir) != fingerprint:
        raise ValueError(f"{base_dir} is not the base the adapters in {lora_dir} were trained on: the fingerprint "
                         f"of its weights differs from the one {lora_dir / CONFIG} records")


def load_base(model, base_dir: Path | str) -> None:
    """The frozen base's weights from `base_dir` into `model` (a Qwen35GPTModel, or its virtual pipeline chunks),
    its adapters left as they are."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    with contextlib.ExitStack() as stack:
        for chunk in chunks:
            stack.enter_context(chunk.base_checkpoint_view())
        load_checkpoint(model, base_dir)


__all__ = ["LORA_BASE", "base_fingerprint", "recorded_base", "check_base", "load_base"]
