"""RMSNorm for the local (plain PyTorch) backend: zero-centred gamma and sequence parallelism.

megatron-core's local norm (`WrappedTorchNorm`) refuses both, and Qwen3.5 needs both: every decoder, final, q/k and
MTP norm is Hugging Face's `(1 + w)` RMSNorm, and layouts with sequence parallelism must mark the weight so that
megatron's `finalize_model_grads` sums its gradient over the tensor-parallel group (each rank saw only its slice
of the sequence). Transformer Engine's `TENorm` does the same on GPUs, so the two backends share one checkpoint.
"""

import torch
from torch import nn

from megatron.core.transformer import TransformerConfig


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
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float() + 1.0 if self.zero_centered_gamma else self.weight.float()
        return (y * scale).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"
