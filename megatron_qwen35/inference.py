"""Single-process loading for evaluation and tests: `load_model(checkpoint_dir)` -> logits on CPU.

The checkpoint directory (written by this project's training or converters) carries the model config, so nothing
else is needed. A one-process gloo group is set up when none exists; in an already initialised multi-rank job
(TP/EP), the model is built for the current layout and the logits are gathered over tensor parallelism.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_qwen35.checkpoint import load_checkpoint, read_config
from megatron_qwen35.config import Qwen35Config, qwen35_transformer_config
from megatron_qwen35.parallel_layout import check_parallel_layout
from megatron_qwen35.provider import qwen35_gpt_model
from megatron_qwen35.runtime import initialize_parallel


class Qwen35CausalLM(torch.nn.Module):
    """`model(input_ids [b, s])` -> float logits [b, s, vocab], positions 0..s-1 (no padding, no packing)."""

    def __init__(self, gpt_model: torch.nn.Module, cfg: Qwen35Config):
        super().__init__()
        self.model = gpt_model
        self.config = cfg

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        logits = self.model(input_ids, positions, None)  # [b, s, vocab / tp]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits.float()


def load_model(checkpoint_dir: Path | str, *, backend: str | None = None, **config_overrides) -> Qwen35CausalLM:
    """The model saved in `checkpoint_dir`, in eval mode; `config_overrides` go to TransformerConfig."""
    cfg, _ = read_config(checkpoint_dir)
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel()
    overrides = dict(params_dtype=torch.float32,
                     tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                     expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
                     sequence_parallel=False)
    overrides.update(config_overrides)
    check_parallel_layout(cfg, tensor_parallel=overrides["tensor_model_parallel_size"],
                        expert_parallel=overrides["expert_model_parallel_size"])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("load_model runs the whole model on each rank; use pipeline_parallel=1")
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, **overrides), backend=backend)
    load_checkpoint(model, checkpoint_dir)
    return Qwen35CausalLM(model, cfg).eval()
