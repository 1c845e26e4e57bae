"""The conversion record: what an import keeps of its Hugging Face source so that the export writes it back exactly.

It lives in the "metadata" of the checkpoint's qwen35_config.json and travels with the checkpoint through training
(`training/launch.py` copies it into --save). A checkpoint without one (trained from scratch) exports the way
transformers' save_pretrained writes: `ConversionRecord.absent()`.

The JSON keys are a file format: checkpoints converted by earlier versions carry the same keys, and new fields are
optional on reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_qwen35.convert.table import TEXT_ONLY_PREFIX, HFLayout

HF_TEXT_FILES = ("config.json", "generation_config.json")  # carried verbatim


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}' in checkpoint metadata")
    return dtype


@dataclass(frozen=True)
class ConversionRecord:
    """The source's names (`layout`), dtypes (`source_dtype` and the tensors that differ from it), text files,
    shard files (its index verbatim, or the one file's name), and whether it had MTP tensors."""

    layout: HFLayout = HFLayout()
    source_dtype: torch.dtype | None = None  # None: no source; each tensor as the Megatron checkpoint stores it
    hf_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    hf_files: dict[str, str] = field(default_factory=dict)
    shards: dict[str, str] | None = None  # {"index": index JSON text} or {"file": the one safetensors file}
    mtp_in_source: bool = True

    @classmethod
    def absent(cls) -> ConversionRecord:
        return cls()

    def export_layout(self, cfg) -> HFLayout:
        """The names an export writes: the converted source's, else those transformers' save_pretrained writes."""
        return self.layout if self.source_dtype is not None else HFLayout.saved_by_transformers(cfg)

    def dtype_of(self, hf_name: str) -> torch.dtype | None:
        return self.hf_dtypes.get(hf_name, self.source_dtype)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "source": "huggingface",
            "hf_prefix": self.layout.prefix,
            "expert_layout": {"decoder": self.layout.decoder_experts, "mtp": self.layout.mtp_experts},
            "mtp_in_source": self.mtp_in_source,
            "tied_lm_head_in_source": self.layout.stored_tied_head,
            "source_dtype": dtype_name(self.source_dtype),
            "hf_dtypes": {n: dtype_name(d) for n, d in self.hf_dtypes.items()},
            "hf_files": self.hf_files,
            "hf_shards": self.shards,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], *, source: str | Path = "the conversion record"
                      ) -> ConversionRecord:
        """The record in a checkpoint's metadata (`source` names the file, for errors). Every file name in it is
        data: the text files are the ones an import carries (HF_TEXT_FILES) and each shard a plain name, else a
        ValueError before anything is read or written."""
        if metadata.get("source") != "huggingface":
            return cls.absent()
        try:  # a field of the wrong kind is a damaged record, named, not a TypeError deep in an export
            return cls._from_huggingface_metadata(metadata, source)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: a damaged conversion record ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_huggingface_metadata(cls, metadata: dict[str, Any], source: str | Path) -> ConversionRecord:
        experts = metadata.get("expert_layout") or {}
        layout = HFLayout(metadata.get("hf_prefix", TEXT_ONLY_PREFIX), experts.get("decoder", "per_expert"),
                          experts.get("mtp", "per_expert"), bool(metadata.get("tied_lm_head_in_source")))
        hf_files = dict(metadata.get("hf_files") or {})
        for name, text in hf_files.items():
            if name not in HF_TEXT_FILES or not isinstance(text, str):
                raise ValueError(f"{source} records the file {name!r} among the Hugging Face side files; an import "
                                 f"carries only {list(HF_TEXT_FILES)} (a crafted or damaged record)")
        shards = metadata.get("hf_shards")
        if shards is not None:
            _check_shards(shards, source=f"{source} (hf_shards)")
        return cls(layout, dtype_from_name(metadata["source_dtype"]),
                   {n: dtype_from_name(d) for n, d in (metadata.get("hf_dtypes") or {}).items()},
                   hf_files, shards, bool(metadata.get("mtp_in_source", True)))


def _check_shards(shards: Any, *, source: str) -> None:
    """A recorded shard layout: {"index": the index's text} or {"file": one plain file name}."""
    from megatron_qwen35.convert.safetensors_files import index_weight_map, shard_file_name

    if not isinstance(shards, dict) or len(shards) != 1 or not isinstance(next(iter(shards.values())), str):
        raise ValueError(f"{source}: expected {{'index': text}} or {{'file': name}}, found {shards!r:.200}")
    if "file" in shards:
        shard_file_name(shards["file"], source=source)
    elif "index" in shards:
        index_weight_map(shards["index"], source=source)
    else:
        raise ValueError(f"{source}: expected {{'index': text}} or {{'file': name}}, found keys {sorted(shards)}")
