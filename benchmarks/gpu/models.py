"""The models the checks build, copy and run: presets, a model on DEVICE for a backend and dtype, the fp32 reference
with weights a precision comparison can say something about, a copy through a saved checkpoint, a forward + backward.

The backend ("te" or "local") and the device are always named here, never probed by the package: the TransformerConfig
gets both (`qwen35_transformer_config(cfg, backend=, device=)`), and so does the build (`qwen35_gpt_model(backend=)`,
which raises where "te" is chosen and Transformer Engine does not import). The runner applies the run-time patches
before any build (runtime.apply_runtime_patches).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile

import torch

from .batches import packed_token_batch, token_batch
from .environment import DEVICE

# The VL token ids a ViT swapped in from another preset keeps from the text model's preset.
VL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def preset(name: str):
    """A preset of megatron_qwen35.config, or one of the checks' own slices of a public size."""
    from megatron_qwen35.config import FULL_ATTENTION, LINEAR_ATTENTION, qwen35_preset

    if name == "9b-2layers":  # 9b's layer shapes (dk 128, head_dim 256, grouped heads) at a size cheap to save
        return qwen35_preset("9b").replace(num_layers=2, layer_types=(LINEAR_ATTENTION, FULL_ATTENTION),
                                           mtp_num_layers=0, vocab_size=32768, name=name)
    if name == "tiny-vl-27b-vit":  # 27b's ViT (1152 wide, 16 heads of 72, MLP 4304) at depth 2 on tiny-vl's text
        tiny = qwen35_preset("tiny-vl")
        vit = dataclasses.replace(qwen35_preset("27b").vision, depth=2, out_hidden_size=tiny.hidden_size,
                                  **{k: getattr(tiny.vision, k) for k in VL_TOKEN_KEYS})
        return tiny.replace(vision=vit, name=name)
    return qwen35_preset(name)


def best_backend() -> str:
    """Transformer Engine where it runs (CUDA, and it imports), else local: the backend a bf16 run would use."""
    from megatron_qwen35.runtime import transformer_engine_available

    return "te" if DEVICE.type == "cuda" and transformer_engine_available() else "local"


def transformer_config(cfg, *, dtype: torch.dtype, backend: str, **config):
    """megatron's TransformerConfig for `cfg` on `backend` and DEVICE in `dtype`; `config` overrides its fields."""
    from megatron_qwen35.config import qwen35_transformer_config

    return qwen35_transformer_config(cfg, backend=backend, device=DEVICE.type, params_dtype=dtype,
                                     bf16=dtype == torch.bfloat16, **config)


def build(cfg, *, dtype: torch.dtype, backend: str, **config):
    """A fresh model on DEVICE; `config` overrides TransformerConfig fields."""
    from megatron_qwen35.provider import qwen35_gpt_model

    tc = transformer_config(cfg, dtype=dtype, backend=backend, **config)
    return qwen35_gpt_model(cfg, tc, backend=backend).to(DEVICE)  # a no-op where megatron built it on DEVICE


def reference(cfg, *, seed: int):
    """The fp32 reference: local backend, the torch GDN path (deterministic_mode), megatron's unfused rope."""
    torch.manual_seed(seed)
    model = build(cfg, dtype=torch.float32, backend="local", deterministic_mode=True, apply_rope_fusion=False)
    spread_weights(model, cfg)
    return model


def spread_weights(model, cfg) -> None:
    """Weights a precision comparison can say something about, instead of the random init: A_log drawn as
    transformers initialises it (log U(0, 16): decays from gentle to fast), norm weights off zero (a zero-centred
    gamma of 0 is exact in bf16), and the output layer scaled so the logits spread with std ~3 (at init they are
    near ties, whose argmax any rounding flips)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty_like(param).uniform_(0.01, 16).log())
            elif param.dim() == 1 and "norm" in name:
                param.normal_(0.0, 0.05)
        if not cfg.tie_word_embeddings:  # the final norm gives unit-RMS rows, so std(logit) ~ std(w) sqrt(hidden)
            model.output_layer.weight.normal_(0.0, 3.0 / cfg.hidden_size ** 0.5)


def copy_through_checkpoint(source, cfg, *targets) -> None:
    """Save `source` as a torch_dist checkpoint and load it into each target with strict key matching: every key a
    target asks for must be in the checkpoint, and every module key must be loaded."""
    from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as ckpt:
        save_checkpoint(source, cfg, ckpt)
        for target in targets:
            load_checkpoint(target, ckpt, strict=True)


def fresh_loss_scales() -> None:
    """megatron's class-level MTP / MoE aux-loss backward scales back to 1, as in a fresh process."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0, device=DEVICE)


def forward_backward(model, cfg, *, seed: int):
    """(logits [2, s, vocab] fp32, mean loss) of `model`, gradients accumulated into its parameters."""
    ids, pos, labels = token_batch(cfg, seed=seed)
    with torch.no_grad():
        logits = model(ids, pos, None).float()
    fresh_loss_scales()
    loss = model(ids, pos, None, labels=labels).float().mean()  # MTP and MoE aux losses join in backward
    loss.backward()
    return logits, loss.detach()


def packed_forward_backward(model, cfg, *, seed: int):
    """(logits [1, s, vocab] fp32, mean loss) of `model` on one packed (THD) sequence of three documents, gradients
    accumulated into its parameters; and the logits of each document run alone, concatenated: equal where no layer
    lets a document see another."""
    from megatron_qwen35.training.steps import thd_packed_seq_params

    ids, pos, labels, cu_seqlens = packed_token_batch(cfg, seed=seed)
    packed = thd_packed_seq_params(cu_seqlens)
    with torch.no_grad():
        logits = model(ids, pos, None, packed_seq_params=packed).float()
        bounds = cu_seqlens.tolist()
        alone = torch.cat([model(ids[:, a:b], pos[:, a:b], None).float() for a, b in itertools.pairwise(bounds)],
                          dim=1)
    fresh_loss_scales()
    loss = model(ids, pos, None, labels=labels, packed_seq_params=packed).float().mean()
    loss.backward()
    return logits, loss.detach(), alone


def parameters_by_checkpoint_name(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter under the name it is saved as: the package's one owner of those names
    (convert.names.named_parameters_by_checkpoint_name), the same for both backends of one model (TE's fused norm
    names; experts as `...local_experts.{i}...`), so that two backends' parameters pair up by name."""
    from megatron_qwen35.convert.names import named_parameters_by_checkpoint_name

    return named_parameters_by_checkpoint_name(model)


def key_difference(names: dict, want_names: dict, label: str, want_label: str) -> str | None:
    """None where both models save the same names; else the line that says which differ (three of each side)."""
    if names.keys() == want_names.keys():
        return None
    return (f"checkpoint keys differ: only {label} {sorted(names.keys() - want_names.keys())[:3]}, "
            f"only {want_label} {sorted(want_names.keys() - names.keys())[:3]}")


def grad(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
