"""megatron_qwen35 torch_dist checkpoint -> Hugging Face safetensors: the inverse of `hf_to_megatron`.

Top-down:
1. The checkpoint's conversion record (`record.ConversionRecord`) decides the output: the names (`table.HFLayout`),
   dtypes, text files and shard files of the converted source. A checkpoint without one (trained from scratch) is
   written the way transformers' save_pretrained writes (`HFLayout.saved_by_transformers`): the VL wrapper's names
   for a model with a vision tower, else text-only names; experts per expert, no lm_head when tied,
   each tensor in the dtype the checkpoint holds (A_log and the GDN norm fp32 under bf16, as the releases store them).
2. `_check_checkpoint` holds the checkpoint's keys and shapes against the model's own key schema (`MegatronLayout`).
3. The plan (every output tensor's name, dtype, shape and file) is fixed before a byte is written. Every rule runs in
   the pipeline's lanes: its tensors are read region by region, checked for NaN / Inf, transformed, cast and written
   at their planned offsets. A rule that only moves bytes (no arithmetic, no cast) is not run on the data: its
   outputs are copied from the checkpoint's records by the kernel (`Transform.moved_vectors`, `file_bytes`), and the
   NaN / Inf screen reads the records memory-mapped. The vision tower comes back through its rules in the same
   table.
4. The writer checks that every planned tensor was written exactly once before the directory appears.

A LoRA checkpoint (its record says `lora`: lora/) exports merged by default, each adapted weight written as
`W + scaling B A` (in fp32, stored in the base's dtype); a LoRA run's checkpoint holds the adapters alone, and its base
is named by `base_dir` (checked against the fingerprint it records: lora/base.py), while one converted with its
adapter holds both. With `adapter_only` the adapters alone are written as a Hugging Face PEFT adapter directory
(`qwen35_adapter_to_peft`), which needs no base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import CONFIG, TRAINING_STATE_KEY, iteration_dir, latest_iteration, read_config
from megatron_qwen35.config import Qwen35Config, qwen35_config_to_hf
from megatron_qwen35.convert.file_bytes import FileRange, mapped, vector_ranges
from megatron_qwen35.convert.megatron_keys import MegatronLayout
from megatron_qwen35.convert.output_dir import output_directory, write_file
from megatron_qwen35.convert.pipeline import DEFAULT_LANES, Progress, non_finite_note, run_in_lanes
from megatron_qwen35.convert.record import ConversionRecord
from megatron_qwen35.convert.safetensors_files import (
    PlannedTensor,
    SafetensorsShardWriter,
    ShardPlan,
    index_weight_map,
)
from megatron_qwen35.convert.table import LM_HEAD, NamedRule, check_names, hf_shapes
from megatron_qwen35.convert.torch_dist import TorchDistReader


def _check_checkpoint(keys: MegatronLayout, reader: TorchDistReader, names: set[str] | None = None,
                      ignored: set[str] = frozenset()) -> None:
    """The checkpoint holds exactly the model's keys (or the checkpoint keys of table tensors `names`), each with the
    model's global shape; `ignored` checkpoint keys may be there too (a base's own adapters)."""
    want = keys.checkpoint_shapes(names)
    # A training checkpoint also holds the optimizer's sharded state; only the model's tensors are exported.
    model_keys = {k for k in reader.tensors if not TRAINING_STATE_KEY.match(k)} - set(ignored)
    check_names(model_keys, set(want), side=f"Megatron ({reader.directory})")
    for key, shape in want.items():
        got = tuple(reader.tensors[key].size)
        if got != shape:
            raise ValueError(f"tensor '{key}' in {reader.directory} has shape {list(got)}; the model's config "
                             f"implies {list(shape)}")


def _hf_texts(cfg: Qwen35Config, record: ConversionRecord) -> dict[str, str]:
    texts = dict(record.hf_files)
    if "config.json" not in texts:
        texts["config.json"] = json.dumps(qwen35_config_to_hf(cfg), indent=2, sort_keys=True) + "\n"
    if "generation_config.json" not in texts:
        texts["generation_config.json"] = json.dumps({"_from_model_config": True}, indent=2) + "\n"
    return texts


def _plan(rules: list[NamedRule], keys: MegatronLayout, reader: TorchDistReader, cfg: Qwen35Config,
          record: ConversionRecord) -> list[PlannedTensor]:
    """Every output tensor's name, dtype and shape."""
    shapes = hf_shapes(rules, keys.shape, cfg)
    plan = [PlannedTensor(n, record.dtype_of(n) or keys.checkpoint_dtype(reader, r.megatron[0]), shapes[n])
            for r in rules for n in r.hf]
    if record.layout.stored_tied_head:  # a copy of the embedding (the table's first rule)
        plan.append(PlannedTensor(LM_HEAD, record.dtype_of(LM_HEAD) or plan[0].dtype, plan[0].shape))
    return plan


def _shard_plan(plan: list[PlannedTensor], record: ConversionRecord, max_shard_size: int | str | None, *,
                source: Path) -> ShardPlan:
    """The recorded source's files, unless a shard size is asked for or the model holds other tensors than the
    source did (a run that added an MTP layer to a source without one, or left it out): then transformers' plan."""
    if max_shard_size is None and record.shards is not None:
        if "file" in record.shards or (set(index_weight_map(record.shards["index"], source=source))
                                       == {p.name for p in plan}):
            return ShardPlan.recorded(plan, record.shards, source=source)
    return ShardPlan.split(plan, *([max_shard_size] if max_shard_size is not None else []))


def _lora_settings(metadata: dict, source: Path):
    from megatron_qwen35.lora import LoRASettings

    if not metadata.get("lora"):
        return None
    try:
        return LoRASettings.from_record(metadata["lora"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source} records LoRA adapters it cannot describe ({e})") from None


def _lora_readers(megatron_dir: Path, metadata: dict, lora, base_dir: Path | str | None):
    """(the reader of the base's tensors, the reader of the adapters') of a checkpoint: the same reader for one that
    holds its base (or no adapters), the named base's and the checkpoint's own for a LoRA run's (adapters only)."""
    from megatron_qwen35.lora.base import base_named_by_the_run, check_base, recorded_base

    fingerprint = recorded_base(metadata) if lora is not None else None
    if fingerprint is None and base_dir is not None:
        raise ValueError(f"{megatron_dir} holds {'its base' if lora is not None else 'no LoRA adapters'}: "
                         "--base-dir names the base of a LoRA run's checkpoint, which holds the adapters alone")
    reader = TorchDistReader(iteration_dir(megatron_dir, latest_iteration(megatron_dir)))
    if fingerprint is None:
        return reader, reader
    try:
        if base_dir is None:
            raise ValueError(f"{megatron_dir} holds LoRA adapters without their frozen base: name the checkpoint they "
                             f"were trained on with --base-dir{base_named_by_the_run(metadata)}")
        check_base(base_dir, fingerprint, megatron_dir)
        return TorchDistReader(iteration_dir(base_dir, latest_iteration(base_dir))), reader
    except BaseException:
        reader.close()
        raise


def qwen35_adapter_to_peft(megatron_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False) -> Path:
    """The LoRA adapters of a LoRA checkpoint as a Hugging Face PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors; transformers' module names, as peft.PeftModel.from_pretrained reads them)."""
    from safetensors.torch import save

    from megatron_qwen35.lora.base import recorded_base
    from megatron_qwen35.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config, to_peft

    megatron_dir = Path(megatron_dir)
    cfg, metadata = read_config(megatron_dir)
    record = ConversionRecord.from_metadata(metadata, source=megatron_dir / CONFIG)
    lora = _lora_settings(metadata, megatron_dir / CONFIG)
    if lora is None:
        raise ValueError(f"{megatron_dir} holds no LoRA adapters (its {CONFIG} records none): --adapter-only "
                         "exports a LoRA run's checkpoint")
    layout = record.export_layout(cfg)
    reader = TorchDistReader(iteration_dir(megatron_dir, latest_iteration(megatron_dir)))
    try:
        keys = MegatronLayout(cfg, lora=lora)
        _check_checkpoint(keys, reader, keys.lora_names if recorded_base(metadata) else None)
        tensors = to_peft({n: keys.read(reader, n) for n in sorted(keys.lora_names)}, cfg, hf_prefix=layout.prefix)
    finally:
        reader.close()
    source = str(megatron_dir / CONFIG)
    with output_directory(out_dir, overwrite=overwrite, inputs=[megatron_dir]) as tmp:
        write_file(tmp, ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}), source=source)
        write_file(tmp, ADAPTER_CONFIG, (json.dumps(peft_config(lora, cfg), indent=2, sort_keys=True) + "\n").encode(),
                   source=source)
    return Path(out_dir)


def qwen35_megatron_to_hf(megatron_dir: Path | str, out_dir: Path | str, *, base_dir: Path | str | None = None,
                          overwrite: bool = False, max_shard_size: int | str | None = None, progress: bool = True,
                          lanes: int = DEFAULT_LANES) -> Path:
    """Write the Hugging Face checkpoint (safetensors, index, config.json, generation_config.json) of a
    megatron_qwen35 checkpoint directory (`base_dir`: the base of a LoRA run's checkpoint, merged with its adapters).
    `max_shard_size` (bytes or "5GB") re-plans the shards; by default the converted source's files come back, or
    transformers' default shards for a checkpoint without a source. Returns `out_dir`, which appears only once
    everything is written."""
    megatron_dir = Path(megatron_dir)
    cfg, metadata = read_config(megatron_dir)
    record = ConversionRecord.from_metadata(metadata, source=megatron_dir / CONFIG)
    lora = _lora_settings(metadata, megatron_dir / CONFIG)
    reader, adapter_reader = _lora_readers(megatron_dir, metadata, lora, base_dir)
    try:
        keys = MegatronLayout(cfg, lora=lora)
        if reader is adapter_reader:
            _check_checkpoint(keys, reader)
        else:  # a base that holds adapters itself (hf_to_megatron.py --adapter) gives its base weights alone: the run
            # trained those adapters on into its own (training and load_model read such a base the same way)
            base_lora = _lora_settings(read_config(base_dir)[1], Path(base_dir) / CONFIG)
            own = MegatronLayout(cfg, lora=base_lora) if base_lora is not None else None
            _check_checkpoint(keys, reader, keys.base_names(),
                              ignored=set(own.checkpoint_shapes(own.lora_names)) if own is not None else set())
            _check_checkpoint(keys, adapter_reader, keys.lora_names)
        layout = record.export_layout(cfg)
        rules = layout.rules(cfg)
        check_names(keys.base_names(), {n for r in rules for n in r.megatron}, side="Megatron model")
        from megatron_qwen35.lora.merge import adapted_weights

        adapter_names = adapted_weights(keys.lora_names, cfg)  # each weight LoRA updates -> its adapter's tensors
        adapted = set(adapter_names)
        plan = _plan(rules, keys, reader, cfg, record)
        shards = _shard_plan(plan, record, max_shard_size, source=megatron_dir / CONFIG)
        dtypes = {p.name: p.dtype for p in plan}
        shapes = {p.name: p.shape for p in plan}
        sizes = {p.name: p.nbytes for p in plan}

        def written(name: str) -> list[str]:  # a stored tied head is a copy of the embedding (the first rule)
            return [name, *([LM_HEAD] if name == plan[0].name and record.layout.stored_tied_head else [])]

        def file_moves(rule: NamedRule) -> tuple[torch.dtype, list[list[FileRange]], list[list[FileRange]]] | None:
            """(the dtype, each Megatron input's file ranges, each output's) when the rule only moves bytes and casts
            none."""
            if adapted.intersection(rule.megatron):
                return None  # merged with its adapter: arithmetic
            stored = {keys.checkpoint_dtype(reader, n) for n in rule.megatron}
            if len(stored) != 1 or any(dtypes[n] not in stored for name in rule.hf for n in written(name)):
                return None
            files = [keys.file_ranges(reader, n) for n in rule.megatron]
            moved = rule.transform.moved_vectors("to_hf", [keys.shape(n) for n in rule.megatron], cfg)
            if moved is None or any(f is None for f in files):
                return None
            dtype = stored.pop()
            vector_bytes = keys.shape(rule.megatron[0])[-1] * dtype.itemsize
            return dtype, files, [vector_ranges(runs, files, vector_bytes) for _, runs in moved]

        def write(name: str, tensor: torch.Tensor | None, ranges: list[FileRange] | None,
                  writer: SafetensorsShardWriter, bar: Progress) -> None:
            for n in written(name):
                if ranges is not None:
                    writer.copy(n, dtypes[n], shapes[n], ranges)
                else:
                    writer.write(n, tensor.to(dtypes[n]))
                bar.update(sizes[n])

        def convert(rule: NamedRule, writer: SafetensorsShardWriter, bar: Progress) -> list[str]:
            found = file_moves(rule)
            if found is not None:  # the bytes only move: copied from the checkpoint's files, never through memory
                dtype, files, outputs = found
                notes = [note for n, f in zip(rule.megatron, files, strict=True)
                         if (note := non_finite_note(n, [mapped(r, dtype) for r in f], reader.directory))]
                for name, ranges in zip(rule.hf, outputs, strict=True):
                    write(name, None, ranges, writer, bar)
                return notes
            inputs = [keys.read(reader, n) for n in rule.megatron]
            notes = [note for n, t in zip(rule.megatron, inputs, strict=True)
                     if (note := non_finite_note(n, t, reader.directory))]
            if adapted.intersection(rule.megatron):
                from megatron_qwen35.lora.merge import merged_weight

                inputs = [merged_weight(n, t, cfg, _adapter_tensors(n), lora.alpha / lora.rank) if n in adapted else
                          t.float() for n, t in zip(rule.megatron, inputs, strict=True)]
            if rule.transform.arithmetic:
                work = rule.transform.work_dtype(dtypes[rule.hf[0]])
                inputs = [t.to(work) for t in inputs]
            for name, tensor in zip(rule.hf, rule.transform.to_hf(inputs, cfg), strict=True):
                write(name, tensor, None, writer, bar)
            return notes

        def _adapter_tensors(weight: str) -> dict[str, torch.Tensor]:
            return {n: keys.read(adapter_reader, n) for n in adapter_names[weight]}

        costs = [2 * sum(sizes[n] for n in rule.hf) for rule in rules]
        inputs = [megatron_dir, *([base_dir] if base_dir is not None else [])]
        with output_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
            bar = Progress(sum(sizes.values()), f"Megatron -> HF {megatron_dir.name}", enabled=progress)
            writer = SafetensorsShardWriter(tmp, shards)
            try:
                run_in_lanes(rules, costs, lambda rule, lane: convert(rule, writer, bar), lanes=lanes)
                writer.close()
                bar.close()
            except BaseException:
                writer.abort()
                raise
            for file, text in _hf_texts(cfg, record).items():
                write_file(tmp, file, text.encode(), source=str(megatron_dir / CONFIG))
    finally:
        reader.close()
        adapter_reader.close()
    return Path(out_dir)
