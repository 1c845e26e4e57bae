"""Hugging Face Qwen3.5 checkpoint -> megatron torch_dist checkpoint, streamed one rule of the table at a time.

The Megatron side's keys, shapes and fused-section splits are not re-derived here: `MegatronLayout` builds the model
on the meta device at TP=1 and asks its own `sharded_state_dict`, so the written checkpoint is exactly what
`save_checkpoint` of that model would write, and any TP/EP layout loads it. The conversion records how the source
was laid out (HF prefix, expert layout of decoder and MTP, per-tensor dtypes, config.json / generation_config.json
verbatim) in qwen35_config.json's "metadata", so `megatron_to_hf` reproduces the source byte for byte.
Vision tensors (`model.visual.*`) ride along verbatim in `DIR/vision/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_qwen35.checkpoint import RELEASE, TRACKER, iteration_dir, write_config
from megatron_qwen35.config import MULTIMODAL_MODEL_TYPES, Qwen35Config, qwen35_config_from_hf
from megatron_qwen35.convert.io import (
    PlannedTensor,
    Progress,
    SafetensorsCheckpoint,
    SafetensorsShardWriter,
    TorchDistReader,
    TorchDistWriter,
    output_directory,
    warn_if_not_finite,
)
from megatron_qwen35.convert.table import (
    MULTIMODAL_PREFIX,
    TEXT_ONLY_PREFIX,
    NamedRule,
    check_names,
    qwen35_rules,
)
from megatron_qwen35.convert.transforms import PLUS_ONE

VISION_PREFIX = "model.visual."
VISION_DIR = "vision"  # beside iter_*/: the multimodal checkpoint's ViT tensors, verbatim safetensors
HF_TEXT_FILES = ("config.json", "generation_config.json")  # carried verbatim in the metadata
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}' in checkpoint metadata")
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# The rules for one source layout
# ---------------------------------------------------------------------------------------------------------------

def conversion_rules(cfg: Qwen35Config, *, hf_prefix: str, expert_layout: dict[str, str]) -> list[NamedRule]:
    """The table's rules for this model; the decoder and the MTP layer may store experts differently."""
    rules = qwen35_rules(cfg, hf_prefix=hf_prefix, expert_layout=expert_layout["decoder"], include_mtp=False)
    if cfg.mtp_num_layers:
        rules += [r for r in qwen35_rules(cfg, hf_prefix=hf_prefix, expert_layout=expert_layout["mtp"])
                  if r.megatron[0].startswith("mtp.")]
    return rules


def _expert_layout(names: set[str], layer_prefix: str) -> str:
    if f"{layer_prefix}mlp.experts.gate_up_proj" in names:
        return "packed"
    return "per_expert"  # what transformers' save_pretrained writes; a missing tensor is then named by its check


def compute_in(rule: NamedRule, dtype: torch.dtype) -> torch.dtype:
    """Arithmetic transforms run (and their Megatron tensors are stored) in fp32 when the data is 16-bit:
    (w - 1) in bf16 drops the low bits of w, and w comes back different."""
    if rule.transform is PLUS_ONE and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# The Megatron side: keys and shapes from the model's own sharded_state_dict
# ---------------------------------------------------------------------------------------------------------------

class MegatronLayout:
    """For each table name, what the TP=1 model's `sharded_state_dict` holds (a ShardedTensor or a factory that
    splits the tensor into named sections), plus its ShardedObjects. Built on the meta device: no weights."""

    def __init__(self, cfg: Qwen35Config):
        from megatron.core import parallel_state

        from megatron_qwen35.config import qwen35_transformer_config
        from megatron_qwen35.convert.model_state import table_names
        from megatron_qwen35.provider import qwen35_gpt_model
        from megatron_qwen35.runtime import initialize_parallel

        if not parallel_state.model_parallel_is_initialized():
            initialize_parallel()
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"checkpoint conversion runs in one process (TP, PP, EP = {sizes}); the converted "
                               "checkpoint loads at any layout afterwards")
        with torch.device("meta"):
            model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32),
                                     backend="local")
        names = table_names(model)
        self.entries: dict[str, ShardedTensor | ShardedTensorFactory] = {}
        self.objects: list[ShardedObject] = []
        for sd_name, entry in model.sharded_state_dict().items():
            if isinstance(entry, ShardedObject):
                self.objects.append(entry)
            elif isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                self.entries[names[sd_name]] = entry
            else:
                raise TypeError(f"unexpected {type(entry).__name__} '{sd_name}' in the model's sharded_state_dict")

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries[name]
        return tuple(entry.local_shape if isinstance(entry, ShardedTensor) else entry.data.shape)

    def _sharded_tensors(self, name: str, data: torch.Tensor):
        """The ShardedTensors that checkpoint table tensor `name` (factories split it into sections)."""
        entry = self.entries[name]
        if isinstance(entry, ShardedTensor):
            return dataclasses.replace(entry, data=data, dtype=data.dtype)
        return dataclasses.replace(entry, data=data).build()

    def _flat_sharded_tensors(self, name: str, data: torch.Tensor) -> list[ShardedTensor]:
        built = self._sharded_tensors(name, data)
        return [built] if isinstance(built, ShardedTensor) else list(nested_values(built))

    def write(self, writer: TorchDistWriter, name: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape(name):
            raise ValueError(f"'{name}' has shape {list(tensor.shape)}; the model needs {list(self.shape(name))}")
        for sh in self._flat_sharded_tensors(name, tensor):
            if sh.flattened_range is not None:
                # The TP=1 model built for conversion never flattens (only the distributed optimizer does).
                raise ValueError(f"cannot write '{sh.key}': the model's sharded state holds it flattened")
            chunk = sh.data.reshape((1,) * sh.prepend_axis_num + tuple(sh.data.shape))  # expert axis etc.
            writer.write_chunk(sh.key, chunk, global_shape=sh.global_shape, offsets=sh.global_offset)

    def write_objects(self, writer: TorchDistWriter, iteration: int) -> None:
        """ShardedObjects (modules' _extra_state) and megatron's common state, as save_checkpoint stores them."""
        for obj in self.objects:
            if torch.is_tensor(obj.data) and obj.data.is_meta:
                # Local-backend modules keep None here; a tensor (e.g. TE's fp8 metadata) has no HF source.
                raise ValueError(f"cannot write extra state '{obj.key}': it is a tensor with no Hugging Face source")
            writer.write_object(obj.unique_key, obj.data)
        common = ShardedObject("common_state", None, (1,), (0,))
        writer.write_object(common.unique_key, {"checkpoint_version": 3.0, "iteration": iteration})

    def read(self, reader: TorchDistReader, name: str) -> torch.Tensor:
        """Table tensor `name` from a torch_dist checkpoint (reading only its own chunks)."""
        meta = torch.empty(self.shape(name), device="meta")
        built = self._sharded_tensors(name, meta)
        if isinstance(built, ShardedTensor):
            return self._read_one(reader, built)
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

        loaded = dict_list_map_outplace(lambda sh: self._read_one(reader, sh), built)
        return self.entries[name].merge_fn(loaded)

    def stored_dtype(self, reader: TorchDistReader, name: str) -> torch.dtype:
        """The dtype a torch_dist checkpoint holds table tensor `name` in (that of its first section)."""
        first = self._flat_sharded_tensors(name, torch.empty(self.shape(name), device="meta"))[0]
        return reader.tensors[first.key].properties.dtype

    @staticmethod
    def _read_one(reader: TorchDistReader, sh: ShardedTensor) -> torch.Tensor:
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        return reader.read(sh.key, sh.global_offset, shape).reshape(sh.local_shape)

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """{checkpoint key: global shape} of every tensor this model saves."""
        out = {}
        for name in self.entries:
            for sh in self._flat_sharded_tensors(name, torch.empty(self.shape(name), device="meta")):
                out[sh.key] = tuple(sh.global_shape)
        return out


def hf_shapes(rules: list[NamedRule], layout: MegatronLayout, cfg: Qwen35Config) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of every tensor, by running each rule's to_hf on meta tensors of the model's shapes."""
    out = {}
    for rule in rules:
        metas = [torch.empty(layout.shape(n), device="meta") for n in rule.megatron]
        out.update({n: tuple(t.shape) for n, t in zip(rule.hf, rule.transform.to_hf(metas, cfg), strict=True)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HFSource:
    """What an HF checkpoint directory holds and how it is laid out."""

    cfg: Qwen35Config
    reader: SafetensorsCheckpoint
    hf_prefix: str
    expert_layout: dict[str, str] | None
    mtp_in_source: bool
    vision: list[str]
    tied_lm_head_in_source: bool
    texts: dict[str, str]

    def rules(self) -> list[NamedRule]:
        return conversion_rules(self.cfg, hf_prefix=self.hf_prefix,
                                expert_layout=self.expert_layout or {"decoder": "packed", "mtp": "packed"})


def inspect_hf_checkpoint(hf_dir: Path | str) -> HFSource:
    """Read config.json and every safetensors header; decide prefix, expert layouts, MTP and vision."""
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
    multimodal = hf_config.get("model_type") in MULTIMODAL_MODEL_TYPES
    prefix = MULTIMODAL_PREFIX if multimodal else TEXT_ONLY_PREFIX
    vision = sorted(n for n in names if n.startswith(VISION_PREFIX)) if multimodal else []
    mtp_in_source = any(n.startswith("mtp.") for n in names)
    if cfg.mtp_num_layers and not mtp_in_source:
        cfg = cfg.replace(mtp_num_layers=0)  # e.g. save_pretrained output: transformers drops the MTP weights
    expert_layout = None
    if cfg.is_moe:
        expert_layout = {"decoder": _expert_layout(names, f"{prefix}layers.0."),
                         "mtp": _expert_layout(names, "mtp.layers.0.")}
    tied_head = False  # some tied checkpoints store the head anyway
    if cfg.tie_word_embeddings and "lm_head.weight" in names:
        # transformers loads a stored head even where config.json ties it: a copy of the embedding keeps the model
        # tied, a different head runs untied (as transformers runs it; config.json itself is carried verbatim)
        tied_head = torch.equal(reader["lm_head.weight"], reader[f"{prefix}embed_tokens.weight"])
        if not tied_head:
            cfg = cfg.replace(tie_word_embeddings=False)
    return HFSource(cfg, reader, prefix, expert_layout, mtp_in_source, vision, tied_head, texts)


def _check_source(source: HFSource, rules: list[NamedRule], layout: MegatronLayout) -> None:
    """Every name present is mapped, every mapped name present, every shape the one config.json implies."""
    expected = {n for r in rules for n in r.hf}
    present = set(source.reader) - set(source.vision) - ({"lm_head.weight"} if source.tied_lm_head_in_source else set())
    check_names(present, expected, side=f"Hugging Face ({source.reader.directory})")
    check_names(set(layout.entries), {n for r in rules for n in r.megatron}, side="Megatron model")
    shapes = hf_shapes(rules, layout, source.cfg)
    if source.tied_lm_head_in_source:
        shapes["lm_head.weight"] = shapes[f"{source.hf_prefix}embed_tokens.weight"]
    for name, want in shapes.items():
        got = source.reader.entries[name].shape
        if got != want:
            raise ValueError(f"tensor '{name}' in {source.reader.entries[name].file} has shape {list(got)}; "
                             f"config.json implies {list(want)}")


def _dominant_dtype(source: HFSource, names: list[str]) -> torch.dtype:
    by_bytes = Counter()
    for n in names:
        by_bytes[source.reader.entries[n].dtype] += source.reader.entries[n].nbytes
    return by_bytes.most_common(1)[0][0]


def _converted(source: HFSource, rules: list[NamedRule], target: torch.dtype | None
               ) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(Megatron name, tensor, HF bytes read) for every rule, one rule in memory at a time."""
    cfg = source.cfg
    for rule in rules:
        inputs = [source.reader[n] for n in rule.hf]
        warn_if_not_finite(rule.hf, inputs, source.reader.directory)
        nbytes = sum(t.numel() * t.element_size() for t in inputs)
        work = compute_in(rule, target or functools.reduce(torch.promote_types, [t.dtype for t in inputs]))
        outputs = rule.transform.to_megatron([t.to(work) for t in inputs], cfg)
        if rule.transform is PLUS_ONE:  # the one rule that does arithmetic: prove it comes back exactly
            back = rule.transform.to_hf(outputs, cfg)
            for n, x, y in zip(rule.hf, inputs, back, strict=True):
                if not torch.equal(y.to(x.dtype), x):
                    warnings.warn(f"'{n}': (w - 1) + 1 != w in {work}; the export will differ in the last bit",
                                  stacklevel=2)
        for i, (name, tensor) in enumerate(zip(rule.megatron, outputs, strict=True)):
            yield name, tensor, nbytes if i == 0 else 0
        del inputs, outputs


def qwen35_hf_to_megatron(hf_dir: Path | str, out_dir: Path | str, *, dtype: torch.dtype | str | None = None,
                          overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face Qwen3.5 checkpoint directory into a megatron_qwen35 torch_dist checkpoint.

    `dtype` (None: the source's own, tensor by tensor) casts every weight; norm offsets stay fp32 when the data
    is 16-bit (see `compute_in`). Returns `out_dir`, which appears only once everything is written.
    """
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = inspect_hf_checkpoint(hf_dir)
    rules = source.rules()
    layout = MegatronLayout(source.cfg)
    _check_source(source, rules, layout)
    hf_names = [n for r in rules for n in r.hf]
    dominant = _dominant_dtype(source, hf_names)
    metadata: dict[str, Any] = {
        "source": "huggingface",
        "hf_prefix": source.hf_prefix,
        "expert_layout": source.expert_layout,
        "mtp_in_source": source.mtp_in_source,
        "tied_lm_head_in_source": source.tied_lm_head_in_source,
        "source_dtype": dtype_name(dominant),
        "hf_dtypes": {n: dtype_name(source.reader.entries[n].dtype) for n in hf_names
                      if source.reader.entries[n].dtype != dominant},
        "hf_files": source.texts,
        "vision": VISION_DIR if source.vision else None,
    }
    total = source.reader.nbytes
    with output_directory(out_dir, overwrite=overwrite, inputs=[hf_dir]) as tmp:
        bar = Progress(total, f"HF -> Megatron {Path(hf_dir).name}", enabled=progress)
        writer = TorchDistWriter(iteration_dir(tmp, RELEASE))  # weights only: megatron.training fine-tunes from it
        try:
            for name, tensor, nbytes in _converted(source, rules, target):
                layout.write(writer, name, tensor)
                bar.update(nbytes, tensors=1 if nbytes else 0)
            layout.write_objects(writer, iteration=0)
            writer.finish(expected=layout.checkpoint_shapes())  # every tensor of the model, each once, or no output
        except BaseException:
            writer.abort()  # let the write-behind thread stop before the temporary directory goes
            raise
        if source.vision:
            _copy_tensors(source.reader, source.vision, tmp / VISION_DIR, bar)
        if source.tied_lm_head_in_source:
            bar.update(source.reader.entries["lm_head.weight"].nbytes)
        bar.close()
        write_config(tmp, source.cfg, metadata)
        (tmp / TRACKER).write_text(f"{RELEASE}\n")  # last: marks the checkpoint complete
    return Path(out_dir)


def _copy_tensors(reader, names: list[str], directory: Path, bar: Progress | None = None) -> None:
    """Tensors verbatim into `directory` as one safetensors shard + index, streamed."""
    directory.mkdir()
    plan = [PlannedTensor(n, reader.entries[n].dtype, reader.entries[n].shape) for n in names]
    writer = SafetensorsShardWriter(directory, plan, max_shard_bytes=2**62)
    try:
        for n in names:
            t = reader[n]
            writer.write(n, t)
            if bar is not None:
                bar.update(t.numel() * t.element_size())
        writer.close()
    except BaseException:
        writer.abort()
        raise
