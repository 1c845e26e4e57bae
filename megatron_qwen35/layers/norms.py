"""RMSNorm for the local (plain PyTorch) backend: zero-centred gamma and sequence parallelism.

megatron-core's local norm (`WrappedTorchNorm`) refuses both, and Qwen3.5 needs both: every decoder, final, q/k and
MTP norm is Hugging Face's `(1 + w)` RMSNorm, and layouts with sequence parallelism must mark the weight so that
megatron's `finalize_model_grads` sums its gradient over the tensor-parallel group (each rank saw only its slice
of the sequence). Transformer Engine's `TENorm` does the same on GPUs, so the two backends share one checkpoint.

That checkpoint also carries TE's `_extra_state` wherever TE has a module: `Qwen35RMSNorm` saves a None one (a
standalone TE norm saves one; megatron's local linears do the same for TE's linears), and
`Qwen35FusedInputRMSNorm` saves none (TE fuses that norm into the following linear, whose `_extra_state` is the
linear's own).
"""

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn


class Qwen35RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 like transformers' Qwen3_5RMSNorm.

    With `config.layernorm_zero_centered_gamma` the stored weight is w and the scale is (1 + w), which is exactly
    Hugging Face's zero-centred norm; otherwise the scale is the weight itself.
    Signature matches megatron's norm builders: (config, hidden_size, eps).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Megatron sums the grads of params marked sequence_parallel over TP (each rank saw part of the sequence).
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float() + 1.0 if self.zero_centered_gamma else self.weight.float()
        return (y * scale).type_as(x)

    def get_extra_state(self) -> None:
        """None, saved as `_extra_state`: Transformer Engine's standalone norm (a TE op) saves an `_extra_state`
        and asks for it on load, so a checkpoint written with this norm must hold one (TE accepts None)."""
        return None

    def set_extra_state(self, state: Any) -> None:
        """Ignore it: None from this norm, or what TE's norm saved (its op's fp8 scaling metadata), which this norm
        has no use for: it computes in fp32 and never quantizes."""

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


class Qwen35FusedInputRMSNorm(Qwen35RMSNorm):
    """Qwen35RMSNorm in a slot that Transformer Engine fuses into the next linear (`TELayerNormColumnParallelLinear`):
    a layer's input norm, and a dense layer's pre-MLP norm. Differs in saving no `_extra_state`.

    The layer checkpoints this norm's weight as the linear's `layer_norm_weight` (its `sharded_state_dict_keys_map`);
    the fused TE module has one `_extra_state`, which the local linear already saves. An `_extra_state` here would
    become `<linear>.layer_norm__extra_state`, a key no TE checkpoint has, and the local model could not load one.
    """

    # torch saves and loads `_extra_state` only for classes that override these two; take nn.Module's back.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state
