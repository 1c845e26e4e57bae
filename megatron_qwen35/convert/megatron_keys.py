"""The Megatron side's key schema, asked of the model itself: which checkpoint keys each table tensor is saved under,
with which shapes, sections and dtypes.

Nothing here is re-derived: `MegatronLayout` builds the model on the meta device at TP=1 (in a one-rank world of
its own, `runtime.one_rank_world`: no process group is left behind) and reads its own `sharded_state_dict`, so a
converted checkpoint is exactly what `save_checkpoint` of that model writes, and loads at any TP / EP / PP layout. A
factory entry (a fused projection saved as named sections, GLU halves) is built and merged by megatron's own
functions.

The model is built in bf16, so the parameters it keeps in fp32 whatever the precision (Gated DeltaNet's A_log and
output-norm weight, `layers/gated_delta_net.FP32_PARAMETERS`) show up as fp32 here: the converter stores them so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.file_bytes import FileBytes, FileRange
from megatron_qwen35.convert.torch_dist import TorchDistReader, TorchDistWriter

HALF_DTYPES = (torch.bfloat16, torch.float16)


def _tile_in_order(views: list[ShardedTensor], whole: torch.Tensor) -> bool:
    """Do the sections' tensors lie in `whole` one after another, contiguous, covering it exactly?"""
    base, itemsize, at = whole.data_ptr(), whole.element_size(), 0
    for sh in views:
        t = sh.data
        if not t.is_contiguous() or t.dtype != whole.dtype or t.data_ptr() != base + at * itemsize:
            return False
        at += t.numel()
    return at == whole.numel()


class MegatronLayout:
    """For each table name, what the TP=1 model's `sharded_state_dict` holds (a ShardedTensor, or a factory that
    splits the tensor into named sections), plus its ShardedObjects. Built on the meta device: no weights. With
    `lora` (lora.LoRASettings), the model carries its adapters, named `{linear}.lora.A_{part}` / `.lora.B_{i}`."""

    def __init__(self, cfg: Qwen35Config, lora=None):
        from megatron_qwen35.config import qwen35_transformer_config
        from megatron_qwen35.convert.names import checkpoint_names
        from megatron_qwen35.provider import qwen35_gpt_model
        from megatron_qwen35.runtime import one_rank_world

        # No initialisation: on the meta device it only costs time (most of the build for 512 experts).
        transformer_config = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, perform_initialization=False)
        with one_rank_world():  # a one-rank build (conversion is parallelism-agnostic), leaving no process group
            with torch.device("meta"):
                model = qwen35_gpt_model(cfg, transformer_config, backend="local")
                if lora is not None:
                    from megatron_qwen35.lora import apply_lora

                    apply_lora(model, cfg, lora)
            sharded = model.sharded_state_dict()
        names = checkpoint_names(model)
        self.entries: dict[str, ShardedTensor | ShardedTensorFactory] = {}
        self.objects: list[ShardedObject] = []
        for sd_name, entry in sharded.items():
            if isinstance(entry, ShardedObject):
                self.objects.append(entry)
            elif isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                self.entries[names[sd_name]] = entry
            else:
                raise TypeError(f"unexpected {type(entry).__name__} '{sd_name}' in the model's sharded_state_dict")
        self.fp32_names = {name for name, e in self.entries.items() if e.data.dtype == torch.float32}
        self.lora_names = {name for name in self.entries if ".lora." in name}  # the adapters' (lora/peft_format.py)

    def base_names(self) -> set[str]:
        """The model's own tensors (what the conversion table maps), without any adapter's."""
        return set(self.entries) - self.lora_names

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries[name]
        return tuple(entry.local_shape if isinstance(entry, ShardedTensor) else entry.data.shape)

    def stored_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype the checkpoint keeps table tensor `name` in when the weights are `dtype`: the model's own
        fp32 parameters stay fp32 under 16-bit weights, every other tensor is `dtype`."""
        return torch.float32 if name in self.fp32_names and dtype in HALF_DTYPES else dtype

    def _sharded_tensors(self, name: str, data: torch.Tensor):
        """The ShardedTensors that checkpoint table tensor `name` (factories split it into sections)."""
        entry = self.entries[name]
        if isinstance(entry, ShardedTensor):
            return dataclasses.replace(entry, data=data, dtype=data.dtype)
        return dataclasses.replace(entry, data=data).build()

    def _flat_sharded_tensors(self, name: str, data: torch.Tensor) -> list[ShardedTensor]:
        built = self._sharded_tensors(name, data)
        return [built] if isinstance(built, ShardedTensor) else list(nested_values(built))

    def _meta(self, name: str) -> torch.Tensor:
        return torch.empty(self.shape(name), device="meta")

    def write(self, writer: TorchDistWriter, name: str, tensor: torch.Tensor, *, file: int = 0,
              source: Sequence[FileBytes] = (), placeholder: bool = False) -> None:
        """Table tensor `name` as the model's chunks (`source`: the file bytes its memory stands for, copied from
        the files instead; `placeholder`: its memory was never filled; see `TorchDistWriter.write_chunk`)."""
        if tuple(tensor.shape) != self.shape(name):
            raise ValueError(f"'{name}' has shape {list(tensor.shape)}; the model needs {list(self.shape(name))}")
        for sh in self._flat_sharded_tensors(name, tensor):
            if sh.flattened_range is not None:
                # The TP=1 model built for conversion never flattens (only the distributed optimizer does).
                raise ValueError(f"cannot write '{sh.key}': the model's sharded state holds it flattened")
            chunk = sh.data.reshape((1,) * sh.prepend_axis_num + tuple(sh.data.shape))  # expert axis etc.
            writer.write_chunk(sh.key, chunk, global_shape=sh.global_shape, offsets=sh.global_offset, file=file,
                               source=source, placeholder=placeholder)

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
        """Table tensor `name` from a torch_dist checkpoint, reading only its own chunks.

        A factory's sections are read straight into their views of the result when they tile it in order (the GLU
        halves and the GDN in_proj sections, which megatron merges by concatenation), so no merge copy is made;
        any other factory goes through its own merge_fn."""
        sections = self._flat_sharded_tensors(name, self._meta(name))
        out = torch.empty(self.shape(name), dtype=reader.dtype(sections[0].key))
        built = self._sharded_tensors(name, out)
        if isinstance(built, ShardedTensor):
            return self._read_one(reader, built, into=out)
        views = list(nested_values(built))
        if _tile_in_order(views, out):
            for sh in views:
                self._read_one(reader, sh, into=sh.data)
            return out
        loaded = dict_list_map_outplace(lambda sh: self._read_one(reader, sh), built)
        return self.entries[name].merge_fn(loaded)

    def file_ranges(self, reader: TorchDistReader, name: str) -> list[FileRange] | None:
        """The file ranges that hold table tensor `name`'s bytes in order (to copy them file to file), when its
        sections tile it in order and each is stored as plain bytes in records that tile it in order (what this
        converter writes, and save_checkpoint at any TP / EP layout where the split is along the leading dimension);
        else None."""
        placeholder = torch.empty(self.shape(name), dtype=self.checkpoint_dtype(reader, name))  # addresses only
        views = self._flat_sharded_tensors(name, placeholder)
        if not _tile_in_order(views, placeholder):
            return None
        ranges = []
        for sh in views:
            found = reader.file_ranges(sh.key, sh.global_offset, (1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            if found is None:
                return None
            ranges += found
        return ranges

    def checkpoint_dtype(self, reader: TorchDistReader, name: str) -> torch.dtype:
        """The dtype a torch_dist checkpoint holds table tensor `name` in (that of its first section)."""
        return reader.dtype(self._flat_sharded_tensors(name, self._meta(name))[0].key)

    @staticmethod
    def _read_one(reader: TorchDistReader, sh: ShardedTensor, into: torch.Tensor | None = None) -> torch.Tensor:
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        out = into.view(shape) if into is not None else None
        return reader.read(sh.key, sh.global_offset, shape, out=out).reshape(sh.local_shape)

    def checkpoint_shapes(self, names=None) -> dict[str, tuple[int, ...]]:
        """{checkpoint key: global shape} of every tensor this model saves (of table tensors `names` where given)."""
        out = {}
        for name in self.entries if names is None else sorted(names):
            for sh in self._flat_sharded_tensors(name, self._meta(name)):
                out[sh.key] = tuple(sh.global_shape)
        return out
