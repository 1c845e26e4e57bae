"""megatron_qwen35 torch_dist checkpoint -> Hugging Face safetensors, streamed one rule of the table at a time.

The inverse of `hf_to_megatron`: the same rules read the other way, tensors read region by region from the
checkpoint (only the chunks each tensor needs), written into planned safetensors shards. What the import recorded
in the metadata decides the output's layout: HF prefix, expert layout (decoder and MTP separately), per-tensor
dtypes, config.json / generation_config.json verbatim, vision tensors, a stored tied lm_head. A checkpoint with no
such record (trained from scratch) is written the way transformers' save_pretrained would: text-only names,
experts per expert, no lm_head when tied, in the checkpoint's dominant dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_qwen35.checkpoint import iteration_dir, latest_iteration, read_config
from megatron_qwen35.config import qwen35_config_to_hf
from megatron_qwen35.convert.hf_to_megatron import (
    MegatronLayout,
    compute_in,
    conversion_rules,
    dtype_from_name,
    hf_shapes,
)
from megatron_qwen35.convert.io import (
    DEFAULT_SHARD_BYTES,
    CheckpointFileError,
    PlannedTensor,
    Progress,
    SafetensorsCheckpoint,
    SafetensorsShardWriter,
    TorchDistReader,
    output_directory,
    warn_if_not_finite,
)
from megatron_qwen35.convert.table import TEXT_ONLY_PREFIX, NamedRule, check_names
from megatron_qwen35.convert.transforms import PLUS_ONE

TRAINING_STATE_PREFIXES = ("optimizer.",)  # megatron's optimizer sharded_state_dict keys
SAVE_PRETRAINED_LAYOUT = {"decoder": "per_expert", "mtp": "per_expert"}  # transformers writes experts per expert


def _check_checkpoint(layout: MegatronLayout, reader: TorchDistReader) -> None:
    """The checkpoint holds exactly the model's keys, each with the model's global shape."""
    want = layout.checkpoint_shapes()
    # A training checkpoint also holds the optimizer's sharded state; only the model's tensors are exported.
    model_keys = {k for k in reader.tensors if not k.startswith(TRAINING_STATE_PREFIXES)}
    check_names(model_keys, set(want), side=f"Megatron ({reader.directory})")
    for key, shape in want.items():
        got = tuple(reader.tensors[key].size)
        if got != shape:
            raise ValueError(f"tensor '{key}' in {reader.directory} has shape {list(got)}; the model's config "
                             f"implies {list(shape)}")


def _hf_texts(cfg, metadata: dict[str, Any]) -> dict[str, str]:
    texts = dict(metadata.get("hf_files") or {})
    if "config.json" not in texts:
        texts["config.json"] = json.dumps(qwen35_config_to_hf(cfg), indent=2, sort_keys=True) + "\n"
    if "generation_config.json" not in texts:
        texts["generation_config.json"] = json.dumps({"_from_model_config": True}, indent=2) + "\n"
    return texts


def _plan(rules: list[NamedRule], layout: MegatronLayout, reader: TorchDistReader, cfg, metadata: dict[str, Any],
          vision: SafetensorsCheckpoint | None) -> list[PlannedTensor]:
    """Every output tensor's name, dtype and shape, in writing order."""
    shapes = hf_shapes(rules, layout, cfg)
    special = {n: dtype_from_name(d) for n, d in (metadata.get("hf_dtypes") or {}).items()}
    if "source_dtype" in metadata:  # the converted source's dtypes, name by name
        default = dtype_from_name(metadata["source_dtype"])
        plan = [PlannedTensor(n, special.get(n, default), shapes[n]) for r in rules for n in r.hf]
    else:  # no record of a source (trained here): each tensor as the checkpoint holds it (A_log, GDN norm fp32)
        plan = [PlannedTensor(n, layout.stored_dtype(reader, r.megatron[0]), shapes[n]) for r in rules for n in r.hf]
    if metadata.get("tied_lm_head_in_source"):  # right after the embedding (the table's first rule), its copy
        plan.insert(1, PlannedTensor("lm_head.weight", special.get("lm_head.weight", plan[0].dtype), plan[0].shape))
    if vision is not None:
        plan += [PlannedTensor(n, e.dtype, e.shape) for n, e in vision.entries.items()]
    return plan


def qwen35_megatron_to_hf(megatron_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False,
                          max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write the Hugging Face checkpoint (safetensors shards + index, config.json, generation_config.json) of a
    megatron_qwen35 checkpoint directory. Returns `out_dir`, which appears only once everything is written."""
    megatron_dir = Path(megatron_dir)
    cfg, metadata = read_config(megatron_dir)
    reader = TorchDistReader(iteration_dir(megatron_dir, latest_iteration(megatron_dir)))
    layout = MegatronLayout(cfg)
    _check_checkpoint(layout, reader)
    hf_prefix = metadata.get("hf_prefix", TEXT_ONLY_PREFIX)
    rules = conversion_rules(cfg, hf_prefix=hf_prefix, expert_layout=metadata.get("expert_layout")
                             or SAVE_PRETRAINED_LAYOUT)
    check_names(set(layout.entries), {n for r in rules for n in r.megatron}, side="Megatron model")
    vision = None
    if metadata.get("vision"):
        vision_dir = megatron_dir / metadata["vision"]
        if not vision_dir.is_dir():
            raise CheckpointFileError(f"{megatron_dir}: metadata names vision tensors in {vision_dir}, "
                                      "which is missing")
        vision = SafetensorsCheckpoint(vision_dir)
    plan = _plan(rules, layout, reader, cfg, metadata, vision)
    dtypes = {p.name: p.dtype for p in plan}
    try:
        with output_directory(out_dir, overwrite=overwrite, inputs=[megatron_dir]) as tmp:
            writer = SafetensorsShardWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
            try:
                bar = Progress(sum(p.nbytes for p in plan), f"Megatron -> HF {megatron_dir.name}",
                               enabled=progress)
                for rule in rules:
                    inputs = [layout.read(reader, n) for n in rule.megatron]
                    warn_if_not_finite(rule.megatron, inputs, reader.directory)
                    work = compute_in(rule, dtypes[rule.hf[0]]) if rule.transform is PLUS_ONE else None
                    outputs = rule.transform.to_hf([t.to(work) for t in inputs] if work else inputs, cfg)
                    for name, tensor in zip(rule.hf, outputs, strict=True):
                        tensor = tensor.to(dtypes[name])
                        writer.write(name, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
                        if name == plan[0].name and metadata.get("tied_lm_head_in_source"):
                            writer.write("lm_head.weight", tensor.to(dtypes["lm_head.weight"]))
                            bar.update(tensor.numel() * tensor.element_size())
                    del inputs, outputs
                if vision is not None:
                    for name in vision:
                        t = vision[name]
                        writer.write(name, t)
                        bar.update(t.numel() * t.element_size())
                writer.close()
                bar.close()
            except BaseException:
                writer.abort()  # let the write-behind thread stop before the temporary directory goes
                raise
            for file, text in _hf_texts(cfg, metadata).items():
                (tmp / file).write_text(text)
    finally:
        reader.close()
    return Path(out_dir)
