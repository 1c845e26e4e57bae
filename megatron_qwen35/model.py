"""Qwen3.5's text model: megatron-core's GPTModel and what a Qwen3.5 run asks of it beyond that (the VL model,
vl_model.py, extends this class)."""

from __future__ import annotations

import contextlib

from megatron.core.models.gpt import GPTModel


class Qwen35GPTModel(GPTModel):
    """GPTModel, plus
    - `hide_loss_modules`: the hook megatron.training enters while it builds the state dict it loads from a
      --finetune checkpoint. A checkpoint without MTP weights (transformers' save_pretrained drops them) then loads,
      the MTP layer keeping its initialisation; the launch check decides (training/checkpoint_check.py) and
      model_provider sets `mtp_absent_from_load`. Saving always includes the MTP layer. Likewise the LoRA adapters
      of a run that starts them from a checkpoint without any (`lora_absent_from_load`; lora/adapter.py): the base
      loads, the adapters keep peft's initialisation.
    - the padding mask of packed sequences (True at padding: kept out of the MoE router's counts and aux loss) in
      this rank's sequence-parallel slice on every stage: megatron slices it only where it embeds the tokens itself,
      not where the VL model hands in its decoder input nor on later pipeline stages."""

    mtp_absent_from_load = False
    lora_absent_from_load = False

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args,
                padding_mask=None, **kwargs):
        if (padding_mask is not None and self.config.sequence_parallel
                and not (self.pre_process and decoder_input is None)):
            tp = self.pg_collection.tp
            padding_mask = padding_mask.t().chunk(tp.size(), dim=0)[tp.rank()].t().contiguous()  # [b, s / tp]
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args,
                               padding_mask=padding_mask, **kwargs)

    @contextlib.contextmanager
    def hide_loss_modules(self):
        from megatron_qwen35.lora.adapter import hidden_adapters

        hidden = self._modules.pop("mtp", None) if self.mtp_absent_from_load else None
        try:
            with hidden_adapters(self) if self.lora_absent_from_load else contextlib.nullcontext():
                yield
        finally:
            if hidden is not None:
                self._modules["mtp"] = hidden


__all__ = ["Qwen35GPTModel"]
