"""The conversion record: what an import keeps of its Hugging Face source so that the export writes it back exactly.

It lives in the "metadata" of the checkpoint's qwen35_config.json and travels with the checkpoint through training
(`training/launch.py` copies it into --save). A checkpoint without one (trained from scratch) exports the way
transformers' save_pretrained writes: `ConversionRecord.absent()`.

The JSON keys are a file format: checkpoints converted by earlier versions carry the same keys, and new fields are
optional on reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    def from_metadata(cls, metadata: dict[str, Any]) -> ConversionRecord:
        if metadata.get("source") != "huggingface":
            return cls.absent()
        experts = metadata.get("expert_layout") or {}
        layout = HFLayout(metadata.get("hf_prefix", TEXT_ONLY_PREFIX), experts.get("decoder", "per_expert"),
                          experts.get("mtp", "per_expert"), bool(metadata.get("tied_lm_head_in_source")))
        return cls(layout, dtype_from_name(metadata["source_dtype"]),
                   {n: dtype_from_name(d) for n, d in (metadata.get("hf_dtypes") or {}).items()},
                   dict(metadata.get("hf_files") or {}), metadata.get("hf_shards"),
                   bool(metadata.get("mtp_in_source", True)))
