"""transformers' Qwen3.5 as the CPU reference (tests, demo, conversion parity): tiny random models.

When `fla` is importable, transformers binds FLA's Triton kernels at import time, which fail on a CPU. The
pure-PyTorch originals stay reachable as `__wrapped__`; `modeling` puts them back on the modeling modules, for the
whole process (what a reference run wants; training, conversion and generation never import this module), and
`reference_model` seeds torch's global RNG for transformers' own initialisation.
"""

import torch

_KERNEL_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                     "causal_conv1d_fn", "causal_conv1d_update")


def _torch_paths(module):
    for name in _KERNEL_FUNCTIONS:
        fn = getattr(module, name)
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        setattr(module, name, fn)
    return module


def modeling(is_moe: bool):
    """transformers' modeling module for Qwen3.5 (dense or MoE), on its pure-PyTorch kernels."""
    if is_moe:
        import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as m
    else:
        import transformers.models.qwen3_5.modeling_qwen3_5 as m
    return _torch_paths(m)


def reference_config(cfg):
    from transformers import AutoConfig

    from megatron_qwen35.config import qwen35_config_to_hf

    hf = qwen35_config_to_hf(cfg)
    model_type = hf.pop("model_type")
    hf.pop("architectures")
    return AutoConfig.for_model(model_type, **hf)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, and norms, A_log and dt_bias far from their init, so a missed +1 or swapped head shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "linear_attn.norm" in name else 0.0))
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p.shape[-1], 1) ** 0.5))
    return model


def reference_model(cfg, seed: int = 0):
    """transformers' model for `cfg`, fp32, eval mode, random weights: Qwen3_5(Moe)ForConditionalGeneration when
    it has a vision tower, else Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM."""
    m = modeling(cfg.is_moe)
    kind = "ForConditionalGeneration" if cfg.vision is not None else "ForCausalLM"
    cls = getattr(m, f"Qwen3_5Moe{kind}" if cfg.is_moe else f"Qwen3_5{kind}")
    torch.manual_seed(seed)
    model = cls(reference_config(cfg)).float().eval()
    return randomize_(model, seed)


def use_torch_paths() -> None:
    """Put transformers' Qwen3.5 modeling modules (dense and MoE) on their pure-PyTorch kernels."""
    modeling(False)
    modeling(True)


def torch_chunk_gated_delta_rule():
    """transformers' pure-PyTorch chunked gated delta rule (the baseline of the GDN tests and benchmark)."""
    return modeling(False).torch_chunk_gated_delta_rule
