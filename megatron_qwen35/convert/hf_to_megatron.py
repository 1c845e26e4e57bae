"""Hugging Face Qwen3.5 checkpoint -> megatron torch_dist *release* checkpoint (megatron.training fine-tunes from it
at any TP / PP / EP / CP layout, without optimizer or RNG state).

Top-down:
1. `inspect_hf_checkpoint` reads config.json and every safetensors header and decides the source's names
   (`table.HFLayout`), whether it has MTP tensors, and whether a stored head is a tied copy.
2. `_check_source` holds every name and shape against the table and the model's own key schema (`MegatronLayout`).
3. Every rule runs in the pipeline's lanes: its tensors are read (memory-mapped), checked for NaN / Inf, transformed,
   stored in the dtype the model keeps them in, and appended to the lane's data file. A rule that only moves bytes
   (no arithmetic, no cast: most of a release) is not run on the data: where each output row comes from is found
   (`Transform.moved_vectors`) and the records' data are copied from the source files by the kernel (`file_bytes`).
   The vision tower of a VL checkpoint is converted like the text model (its rules are in the same table).
4. The writer checks that every tensor of the model was written exactly once; only then does the directory appear,
   with the conversion record (`record.ConversionRecord`) that lets the export write the source back exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from pathlib import Path

import torch

from megatron_qwen35.checkpoint import RELEASE, TRACKER, iteration_dir, write_config
from megatron_qwen35.config import Qwen35Config, qwen35_config_from_hf
from megatron_qwen35.convert.file_bytes import laid_out, vector_ranges
from megatron_qwen35.convert.megatron_keys import MegatronLayout
from megatron_qwen35.convert.output_dir import output_directory
from megatron_qwen35.convert.pipeline import DEFAULT_LANES, Progress, deal, non_finite_note, run_in_lanes
from megatron_qwen35.convert.record import HF_TEXT_FILES, ConversionRecord
from megatron_qwen35.convert.safetensors_files import SafetensorsCheckpoint
from megatron_qwen35.convert.table import LM_HEAD, HFLayout, NamedRule, check_names, hf_shapes
from megatron_qwen35.convert.torch_dist import TorchDistWriter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclasses.dataclass
class HFSource:
    """What a Hugging Face checkpoint directory holds and how it names it."""

    cfg: Qwen35Config
    reader: SafetensorsCheckpoint
    layout: HFLayout
    mtp_in_source: bool
    texts: dict[str, str]

    def rules(self) -> list[NamedRule]:
        return self.layout.rules(self.cfg)


def inspect_hf_checkpoint(hf_dir: Path | str) -> HFSource:
    """Read config.json and every safetensors header; decide the names, MTP and the stored head."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} does not exist" if not hf_dir.exists() else f"{hf_dir} is not a directory")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    texts = {f: (hf_dir / f).read_text() for f in HF_TEXT_FILES if (hf_dir / f).is_file()}
    try:
        hf_config = json.loads(texts["config.json"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    cfg = qwen35_config_from_hf(hf_config, name=hf_dir.name)
    reader = SafetensorsCheckpoint(hf_dir)
    names = set(reader)
    layout = HFLayout.of(hf_config, names)
    mtp_in_source = any(n.startswith("mtp.") for n in names)
    if cfg.mtp_num_layers and not mtp_in_source:
        cfg = cfg.replace(mtp_num_layers=0)  # e.g. save_pretrained output: transformers drops the MTP weights
    if cfg.tie_word_embeddings and LM_HEAD in names:
        # transformers loads a stored head even where config.json ties it: a copy of the embedding keeps the model
        # tied, a different head runs untied (as transformers runs it; config.json itself is carried verbatim)
        if torch.equal(reader[LM_HEAD], reader[layout.embedding]):
            layout = dataclasses.replace(layout, stored_tied_head=True)
        else:
            cfg = cfg.replace(tie_word_embeddings=False)
    return HFSource(cfg, reader, layout, mtp_in_source, texts)


def _check_source(source: HFSource, rules: list[NamedRule], layout: MegatronLayout) -> None:
    """Every name present is mapped, every mapped name present, every shape the one config.json implies."""
    expected = {n for r in rules for n in r.hf}
    present = set(source.reader) - ({LM_HEAD} if source.layout.stored_tied_head else set())
    check_names(present, expected, side=f"Hugging Face ({source.reader.directory})")
    check_names(layout.base_names(), {n for r in rules for n in r.megatron}, side="Megatron model")
    shapes = hf_shapes(rules, layout.shape, source.cfg)
    if source.layout.stored_tied_head:
        shapes[LM_HEAD] = shapes[source.layout.embedding]
    for name, want in shapes.items():
        got = source.reader.entries[name].shape
        if got != want:
            raise ValueError(f"tensor '{name}' in {source.reader.entries[name].file} has shape {list(got)}; "
                             f"config.json implies {list(want)}")


def _record(source: HFSource, hf_names: list[str]) -> ConversionRecord:
    """What the export needs to write `source` back exactly: names, dtypes, text files, shard files."""
    entries = source.reader.entries
    by_bytes = Counter()
    for n in hf_names:
        by_bytes[entries[n].dtype] += entries[n].nbytes
    dominant = by_bytes.most_common(1)[0][0]
    every = [*hf_names, *([LM_HEAD] if source.layout.stored_tied_head else [])]
    shards = ({"index": source.reader.index_text} if source.reader.index_text is not None
              else {"file": source.reader.files[0]} if len(source.reader.files) == 1 else None)
    exceptions = {n: entries[n].dtype for n in every if entries[n].dtype != dominant}
    return ConversionRecord(source.layout, dominant, exceptions, source.texts, shards, source.mtp_in_source)


def qwen35_hf_to_megatron(hf_dir: Path | str, out_dir: Path | str, *, dtype: torch.dtype | str | None = None,
                          overwrite: bool = False, progress: bool = True, lanes: int = DEFAULT_LANES,
                          adapter: Path | str | None = None) -> Path:
    """Convert a Hugging Face Qwen3.5 checkpoint directory into a megatron_qwen35 torch_dist checkpoint.

    `dtype` (None: the source's own, tensor by tensor) casts every weight; the parameters the model keeps in fp32
    (A_log, the GDN output norm) stay fp32 under 16-bit weights. `lanes` threads convert at once. `adapter`: a
    Hugging Face PEFT LoRA adapter of this model, written beside the base as a LoRA checkpoint (a LoRA run with the
    adapter's settings trains on from it; load_model generates with it). Returns `out_dir`, which appears only once
    everything is written.
    """
    from megatron_qwen35.lora.peft_format import from_peft, read_peft_adapter

    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = inspect_hf_checkpoint(hf_dir)
    lora, peft_tensors = read_peft_adapter(adapter) if adapter is not None else (None, {})
    rules = source.rules()
    keys = MegatronLayout(source.cfg, lora=lora)
    _check_source(source, rules, keys)
    record = _record(source, [n for r in rules for n in r.hf])
    cfg, reader = source.cfg, source.reader
    try:
        adapters = from_peft(peft_tensors, cfg, {n: keys.shape(n) for n in keys.lora_names},
                             hf_prefix=source.layout.prefix) if lora is not None else {}
    except ValueError as e:
        raise ValueError(f"{adapter}: {e}") from None

    def convert(rule: NamedRule, lane: int, writer: TorchDistWriter, bar: Progress) -> list[str]:
        inputs = [reader[n] for n in rule.hf]  # memory-mapped
        notes = [note for n, t in zip(rule.hf, inputs, strict=True)
                 if (note := non_finite_note(n, t, reader.directory))]
        data = target or functools.reduce(torch.promote_types, [t.dtype for t in inputs])
        moved = None
        if all(t.dtype == data for t in inputs) and all(keys.stored_dtype(n, data) == data for n in rule.megatron):
            moved = rule.transform.moved_vectors("to_megatron", [t.shape for t in inputs], cfg)
        if moved is not None:  # the bytes only move: copied from the source files, never through memory
            files = [[reader.file_range(n)] for n in rule.hf]
            vector_bytes = inputs[0].shape[-1] * data.itemsize
            for name, (shape, runs) in zip(rule.megatron, moved, strict=True):
                placeholder = torch.empty(shape, dtype=data)  # never filled: every chunk is copied from the files
                source = laid_out(vector_ranges(runs, files, vector_bytes), placeholder)
                keys.write(writer, name, placeholder, file=lane, source=source, placeholder=True)
        else:
            work = rule.transform.work_dtype(data)
            outputs = rule.transform.to_megatron([t.to(work) for t in inputs], cfg)
            if rule.transform.arithmetic:  # prove that the export gets the source back exactly
                for n, x, y in zip(rule.hf, inputs, rule.transform.to_hf(outputs, cfg), strict=True):
                    if not torch.equal(y.to(x.dtype), x):
                        notes.append(f"'{n}': the transform does not invert exactly in {work}; the export will "
                                     "differ in the last bit")
            for name, tensor in zip(rule.megatron, outputs, strict=True):
                stored = torch.promote_types(keys.stored_dtype(name, data), work if rule.transform.arithmetic else data)
                keys.write(writer, name, tensor.to(stored), file=lane)
        bar.update(sum(reader.entries[n].nbytes for n in rule.hf))
        return notes

    costs = [2 * sum(reader.entries[n].nbytes for n in r.hf) for r in rules]
    with output_directory(out_dir, overwrite=overwrite, inputs=[hf_dir, *([adapter] if adapter else [])]) as tmp:
        bar = Progress(reader.nbytes, f"HF -> Megatron {Path(hf_dir).name}", enabled=progress)
        writer = TorchDistWriter(iteration_dir(tmp, RELEASE), files=len(deal(costs, lanes)))
        try:
            run_in_lanes(rules, costs, lambda rule, lane: convert(rule, lane, writer, bar), lanes=lanes)
            for name, tensor in adapters.items():
                keys.write(writer, name, tensor.to(target or tensor.dtype).contiguous())
            keys.write_objects(writer, iteration=0)
            writer.finish(expected=keys.checkpoint_shapes())  # every tensor of the model, each once, or no output
        except BaseException:
            writer.abort()
            raise
        if source.layout.stored_tied_head:
            bar.update(reader.entries[LM_HEAD].nbytes)
        bar.close()
        write_config(tmp, cfg, record.to_metadata() | ({"lora": lora.to_record()} if lora is not None else {}))
        (tmp / TRACKER).write_text(f"{RELEASE}\n")  # last: marks the checkpoint complete
    return Path(out_dir)
