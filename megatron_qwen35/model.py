"""Qwen3.5's text model: megatron-core's GPTModel and what a Qwen3.5 run asks of it beyond that (the VL model,
vl_model.py, extends this class)."""

from __future__ import annotations

import contextlib
import logging

from megatron.core.models.gpt import GPTModel

# megatron-core 0.19 logs this on every GPTModel built, asking for HybridModel, which cannot hold Qwen3.5 (provider.py
# says why): the notice is megatron's plan, not something our users can act on, so our models are built without it.
GPT_MODEL_DEPRECATION_NOTICE = "GPTModel IS DEPRECATED"


def _not_the_deprecation_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(GPT_MODEL_DEPRECATION_NOTICE)


@contextlib.contextmanager
def _without_deprecation_notice():
    """megatron's GPTModel deprecation notice left out while the block runs; every other record of its logger kept."""
    logger = logging.getLogger(GPTModel.__module__)
    logger.addFilter(_not_the_deprecation_notice)  # a logger takes a plain function as a filter
    try:
        yield
    finally:
        logger.removeFilter(_not_the_deprecation_notice)


class Qwen35GPTModel(GPTModel):
    """GPTModel, plus
    - `hide_loss_modules`: the hook megatron.training enters while it builds the state dict it loads from a
      --finetune checkpoint. A checkpoint without MTP weights (transformers' save_pretrained drops them) then loads,
      the MTP layer keeping its initialisation; the launch check decides (training/checkpoint_check.py) and
      model_provider sets `mtp_absent_from_load`. Saving always includes the MTP layer. Likewise the LoRA adapters
      of a run that starts them from a checkpoint without any (`lora_absent_from_load`; lora/adapter.py): the base
      loads, the adapters keep peft's initialisation.
    - `checkpoint_adapters_only`: a LoRA run's checkpoints hold its adapters and not the frozen base (lora/base.py):
      the model's sharded state dict is then the adapters' entries, which megatron.training saves and loads; the base
      loads through `base_checkpoint_view` (the model without adapters, every base entry).
    - the padding mask of packed sequences (True at padding: kept out of the MoE router's counts and aux loss) in
      this rank's sequence-parallel slice on every stage: megatron slices it only where it embeds the tokens itself,
      not where the VL model hands in its decoder input nor on later pipeline stages."""

    mtp_absent_from_load = False
    lora_absent_from_load = False
    checkpoint_adapters_only = False

    def __init__(self, *args, **kwargs):
        with _without_deprecation_notice():
            super().__init__(*args, **kwargs)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args,
                padding_mask=None, **kwargs):
        if (padding_mask is not None and self.config.sequence_parallel
                and not (self.pre_process and decoder_input is None)):
            tp = self.pg_collection.tp
            padding_mask = padding_mask.t().chunk(tp.size(), dim=0)[tp.rank()].t().contiguous()  # [b, s / tp]
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args,
                               padding_mask=padding_mask, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        entries = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.checkpoint_adapters_only:
            entries = {k: v for k, v in entries.items() if ".lora." in k}
        return entries

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """With `checkpoint_adapters_only`, a strict load wants the adapters (or, from a checkpoint without any, every
        base entry): megatron.training loads the state dict of the entries it asked for."""
        if not (strict and self.checkpoint_adapters_only):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        wanted = not self.lora_absent_from_load  # the adapters are what loads, else the base
        missing = [k for k in result.missing_keys if (".lora." in k) == wanted]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"the state dict lacks {missing[:5]} and has unexpected {result.unexpected_keys[:5]}")
        return result

    @contextlib.contextmanager
    def base_checkpoint_view(self):
        """The model as its base checkpoint holds it: without adapters, every entry in its sharded state dict."""
        from megatron_qwen35.lora.adapter import hidden_adapters

        adapters_only, self.checkpoint_adapters_only = self.checkpoint_adapters_only, False
        try:
            with hidden_adapters(self):
                yield
        finally:
            self.checkpoint_adapters_only = adapters_only

    @contextlib.contextmanager
    def hide_loss_modules(self):
        hidden = self._modules.pop("mtp", None) if self.mtp_absent_from_load else None
        try:
            with self.base_checkpoint_view() if self.lora_absent_from_load else contextlib.nullcontext():
                yield
        finally:
            if hidden is not None:
                self._modules["mtp"] = hidden


__all__ = ["Qwen35GPTModel"]
