"""Qwen3.5's text model: megatron-core's GPTModel and what a Qwen3.5 run asks of it beyond that (the VL model,
vl_model.py, extends this class)."""

from __future__ import annotations

import contextlib

from megatron.core.models.gpt import GPTModel


class Qwen35GPTModel(GPTModel):
    """GPTModel, plus `hide_loss_modules`: the hook megatron.training enters while it builds the state dict it
    loads from a --finetune checkpoint. A checkpoint without MTP weights (transformers' save_pretrained drops them)
    then loads, the MTP layer keeping its initialisation; the launch check decides (training/checkpoint_check.py)
    and model_provider sets `mtp_absent_from_load`. Saving always includes the MTP layer."""

    mtp_absent_from_load = False

    @contextlib.contextmanager
    def hide_loss_modules(self):
        hidden = self._modules.pop("mtp", None) if self.mtp_absent_from_load else None
        try:
            yield
        finally:
            if hidden is not None:
                self._modules["mtp"] = hidden


__all__ = ["Qwen35GPTModel"]
