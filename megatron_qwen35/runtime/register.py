"""The register of every run-time change this project makes to megatron-core, megatron.training and torch.cuda.

One row per patch: its name; its kind, NO_CUDA (an adaptation to a machine without CUDA, applied only there) or
UPSTREAM_BUG (a defect of the pinned release that also stops or skews GPU runs, applied everywhere); the upstream
objects it replaces ("module" for a module whose `torch` binding is swapped, "module:qualname" for one function);
why; the upstream issue where one is known; and the fingerprint (sha256 prefix of the replaced source) at the
version it was written for. `apply_patches()` checks the installed versions first and names every patch to re-check
when they differ; tests/test_runtime_register.py recomputes each fingerprint, so a version bump fails naming the
patch whose upstream source changed.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_qwen35.runtime import cpu_patches, training_patches, upstream_fixes

NO_CUDA = "no-CUDA adaptation"
UPSTREAM_BUG = "upstream bug"

# The releases every fingerprint below was taken from (pyproject.toml pins them).
WRITTEN_FOR = {"megatron-core": "0.19.2", "torch": "2.13.0"}


@dataclass(frozen=True)
class Patch:
    name: str
    kind: str  # NO_CUDA or UPSTREAM_BUG
    replaces: tuple[str, ...]  # upstream targets: "pkg.module" (its torch binding) or "pkg.module:qualname"
    why: str
    apply: Callable[[], None]
    fingerprint: str  # runtime.patching.fingerprint of `replaces`, at WRITTEN_FOR
    upstream_issue: str | None = None  # None: not reported upstream as far as we found


_TRAINING = "megatron.training.training"
PATCHES: tuple[Patch, ...] = (
    # ---- megatron-core without CUDA (cpu_patches.py) ----
    Patch("torch_cuda_current_device", NO_CUDA, ("torch.cuda:current_device",),
          "megatron allocates on torch.cuda.current_device() in ~100 places: resolve it to the CPU",
          cpu_patches.patch_torch_cuda_current_device, "6e9804168a5c"),
    Patch("torch_cuda_synchronize", NO_CUDA, ("torch.cuda:synchronize",),
          "p2p, dist_checkpointing, parallel_state and timers synchronize: every CPU op already is",
          cpu_patches.patch_torch_cuda_synchronize, "7055e6143ffe"),
    Patch("torch_cuda_current_stream", NO_CUDA, ("torch.cuda:current_stream",),
          "DDP's grad sync waits on the current stream every step: one CPU stream whose waits are no-ops",
          cpu_patches.patch_torch_cuda_current_stream, "ca5387f64ee1"),
    Patch("rng_tracker", NO_CUDA, ("megatron.core.tensor_parallel.random",),
          "the model-parallel RNG states (init, dropout) live on the CUDA generator: keep them on the CPU one",
          cpu_patches.patch_rng_tracker, "c2bc8b53e27f"),
    Patch("cuda_literals", NO_CUDA, ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.utils",
                                     "megatron.core.dist_checkpointing.strategies.state_dict_saver"),
          "device='cuda' literals in the schedules, transformer masks and checkpoint plan check -> CPU",
          cpu_patches.patch_cuda_literals, "35459ab0d8c2"),
    Patch("moe_alltoall_dispatcher", NO_CUDA,
          ("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",),
          "the alltoall dispatcher moves split sizes to host on a CUDA side stream: no stream, numpy splits",
          cpu_patches.patch_moe_alltoall_dispatcher, "306811df7107"),
    Patch("uneven_first_dim_collectives", NO_CUDA,
          ("megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
           "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim"),
          "MoE alltoall with TP gathers uneven token counts; gloo needs equal shapes",
          cpu_patches.patch_uneven_first_dim_collectives, "68e18bab0836"),
    Patch("disable_dynamo", NO_CUDA, ("megatron.core.jit",),
          "jit_fuser is torch.compile: compiling on CPU costs ~7 s a function and changes no number",
          cpu_patches.patch_disable_dynamo, "0de81ea1c3a8"),
    Patch("optimizer_cuda_literals", NO_CUDA,
          ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
           "megatron.core.optimizer.grad_scaler"),
          "device='cuda' literals in the optimizers, clip_grads and the grad scaler -> CPU",
          cpu_patches.patch_optimizer_cuda_literals, "a837a823b598"),
    Patch("grad_norm_fallback", NO_CUDA, ("megatron.core.utils:local_multi_tensor_l2_norm",),
          "the no-TE/no-apex l2-norm fallback returns its norm on 'cuda'",
          cpu_patches.patch_grad_norm_fallback, "01526c55444a"),
    Patch("cuda_type_name_checks", NO_CUDA,
          ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
           "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
           "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32"),
          "the optimizers sort parameters by type() == 'torch.cuda.FloatTensor': CPU tensors name the CUDA type there",
          cpu_patches.patch_cuda_type_name_checks, "efa4d987119e"),
    Patch("distopt_torch_adam_step", NO_CUDA,
          ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict"),
          "the distributed optimizer over torch Adam (no TE/apex) mishandles Adam's step before step 1 and on load",
          cpu_patches.patch_distopt_torch_adam_step, "1ae032f2a0e9"),
    Patch("pipeline_embedding_copy", NO_CUDA,
          ("megatron.core.models.common.language_module.language_module:LanguageModule."
           "setup_embeddings_and_output_layer",),
          "PP: the last stage's embedding copy is synced after weight.data.cuda()",
          cpu_patches.patch_pipeline_embedding_copy, "9cdf2778ee6d"),
    Patch("rope_context_parallel_slice", NO_CUDA,
          ("megatron.core.models.common.embeddings.rope_utils:get_pos_emb_on_this_cp_rank",),
          "CP: this rank's rows of the rotary table are picked with a pinned index tensor moved by .cuda()",
          cpu_patches.patch_rope_context_parallel_slice, "ab7c5cb71dce"),
    Patch("training_device_arch", NO_CUDA, ("megatron.training.arguments:get_device_arch_version",),
          "validate_args reads the GPU generation when TP or CP > 1",
          cpu_patches.patch_training_device_arch, "b7e375abfdb1"),
    # ---- megatron.training without CUDA (training_patches.py) ----
    Patch("training_torch_on_cpu", NO_CUDA, training_patches.MODULES_WITH_CUDA_CALLS,
          "megatron.training's bookkeeping tensors on 'cuda' and its torch.cuda stream/memory/device/RNG calls",
          training_patches.patch_training_torch_on_cpu, "0196c8d6b394"),
    Patch("initialize_megatron_without_cuda", NO_CUDA, ("megatron.training.initialize:initialize_megatron",),
          "initialize_megatron asserts CUDA unless allow_no_cuda=True",
          training_patches.patch_initialize_megatron_without_cuda, "d9b467adcaed"),
    Patch("skip_jit_warmup", NO_CUDA, ("megatron.training.initialize:set_jit_fusion_options",
                                       "megatron.training.initialize:_warmup_jit_function"),
          "the fusion warm-up draws random tensors that would shift the CPU-initialised weights; nothing to warm up",
          training_patches.patch_skip_jit_warmup, "880fba02f539"),
    Patch("get_model_cuda_move", NO_CUDA, (_TRAINING + ":get_model",),
          "get_model moves every chunk with model.cuda(): on CPU it stays where it is",
          training_patches.patch_get_model_cuda_move, "b05b5cd0d24b"),
    # ---- defects of the release, on every machine (upstream_fixes.py) ----
    Patch("compile_helpers_in_wheel", UPSTREAM_BUG, ("megatron.core.datasets.utils:compile_helpers",),
          "initialize_megatron runs make for the dataset helpers; the wheel ships them compiled but no Makefile, "
          "and megatron exits",
          upstream_fixes.fix_compile_helpers_in_wheel, "84029a50ae8c"),
    Patch("flops_count_with_mtp", UPSTREAM_BUG, (_TRAINING + ":num_floating_point_operations",),
          "the FLOPs count asserts that a list --linear-attention-freq also covers the MTP layers, which validation "
          "refuses: every MTP run with a layer pattern raises when it first logs",
          upstream_fixes.fix_flops_count_with_mtp, "f9ed9b380e17"),
    Patch("mtp_loss_under_context_parallelism", UPSTREAM_BUG,
          ("megatron.core.transformer.multi_token_prediction:roll_tensor",),
          "under CP each rank divides its MTP loss by its own token count, which differ across ranks",
          upstream_fixes.fix_mtp_loss_under_context_parallelism, "576f3fcb1c36", "NVIDIA/Megatron-LM#7498"),
    Patch("distributed_optimizer_with_fp32_params", UPSTREAM_BUG,
          ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups",),
          "the distributed optimizer's checkpoint index counts a group's params in model order, its inner optimizer "
          "puts fp32 params first: a bf16 model with fp32 params (A_log, GDN norm) cannot save or resume",
          upstream_fixes.fix_distributed_optimizer_with_fp32_params, "3fce9be2b6d1"),
    Patch("float16_optimizer_with_fp32_params", UPSTREAM_BUG,
          ("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.sharded_state_dict",
           "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.load_state_dict"),
          "the bf16 optimizer maps checkpoint param ids over its float16 params only: a bf16 model with fp32 params "
          "cannot save or resume",
          upstream_fixes.fix_float16_optimizer_with_fp32_params, "0739fff7fa6d"),
)

_APPLIED: list[str] = []


def version_mismatches() -> dict[str, tuple[str, str]]:
    """{package: (written for, installed)} for every pinned package whose installed version differs."""
    found = {}
    for package, version in WRITTEN_FOR.items():
        installed = importlib.metadata.version(package)
        if installed.split("+")[0] != version:
            found[package] = (version, installed)
    return found


def apply_patches(*, without_cuda: bool | None = None) -> list[str]:
    """Apply the UPSTREAM_BUG rows, and the NO_CUDA rows where CUDA is absent; idempotent. Returns what is applied."""
    without_cuda = not torch.cuda.is_available() if without_cuda is None else without_cuda
    rows = [p for p in PATCHES if p.kind == UPSTREAM_BUG or without_cuda]
    if not _APPLIED and (mismatched := version_mismatches()):
        versions = ", ".join(f"{pkg} {got} (written for {want})" for pkg, (want, got) in mismatched.items())
        warnings.warn(f"megatron_qwen35's run-time patches were written for other releases: {versions}; re-check "
                      + ", ".join(p.name for p in rows) + " (tests/test_runtime_register.py names the changed ones)",
                      stacklevel=2)
    for patch in rows:
        if patch.name not in _APPLIED:
            patch.apply()
            _APPLIED.append(patch.name)
    return list(_APPLIED)


def applied_patches() -> list[str]:
    """Names of the patches applied in this process, in order."""
    return list(_APPLIED)


__all__ = ["NO_CUDA", "UPSTREAM_BUG", "WRITTEN_FOR", "Patch", "PATCHES", "apply_patches", "applied_patches",
           "version_mismatches"]
