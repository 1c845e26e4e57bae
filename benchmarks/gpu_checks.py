"""The GPU checks in one run: FLA against the torch path, bf16 against fp32, TE against local, generation, speed.

    python benchmarks/gpu_checks.py            # a session with a CUDA device
    python benchmarks/gpu_checks.py --dry-run  # CI: every check on CPU, small shapes, FLA under Triton's interpreter

1. fla_vs_torch: `gdn_ops.chunk_gated_delta_rule` and `causal_conv1d`, FLA's Triton kernels against the same call with
   deterministic=True (the torch path), same inputs on the same device: fp32 and bf16, plain and packed (documents
   not multiples of 64 tokens), 2x more value heads than key heads; the output and the gradients of every input
   (backward of a fixed random projection of the output).
2. bf16_forward: the fp32 model (local backend, torch GDN path) against the same weights in bf16 under megatron's
   Float16Module (Transformer Engine where it imports, else local), copied through a saved checkpoint loaded with
   strict key matching: relative max |delta logit|, KL(fp32 || bf16) per token, top-1 agreement; then a bf16
   forward + backward, and A_log / the GDN norm weight (and their gradients) still fp32.
3. te_vs_local (where TE imports, on CUDA): one checkpoint loaded into the TE and the local model, fp32: logits,
   loss and the gradient of every parameter, matched by checkpoint key (the names both backends save under; TE fuses
   the input norms into its linears, so module names differ).
4. generate: greedy generation of a left-padded batch (tiny-moe, local backend) through FLA's kernels (chunked and
   conv with states for the prompts, fused recurrent and conv update per token) against the same weights on the torch
   path, same device: every token equal, log-probabilities within check 1's fp32 bound.
5. stack_tflops (CUDA only): model TFLOP/s of a 4-layer 27b-shaped stack (3 GDN + 1 gated attention, dense MLP) at
   sequence 4096, forward + backward in bf16, divided by a bf16 matmul's TFLOP/s measured in the same run.
6. vision: one checkpoint of a VL model (tiny-vl's text model; on a GPU with 27b's ViT at depth 2) loaded into the TE
   and the local model (local and local where TE is absent: the dry run checks the code path): the tower's merged
   features for two images and a two-frame video of different sizes in fp32 and in bf16, then the whole model's
   logits, loss and every parameter's gradient (the tower's included) on a batch holding them, fp32.
Every reference runs on the device of what it checks. Errors are relative: max|got - want| / max|want| per tensor.
Prints one `check <name> ... ok|FAIL` line per result (`... skipped: <why>` where it cannot run; the timing line
ends with `ratio X`) and a summary; exits 1 if any check fails or raises.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

DRY_RUN = "--dry-run" in sys.argv[1:]  # decided before torch and triton are imported: both read the environment
if DRY_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU node: megatron's GDN puts conv1d/A_log/dt_bias on
    # the current CUDA device whatever use_cpu_initialization says, and the config turns on CUDA-only fusions
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# fp32 GEMMs stay fp32 in every NVIDIA library: Transformer Engine runs all-fp32 GEMMs in TF32 (cuBLASLt
# COMPUTE_32F_FAST_TF32), which would make check 3 a TF32 comparison. Triton's tl.dot (FLA) ignores it; bf16 is bf16.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if DRY_RUN:  # FLA's real kernels on CPU tensors; must come before anything imports triton (megatron-core does)
    from megatron_qwen35.runtime.triton_interpreter import enable_triton_interpreter

    enable_triton_interpreter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not DRY_RUN else "cpu")

# Relative-error bounds of check 1 (FLA against the torch path), by where FLA runs and the inputs' dtype.
FLA_TOL = {
    # Triton's interpreter computes FLA's fp32 math in numpy fp32: only the summation order differs from the torch
    # path (measured up to 9.3e-7 at these shapes; tests/test_fla_interpreter.py saw 1.2e-5 on layer grads).
    ("cpu", torch.float32): 1e-4,
    # On a GPU, FLA's tl.dot on fp32 inputs runs in TF32 (each input rounded to 10 mantissa bits, 2^-11 relative)
    # with fp32 accumulation; the torch path is true fp32. A few roundings through the chunked recurrence: ~1e-3.
    ("cuda", torch.float32): 2e-3,
    # Same bf16 inputs on both sides, but FLA rounds its intermediates (WY u/w, chunk states h, the gradients
    # between kernels) to bf16 (2^-9 relative each) while the torch path keeps them fp32 and rounds only its
    # results; 32 chunks of recurrence compound these to ~1e-2. A wrong argument is off by O(1e-1..1).
    ("cuda", torch.bfloat16): 3e-2,
}
# Check 2 (bf16 model against fp32, same weights). bf16 rounds every weight and activation (2^-9 relative); through
# the layers the logits move by ~1.5e-2 of their largest value, KL 2.4e-4, top-1 0.97-0.98 (tiny-moe, CPU). Bounds
# are a few times that. Measured on CPU: the GDN out_proj doubled gives 0.3 / KL 0.24 / top-1 0.63, the final norm
# without its +1 gives 0.97 / 3.2 / 0.03; A_log in bf16, or a 10% faster decay, stays inside the bf16 noise at this
# size, so bf16_backward checks the fp32 parameters by their dtype.
BF16_MAX_REL_LOGIT = 5e-2
BF16_MAX_KL = 5e-3  # nats per token, with logits spread to std ~3 (see _spread_weights)
BF16_MIN_TOP1 = 0.95
# What stays fp32 in a bf16 model (the released checkpoints' fp32 tensors). Spelled out rather than read from
# layers.gated_delta_net.FP32_PARAMETERS, so that emptying that list fails here.
FP32_IN_BF16 = ("self_attention.A_log", "self_attention.out_norm.weight")
VL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# Check 3: both backends in fp32 (TF32 off, above) with the torch GDN path: only summation orders differ (~1e-6).
TE_TOL = 1e-3
# Check 6, fp32: TE_TOL, for the same reason (Transformer Engine 2.20 runs fp32 THD attention in its unfused backend).
# bf16: each backend rounds the weights, activations and attention probabilities to bf16 (2^-9 relative) at its own
# places (TE: layer norm fused into the linear, fused attention with fp32 softmax; local: each op rounds its output),
# so the two differ from each other by about what either differs from fp32, up to twice that. Measured on CPU, the
# local bf16 tower against the fp32 one (weights at unit gain, _spread_tower_weights): 9.4e-3 (tiny-vl's tower) and
# 7.9e-3 (27b's ViT at depth 2, the GPU shapes' images and video); the bound is three times that. Measured there
# too, in fp32: one block's qkv, proj or fc1 bias dropped moves the features by 7e-2..1.3e-1, the merger's norm bias
# 1e-1, an input norm weight set to 1 2.7e-2..1.1e-1, the position table transposed 0.5-0.7: far outside the fp32
# bound, mostly outside the bf16 one, which is there to catch a bf16-only path (TE's fused attention, its casts).
VISION_BF16_TOL = 3e-2


@dataclass(frozen=True)
class Shapes:
    """The sizes each check runs at: real head sizes on a GPU, small ones for the interpreter on two CPU cores."""

    tokens: int  # per kernel call in check 1 (plain: per sequence, 2 sequences)
    documents: tuple[int, ...]  # cu_seqlens of the packed call: no document a multiple of 64 tokens
    key_heads: int
    value_heads: int  # 2 value heads per key head, as every Qwen3.5 preset has
    head_dim: int
    model_tokens: int  # per sequence in checks 2 and 3 (batch 2)
    bf16_presets: tuple[str, ...]  # models of check 2
    vl_preset: str  # the model of check 6
    images: tuple[tuple[int, int, int], ...]  # check 6's image grids (t, h, w in patches), one per batch row
    video: tuple[int, int, int]  # check 6's video grid, in row 0 after its image


GPU = Shapes(tokens=2048, documents=(0, 700, 1500, 2048), key_heads=16, value_heads=32, head_dim=128,
             model_tokens=1024, bf16_presets=("tiny-moe", "9b-2layers"), vl_preset="tiny-vl-27b-vit",
             images=((1, 32, 48), (1, 64, 40)), video=(2, 32, 32))  # 1536, 2560 and 2048 patches
CPU = Shapes(tokens=128, documents=(0, 45, 110, 128), key_heads=2, value_heads=4, head_dim=16,
             model_tokens=128, bf16_presets=("tiny-moe",), vl_preset="tiny-vl",
             images=((1, 4, 6), (1, 6, 8)), video=(2, 4, 6))
SHAPES = CPU if DEVICE.type == "cpu" else GPU


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------

RESULTS: list[str] = []  # "ok", "FAIL", "skipped" or "measured", one per printed check line


def report(name: str, detail: str, ok: bool | None) -> None:
    """Print one check line: ok / FAIL, or (ok None) a measurement that has no bound."""
    status = "" if ok is None else (" ok" if ok else " FAIL")
    RESULTS.append("measured" if ok is None else ("ok" if ok else "FAIL"))
    print(f"check {name} {detail}{status}", flush=True)


def skip(name: str, reason: str) -> None:
    RESULTS.append("skipped")
    print(f"check {name} skipped: {reason}", flush=True)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (0 when both are all zeros, inf when only want is)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _errors(got: dict, want: dict) -> dict[str, float]:
    return {name: relative_error(got[name], want[name]) for name in want}


def _fmt(errors: dict[str, float]) -> str:
    return " ".join(f"{name}={e:.1e}" for name, e in errors.items())


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Normal samples drawn on the CPU (the same numbers on any device), then moved to DEVICE."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# 1. FLA against the torch path
# ---------------------------------------------------------------------------------------------------------------


def _project_backward(out: torch.Tensor) -> None:
    """Backward of a fixed random projection of `out` (every output element gets its own gradient)."""
    (out.float() * _randn(*out.shape, seed=99)).sum().backward()


def _gdn_run(inputs: list[torch.Tensor], cu_seqlens, deterministic: bool) -> dict[str, torch.Tensor]:
    from megatron_qwen35.layers.gdn_ops import chunk_gated_delta_rule

    q, k, v, g, beta = (x.detach().clone().requires_grad_() for x in inputs)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, deterministic=deterministic)
    _project_backward(o)
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad, "dbeta": beta.grad}


def _conv_run(inputs: list[torch.Tensor], cu_seqlens, deterministic: bool) -> dict[str, torch.Tensor]:
    from megatron_qwen35.layers.gdn_ops import causal_conv1d

    x, weight = (t.detach().clone().requires_grad_() for t in inputs)
    y = causal_conv1d(x, weight, cu_seqlens=cu_seqlens, activation="silu", deterministic=deterministic)
    _project_backward(y)
    return {"y": y.detach(), "dx": x.grad, "dweight": weight.grad}


def _kernel_inputs(kernel: str, dtype: torch.dtype, packed: bool) -> list[torch.Tensor]:
    """The inputs of one kernel call, in `dtype` except the fp32 log decay g (as the model passes it)."""
    s = SHAPES
    b = 1 if packed else 2
    t, hk, h, d = s.tokens, s.key_heads, s.value_heads, s.head_dim
    if kernel == "conv":
        channels = (2 * hk + h) * d  # q, k and v channels, as the GDN layer convolves them
        return [_randn(b, t, channels, seed=1, dtype=dtype), _randn(channels, 4, seed=2, dtype=dtype) * 0.5]
    q, k = _randn(b, t, hk, d, seed=3, dtype=dtype), _randn(b, t, hk, d, seed=4, dtype=dtype)  # [b, t, hk, d]
    v = _randn(b, t, h, d, seed=5, dtype=dtype)  # [b, t, h, d]
    g = F.logsigmoid(_randn(b, t, h, seed=6) + 2.0)  # log decay in (-inf, 0), mostly near -0.1
    beta = torch.rand(b, t, h, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    return [q, k, v, g, beta]


def _fla_reachable() -> bool:
    """Whether gdn_ops sends a DEVICE tensor to FLA (else both sides would be the torch path, and equal)."""
    from megatron_qwen35.layers import gdn_ops

    probe = torch.zeros(1, device=DEVICE)
    return all(gdn_ops._fla_kernel(load, probe, deterministic=False) is not None
               for load in (gdn_ops._fla_chunk_gated_delta_rule, gdn_ops._fla_causal_conv1d))


def check_fla_vs_torch() -> None:
    if not _fla_reachable():
        report("fla_vs_torch", f"FLA's kernels do not run on {DEVICE.type} here (fla not importable?)", False)
        return
    cu_seqlens = torch.tensor(SHAPES.documents, dtype=torch.int32, device=DEVICE)
    for kernel, run in (("gdn", _gdn_run), ("conv", _conv_run)):
        for dtype in (torch.float32, torch.bfloat16):
            for packed in (False, True):
                name = f"fla_vs_torch {kernel} {str(dtype)[6:]} {'packed' if packed else 'plain'}"
                tol = FLA_TOL.get((DEVICE.type, dtype))
                if tol is None:  # bf16 under the interpreter
                    skip(name, "Triton's interpreter (3.7.1) computes bf16 on the raw uint16 bits (its create_dot "
                               "and arithmetic do not convert them; errors ~1e10 measured)")
                    continue
                inputs = _kernel_inputs(kernel, dtype, packed)
                cu = cu_seqlens if packed else None
                errors = _errors(run(inputs, cu, deterministic=False), run(inputs, cu, deterministic=True))
                worst = max(errors.values())
                report(name, f"{_fmt(errors)} max {worst:.1e} tol {tol:.0e}", worst <= tol)


# ---------------------------------------------------------------------------------------------------------------
# Models (checks 2 and 3)
# ---------------------------------------------------------------------------------------------------------------


def _preset(name: str):
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


def _model(cfg, *, dtype: torch.dtype, backend: str, **config):
    """A fresh model on DEVICE; `config` overrides TransformerConfig fields."""
    from megatron_qwen35.config import qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model

    tc = qwen35_transformer_config(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16, **config)
    return qwen35_gpt_model(cfg, tc, backend=backend).to(DEVICE)  # a no-op where megatron built it on DEVICE


def _reference(cfg, *, seed: int):
    """The fp32 reference: local backend, the torch GDN path (deterministic_mode), megatron's unfused rope."""
    torch.manual_seed(seed)
    model = _model(cfg, dtype=torch.float32, backend="local", deterministic_mode=True, apply_rope_fusion=False)
    _spread_weights(model, cfg)
    return model


def _spread_weights(model, cfg) -> None:
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


def _copy_through_checkpoint(source, cfg, *targets) -> None:
    """Save `source` as a torch_dist checkpoint and load it into each target with strict key matching: every key a
    target asks for must be in the checkpoint, and every module key must be loaded."""
    from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as ckpt:
        save_checkpoint(source, cfg, ckpt)
        for target in targets:
            load_checkpoint(target, ckpt, strict=True)


def _batch(cfg, *, seed: int):
    """Token ids, positions and next-token labels [2, model_tokens] on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, SHAPES.model_tokens + 1), generator=gen).to(DEVICE)
    pos = torch.arange(SHAPES.model_tokens, device=DEVICE).expand(2, -1)
    return ids[:, :-1], pos, ids[:, 1:]


def _fresh_loss_scales() -> None:
    """megatron's class-level MTP / MoE aux-loss backward scales back to 1, as in a fresh process."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0, device=DEVICE)


def _forward_backward(model, cfg, *, seed: int):
    """(logits [2, s, vocab] fp32, mean loss) of `model`, gradients accumulated into its parameters."""
    ids, pos, labels = _batch(cfg, seed=seed)
    with torch.no_grad():
        logits = model(ids, pos, None).float()
    _fresh_loss_scales()
    loss = model(ids, pos, None, labels=labels).float().mean()  # MTP and MoE aux losses join in backward
    loss.backward()
    return logits, loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# 2. bf16 against fp32
# ---------------------------------------------------------------------------------------------------------------


def _bf16_backend() -> str:
    from megatron_qwen35.runtime import transformer_engine_available

    return "te" if DEVICE.type == "cuda" and transformer_engine_available() else "local"


def check_bf16_forward() -> None:
    from megatron.core.transformer.module import Float16Module

    backend = _bf16_backend()
    for preset in SHAPES.bf16_presets:
        cfg = _preset(preset)
        reference = _reference(cfg, seed=0)
        # Under the interpreter FLA cannot compute bf16 (check 1): the dry run's bf16 model takes the torch path.
        model = _model(cfg, dtype=torch.bfloat16, backend=backend, deterministic_mode=DRY_RUN)
        _copy_through_checkpoint(reference, cfg, model)
        model = Float16Module(model.config, model)  # module.bfloat16(), as megatron.training wraps it
        name = f"bf16_forward {preset} backend={backend} gdn={'torch' if DRY_RUN else 'fla'}"

        ids, pos, _ = _batch(cfg, seed=1)
        with torch.no_grad():
            want = reference(ids, pos, None).float()
            got = model(ids, pos, None).float()
        rel = relative_error(got, want)
        kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        ok = rel <= BF16_MAX_REL_LOGIT and kl.item() <= BF16_MAX_KL and top1 >= BF16_MIN_TOP1
        report(name, f"tokens={SHAPES.model_tokens} rel_max_dlogit={rel:.1e} (<= {BF16_MAX_REL_LOGIT:.0e}) "
                     f"kl_per_token={kl.item():.1e} (<= {BF16_MAX_KL:.0e}) top1={top1:.4f} (>= {BF16_MIN_TOP1})", ok)

        _, loss = _forward_backward(model, cfg, seed=1)
        params = dict(model.module.named_parameters())
        fp32 = {n: p for n, p in params.items() if n.endswith(FP32_IN_BF16)}
        no_grad = [n for n, p in params.items() if p.grad is None]
        not_finite = [n for n, p in params.items() if p.grad is not None and not p.grad.isfinite().all()]
        wrong_dtype = [n for n, p in params.items() if p.grad is not None
                       and {p.dtype, p.grad.dtype} != {torch.float32 if n in fp32 else torch.bfloat16}]
        expected_fp32 = len(FP32_IN_BF16) * sum(t == "linear_attention" for t in cfg.layer_types)
        ok = (math.isfinite(loss.item()) and not no_grad and not not_finite and not wrong_dtype
              and len(fp32) == expected_fp32)
        problems = "".join(f" {label}={names[:3]}" for label, names in
                           (("no_grad", no_grad), ("not_finite", not_finite), ("wrong_dtype", wrong_dtype)) if names)
        report(f"bf16_backward {preset} backend={backend}",
               f"loss={loss.item():.3f} params={len(params)} fp32_params={len(fp32)}/{expected_fp32} "
               f"(A_log, out_norm.weight; grads fp32){problems}", ok)
        del reference, model
        _empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# 3. Transformer Engine against local
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_names(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter under the key it is saved as (both backends save under the same keys). A key that several
    parameters share (the experts of one layer, stacked in one saved tensor) gets `#i` in the order the model lists
    them, which is the expert order in both backends (SequentialMLP's local_experts)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ids = {id(p): p for p in model.parameters()}
    names: dict[str, torch.nn.Parameter] = {}
    for entry in nested_values(model.sharded_state_dict()):
        if isinstance(entry, ShardedObject):  # _extra_state
            continue
        if id(entry.data) not in ids:  # a buffer
            continue
        key, i = entry.key, 0
        while key in names:
            i += 1
            key = f"{entry.key}#{i}"
        names[key] = ids.pop(id(entry.data))
    if ids:
        raise ValueError(f"{len(ids)} parameters are saved under no checkpoint key")
    return names


def check_te_vs_local() -> None:
    from megatron_qwen35.runtime import transformer_engine_available

    if not transformer_engine_available():
        skip("te_vs_local", "Transformer Engine not importable")
        return
    if DEVICE.type != "cuda":
        skip("te_vs_local", "dry run (Transformer Engine runs on CUDA only)")
        return
    # Both models take the torch GDN path (FLA's TF32 dots would round the backends' tiny differences unevenly);
    # megatron refuses TE attention under deterministic_mode unless TE is told to pick deterministic algorithms.
    with mock.patch.dict(os.environ, NVTE_ALLOW_NONDETERMINISTIC_ALGO="0"):
        for preset in ("tiny", "tiny-moe"):  # tiny: fused pre-MLP norm; tiny-moe: TE linears in the experts
            cfg = _preset(preset)
            source = _reference(cfg, seed=2)
            models = {backend: _model(cfg, dtype=torch.float32, backend=backend, deterministic_mode=True)
                      for backend in ("te", "local")}
            _copy_through_checkpoint(source, cfg, *models.values())
            del source
            results = {backend: _forward_backward(m, cfg, seed=3) for backend, m in models.items()}
            (te_logits, te_loss), (logits, loss) = results["te"], results["local"]
            te_names, names = checkpoint_names(models["te"]), checkpoint_names(models["local"])
            if te_names.keys() != names.keys():
                only_te, only_local = sorted(te_names.keys() - names.keys()), sorted(names.keys() - te_names.keys())
                report(f"te_vs_local {preset}", f"checkpoint keys differ: only TE {only_te[:3]}, only local "
                                                f"{only_local[:3]}", False)
                continue
            grads = {k: relative_error(_grad(te_names[k]), _grad(names[k])) for k in names}
            worst = max(grads, key=grads.get)
            errors = {"logits": relative_error(te_logits, logits), "loss": relative_error(te_loss, loss),
                      "grads": grads[worst]}
            report(f"te_vs_local {preset}", f"{_fmt(errors)} ({len(grads)} params, worst {worst}) tol {TE_TOL:.0e}",
                   max(errors.values()) <= TE_TOL)
            del models, results
            _empty_cache()


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


# ---------------------------------------------------------------------------------------------------------------
# 4. Generation through FLA's kernels
# ---------------------------------------------------------------------------------------------------------------


def check_generate() -> None:
    """`generate` on DEVICE through gdn_ops' kernel choice (FLA's chunked kernel and conv with states for the
    prompts, its fused recurrent kernel and conv update for each token) against the same weights with
    deterministic_mode (the torch path), same device: a left-padded batch, greedy; the tokens must be equal and the
    log-probabilities within check 1's fp32 bound."""
    from megatron_qwen35.inference import Qwen35CausalLM, generate, left_padded

    if not _fla_reachable():
        report("generate", f"FLA's kernels do not run on {DEVICE.type} here (fla not importable?)", False)
        return
    cfg = _preset("tiny-moe")
    reference = _reference(cfg, seed=5)
    candidate = _model(cfg, dtype=torch.float32, backend="local", apply_rope_fusion=False)
    _copy_through_checkpoint(reference, cfg, candidate)
    gen = torch.Generator().manual_seed(6)
    lengths = (9, 70) if DEVICE.type == "cpu" else (9, 700, 1500)  # one prompt within a 64-token chunk, others across
    input_ids, attention_mask = left_padded([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
                                             for n in lengths])
    new_tokens = 4 if DEVICE.type == "cpu" else 64
    runs = [generate(Qwen35CausalLM(model, cfg).eval(), input_ids.to(DEVICE), new_tokens,
                     attention_mask=attention_mask.to(DEVICE), return_logprobs=True)
            for model in (candidate, reference)]
    (tokens, logprobs), (want_tokens, want_logprobs) = runs
    same = int((tokens == want_tokens).all(dim=0)[input_ids.shape[1]:].sum())  # steps where every row agrees
    error = relative_error(logprobs, want_logprobs)
    tol = FLA_TOL[(DEVICE.type, torch.float32)]
    report("generate", f"tiny-moe backend=local prompts={lengths} steps_equal={same}/{new_tokens} "
           f"logprobs={error:.1e} tol {tol:.0e}", same == new_tokens and error <= tol)


# ---------------------------------------------------------------------------------------------------------------
# 5. Speed of a 27b-shaped stack
# ---------------------------------------------------------------------------------------------------------------


def _time(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs, after one warm-up (Triton autotuning, cuBLAS heuristics)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def stack_flops(cfg, seq: int, layer_types) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) of the decoder layers for one sequence, attention scores included;
    no embedding or output layer. Per token: the projections' weights, the GDN recurrence (4 dk x dv per value head:
    S^T k, k delta^T, S^T q plus the decay), attention's q k^T and p v over seq / 2 keys on average (causal)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    qk, v = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    gdn_proj = h * (2 * qk + 2 * v + 2 * cfg.linear_num_value_heads) + v * h  # in_proj [q k | v z | b a], out_proj
    gdn_core = 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    d, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    attn_proj = h * (2 * nq * d + 2 * ng * d) + nq * d * h  # linear_qkv [q gate | k v], linear_proj
    attn_core = 2 * nq * d * seq / 2
    mlp = 3 * h * f  # swiglu: fc1 to 2f, fc2 back
    total = 0.0
    for t in layer_types:
        per_token = (gdn_proj + gdn_core if t == "linear_attention" else attn_proj + attn_core) + mlp
        total += 2 * per_token * seq
    return total


def check_stack_tflops() -> None:
    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model

    if DEVICE.type != "cuda":
        skip("stack_tflops", "dry run (timings need CUDA)")
        return
    seq, backend = 4096, _bf16_backend()
    cfg = qwen35_preset("27b").replace(num_layers=4, mtp_num_layers=0)  # layer 4 is gated attention
    tc = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True)
    model = qwen35_gpt_model(cfg, tc, backend=backend, pre_process=False, post_process=False).to(DEVICE)
    x = torch.randn(seq, 1, cfg.hidden_size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    model.set_input_tensor(x)

    def step():
        model(None, None, None).float().square().mean().backward()

    t = _time(step, repeats=3)
    flops = 3 * stack_flops(cfg, seq, cfg.layer_types)  # forward + backward ~ 3x forward
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    t_mm = _time(lambda: a @ a, repeats=10)
    model_tflops, mm_tflops = flops / t / 1e12, 2 * 8192 ** 3 / t_mm / 1e12
    report("stack_tflops", f"27b-shaped {''.join('G' if t == 'linear_attention' else 'A' for t in cfg.layer_types)} "
                           f"seq={seq} backend={backend} step={t * 1e3:.1f}ms model_tflops={model_tflops:.1f} "
                           f"bf16_matmul_tflops={mm_tflops:.1f} ratio {model_tflops / mm_tflops:.3f}", None)


# ---------------------------------------------------------------------------------------------------------------
# 6. The vision tower and the VL model: Transformer Engine against local
# ---------------------------------------------------------------------------------------------------------------


def _spread_tower_weights(model) -> None:
    """The tower's weights at unit gain (std 1 / sqrt(fan in): megatron's init std of 0.02 leaves each block's
    contribution ~1e-2 of the residual stream, below the bf16 noise, so a broken block would hardly show), the
    position table at half the patch embeddings' scale, and LayerNorm weights and biases off their init (1 and 0,
    exact in any dtype), so that a norm or a bias one backend applied and the other did not shows. The tower's
    norms are plain LayerNorms, not zero-centred."""
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if name.endswith("pos_embed.weight"):
                param.normal_(0.0, 0.5)
            elif param.dim() > 1:  # linears [out, in], the patch Conv3d [out, C, T, P, P]
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            else:  # LayerNorm weights (the tower's only other 1-D parameters)
                param.normal_(1.0, 0.1)


def _vl_batch(cfg, *, seed: int) -> dict:
    """Two rows: text, image 0, text, the video's frames (each its own run, text between them), text; and text,
    image 1, text; the same length, as `Qwen35VLModel.forward` takes them (ids, mRoPE positions, labels, pixels and
    grids on DEVICE)."""
    from megatron_qwen35.layers.rotary import mrope_position_ids

    v, gen = cfg.vision, torch.Generator().manual_seed(seed)
    tokens = lambda t, h, w: t * h * w // v.spatial_merge_size ** 2  # noqa: E731 - merged tokens of a grid
    text = lambda n: torch.randint(0, v.image_token_id - 8, (n,), generator=gen).tolist()  # noqa: E731

    def span(token: int, n: int) -> list[int]:
        return [v.vision_start_token_id, *[token] * n, v.vision_end_token_id]

    t, h, w = SHAPES.video
    frames = [token for _ in range(t) for token in span(v.video_token_id, tokens(1, h, w)) + text(2)]
    rows = [text(5) + span(v.image_token_id, tokens(*SHAPES.images[0])) + text(4) + frames,
            text(3) + span(v.image_token_id, tokens(*SHAPES.images[1]))]
    length = max(map(len, rows)) + 4
    ids = torch.tensor([row + text(length + 1 - len(row)) for row in rows])  # one more for the labels
    images, videos = torch.tensor(SHAPES.images), torch.tensor([SHAPES.video])
    patches = lambda grids: int(grids.prod(-1).sum())  # noqa: E731 - rows of pixel values
    return dict(input_ids=ids[:, :-1].to(DEVICE), labels=ids[:, 1:].to(DEVICE),
                position_ids=mrope_position_ids(ids[:, :-1], v, images, videos).to(DEVICE),
                pixel_values=_randn(patches(images), v.patch_dim, seed=seed + 1), image_grid_thw=images.to(DEVICE),
                pixel_values_videos=_randn(patches(videos), v.patch_dim, seed=seed + 2),
                video_grid_thw=videos.to(DEVICE))


def _tower_features(model, batch) -> torch.Tensor:
    """The tower's merged features of the batch's images, then of its video, fp32 [tokens, out_hidden]."""
    with torch.no_grad():
        return torch.cat([model.vision_model(batch["pixel_values"], batch["image_grid_thw"]),
                          model.vision_model(batch["pixel_values_videos"], batch["video_grid_thw"])]).float()


def check_vision() -> None:
    """Check 6: a TE model and a local one (two local ones where TE is absent) load one VL checkpoint; their towers
    encode the same images and video in fp32 and in bf16, then the fp32 models run forward and backward on a batch
    holding them."""
    from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint
    from megatron_qwen35.runtime import transformer_engine_available

    backend = "te" if DEVICE.type == "cuda" and transformer_engine_available() else "local"
    pair = f"{backend}_vs_local"
    cfg = _preset(SHAPES.vl_preset)
    batch = _vl_batch(cfg, seed=8)
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}

    def loaded(dtype):  # (candidate, local reference) from the checkpoint, strict key matching
        models = tuple(_model(cfg, dtype=dtype, backend=b, deterministic_mode=True) for b in (backend, "local"))
        for model in models:
            load_checkpoint(model, ckpt, strict=True)
        return models

    # As check 3: the torch GDN path on both sides, and TE told to pick deterministic attention algorithms.
    with mock.patch.dict(os.environ, NVTE_ALLOW_NONDETERMINISTIC_ALGO="0"), \
            tempfile.TemporaryDirectory(prefix="gpu_checks_") as ckpt:
        source = _reference(cfg, seed=7)
        _spread_tower_weights(source)
        save_checkpoint(source, cfg, ckpt)
        fp32_features = _tower_features(source, batch)
        del source
        for dtype, tol in ((torch.float32, TE_TOL), (torch.bfloat16, VISION_BF16_TOL)):
            candidate, reference = loaded(dtype)
            got, want = _tower_features(candidate, batch), _tower_features(reference, batch)
            errors = {pair: relative_error(got, want)}
            if dtype == torch.bfloat16:  # each against the fp32 tower: the bf16 noise that the bound is sized by
                errors.update({f"{backend}_vs_fp32": relative_error(got, fp32_features),
                               "local_ref_vs_fp32": relative_error(want, fp32_features)})
            report(f"vision tower {str(dtype)[6:]} {pair}",
                   f"{SHAPES.vl_preset} tokens={got.shape[0]} {_fmt(errors)} tol {tol:.0e}",
                   max(errors.values()) <= tol)
            del candidate, reference
            _empty_cache()

        results = []
        for model in loaded(torch.float32):
            with torch.no_grad():
                logits = model(batch["input_ids"], batch["position_ids"], None, **vision).float()
            _fresh_loss_scales()
            loss = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"], **vision)
            loss.float().mean().backward()
            results.append((logits, loss.detach().float().mean(), checkpoint_names(model)))
    (logits, loss, names), (want_logits, want_loss, want_names) = results
    name = f"vision model {pair}"
    if names.keys() != want_names.keys():
        report(name, f"checkpoint keys differ: only {backend} {sorted(names.keys() - want_names.keys())[:3]}, "
                     f"only local {sorted(want_names.keys() - names.keys())[:3]}", False)
        return
    grads = {k: relative_error(_grad(names[k]), _grad(want_names[k])) for k in want_names}
    worst = max(grads, key=grads.get)
    tower = [k for k in grads if k.startswith("vision_model.")]
    errors = {"logits": relative_error(logits, want_logits), "loss": relative_error(loss, want_loss),
              "grads": grads[worst], "tower_grads": max(grads[k] for k in tower)}
    report(name, f"{SHAPES.vl_preset} fp32 tokens={tuple(batch['input_ids'].shape)} {_fmt(errors)} "
                 f"({len(grads)} params, {len(tower)} in the tower, worst {worst}) tol {TE_TOL:.0e}",
           max(errors.values()) <= TE_TOL)


# ---------------------------------------------------------------------------------------------------------------


def _empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _run(name: str, check) -> float:
    """Run one check and return its seconds; an exception is that check's FAIL (its traceback on stderr), and the
    next check still runs."""
    start = time.perf_counter()
    try:
        check()
    except Exception as e:  # every failure is reported, none stops the run
        traceback.print_exc()
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        report(name, f"raised {type(e).__name__}: {first_line}", False)
        _empty_cache()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only, small shapes, FLA under Triton's interpreter (read before parsing)")
    parser.parse_args(argv)
    if DEVICE.type != "cuda" and not DRY_RUN:
        raise SystemExit("gpu_checks.py needs a CUDA device; on CPU run it with --dry-run")
    import logging
    import warnings

    # megatron's and Triton's deprecation and CPU notices (GPTModel, async save, no APEX) drown the check lines
    warnings.simplefilter("ignore")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    from megatron_qwen35.runtime import initialize_parallel

    start = time.perf_counter()
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device {device_name} torch {torch.__version__} dry_run={DRY_RUN} threads={torch.get_num_threads()}",
          flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch references are fp32 (torch's cuDNN default is TF32)
    torch.backends.cudnn.allow_tf32 = False
    initialize_parallel(seed=1234)
    seconds = {name: _run(name, check) for name, check in (
        ("fla_vs_torch", check_fla_vs_torch), ("bf16_forward", check_bf16_forward),
        ("te_vs_local", check_te_vs_local), ("generate", check_generate), ("vision", check_vision),
        ("stack_tflops", check_stack_tflops))}
    failed = RESULTS.count("FAIL")
    print(f"summary: {RESULTS.count('ok')} ok, {failed} FAIL, {RESULTS.count('skipped')} skipped, "
          f"{RESULTS.count('measured')} measured in {time.perf_counter() - start:.0f} s ("
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ")", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
