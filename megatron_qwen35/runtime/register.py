"""The register of every run-time change this project makes to megatron-core, megatron.training and torch.cuda, and
of the upstream code it depends on without changing it (DEPENDENCIES).

One row per patch: its name; its kind, NO_CUDA (an adaptation to a machine without CUDA, applied only there),
UPSTREAM_BUG (a defect of the pinned release that also stops or skews GPU runs, applied everywhere) or UPSTREAM_COST
(a needless cost of the pinned release, time or processes, that changes no result; applied everywhere); the upstream
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

from megatron_qwen35.runtime import no_cuda, training_patches, upstream_costs, upstream_fixes

NO_CUDA = "no-CUDA adaptation"
UPSTREAM_BUG = "upstream bug"
UPSTREAM_COST = "upstream cost"

# The releases every fingerprint below was taken from (pyproject.toml pins them).
WRITTEN_FOR = {"megatron-core": "0.19.2", "torch": "2.13.0"}


@dataclass(frozen=True)
class Patch:
    name: str
    kind: str  # NO_CUDA, UPSTREAM_BUG or UPSTREAM_COST
    replaces: tuple[str, ...]  # upstream targets: "pkg.module" (its torch binding) or "pkg.module:qualname"
    why: str
    apply: Callable[[], None]
    fingerprint: str  # runtime.patching.fingerprint of `replaces`, at WRITTEN_FOR
    upstream_issue: str | None = None  # None: not reported upstream as far as we found


_TRAINING = "megatron.training.training"
PATCHES: tuple[Patch, ...] = (
    # ---- megatron-core without CUDA (no_cuda/) ----
    Patch("torch_cuda_current_device", NO_CUDA, ("torch.cuda:current_device",),
          "megatron allocates on torch.cuda.current_device() in ~100 places: resolve it to the CPU",
          no_cuda.torch_cuda.patch_torch_cuda_current_device, "6e9804168a5c"),
    Patch("torch_cuda_synchronize", NO_CUDA, ("torch.cuda:synchronize",),
          "p2p, dist_checkpointing, parallel_state and timers synchronize: every CPU op already is",
          no_cuda.torch_cuda.patch_torch_cuda_synchronize, "7055e6143ffe"),
    Patch("torch_cuda_current_stream", NO_CUDA, ("torch.cuda:current_stream",),
          "DDP's grad sync waits on the current stream every step: one CPU stream whose waits are no-ops",
          no_cuda.torch_cuda.patch_torch_cuda_current_stream, "ca5387f64ee1"),
    Patch("rng_tracker", NO_CUDA, ("megatron.core.tensor_parallel.random",),
          "the model-parallel RNG states (init, dropout) live on the CUDA generator: keep them on the CPU one",
          no_cuda.rng.patch_rng_tracker, "c2bc8b53e27f"),
    Patch("cuda_literals", NO_CUDA, ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.utils",
                                     "megatron.core.dist_checkpointing.strategies.state_dict_saver"),
          "device='cuda' literals in the schedules, transformer masks and checkpoint plan check -> CPU",
          no_cuda.literals.patch_cuda_literals, "35459ab0d8c2"),
    Patch("moe_alltoall_dispatcher", NO_CUDA,
          ("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",),
          "the alltoall dispatcher moves split sizes to host on a CUDA side stream: no stream, numpy splits",
          no_cuda.moe.patch_moe_alltoall_dispatcher, "306811df7107"),
    Patch("uneven_first_dim_collectives", NO_CUDA,
          ("megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
           "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim"),
          "MoE alltoall with TP gathers uneven token counts; gloo needs equal shapes",
          no_cuda.collectives.patch_uneven_first_dim_collectives, "68e18bab0836"),
    Patch("disable_dynamo", NO_CUDA, ("megatron.core.jit",),
          "jit_fuser is torch.compile: compiling on CPU costs ~7 s a function and changes no number",
          no_cuda.dynamo.patch_disable_dynamo, "0de81ea1c3a8"),
    Patch("optimizer_cuda_literals", NO_CUDA,
          ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
           "megatron.core.optimizer.grad_scaler"),
          "device='cuda' literals in the optimizers, clip_grads and the grad scaler -> CPU",
          no_cuda.literals.patch_optimizer_cuda_literals, "a837a823b598"),
    Patch("grad_norm_fallback", NO_CUDA, ("megatron.core.utils:local_multi_tensor_l2_norm",),
          "the no-TE/no-apex l2-norm fallback returns its norm on 'cuda'",
          no_cuda.literals.patch_grad_norm_fallback, "01526c55444a"),
    Patch("cuda_type_name_checks", NO_CUDA,
          ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
           "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
           "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32"),
          "the optimizers sort parameters by type() == 'torch.cuda.FloatTensor': CPU tensors name the CUDA type there",
          no_cuda.optimizer.patch_cuda_type_name_checks, "efa4d987119e"),
    Patch("distopt_torch_adam_step", NO_CUDA,
          ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states"),
          "the distributed optimizer over torch Adam (no TE/apex) mishandles Adam's step before step 1 and on load, "
          "and its fully reshardable loader has none to hand over",
          no_cuda.optimizer.patch_distopt_torch_adam_step, "bc5950b89647"),
    Patch("pipeline_embedding_copy", NO_CUDA,
          ("megatron.core.models.common.language_module.language_module:LanguageModule."
           "setup_embeddings_and_output_layer",),
          "PP: the last stage's embedding copy is synced after weight.data.cuda()",
          no_cuda.pipeline.patch_pipeline_embedding_copy, "9cdf2778ee6d"),
    Patch("rope_context_parallel_slice", NO_CUDA,
          ("megatron.core.models.common.embeddings.rope_utils:get_pos_emb_on_this_cp_rank",),
          "CP: this rank's rows of the rotary table are picked with a pinned index tensor moved by .cuda()",
          no_cuda.rope.patch_rope_context_parallel_slice, "ab7c5cb71dce"),
    Patch("training_device_arch", NO_CUDA, ("megatron.training.arguments:get_device_arch_version",),
          "validate_args reads the GPU generation when TP or CP > 1",
          no_cuda.literals.patch_training_device_arch, "b7e375abfdb1"),
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
          ("megatron.core.transformer.multi_token_prediction:roll_tensor",
           "megatron.core.models.gpt.gpt_model:process_mtp_loss"),
          "each micro-batch and CP rank weighs its MTP loss by its own token count: under CP the ranks' counts "
          "differ, and per token the objective depends on how documents are packed",
          upstream_fixes.fix_mtp_loss_under_context_parallelism, "c5d770803efb", "NVIDIA/Megatron-LM#7498"),
    Patch("moe_aux_loss_with_padding_over_split_sequences", UPSTREAM_BUG,
          ("megatron.core.transformer.moe.router:get_tokens_per_expert_and_token_count",),
          "per token and with a padding mask, each SP / CP rank scales the router's aux loss by its own non-padding "
          "token count where megatron's formula means the group's: packed sequences' aux-loss gradients change "
          "with TP and CP",
          upstream_fixes.fix_moe_aux_loss_with_padding_over_split_sequences, "53bdcd7e6672"),
    Patch("mtp_padding_mask_under_sequence_parallelism", UPSTREAM_BUG,
          ("megatron.core.transformer.multi_token_prediction:MultiTokenPredictionLayer._get_embeddings",),
          "under SP the MTP layer rolls its rank's slice of the padding mask as if it were the whole sequence: its "
          "MoE router masks the wrong tokens of packed sequences",
          upstream_fixes.fix_mtp_padding_mask_under_sequence_parallelism, "0de994b5131c"),
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
    Patch("chained_optimizer_count_change", UPSTREAM_BUG,
          ("megatron.core.optimizer.optimizer:ChainedOptimizer.load_state_dict",),
          "MoE expert parameters get an optimizer of their own only in some layouts: a checkpoint saved with one "
          "optimizer does not load where there are two, and the reverse, even in the fully reshardable format",
          upstream_fixes.fix_chained_optimizer_count_change, "403774c7dde1"),
    # ---- needless costs of the release, on every machine (upstream_costs.py) ----
    Patch("results_manager_in_synchronous_saves", UPSTREAM_COST,
          ("megatron.core.dist_checkpointing.strategies.torch:TorchDistSaveShardedStrategy.save",
           "megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue",
           "megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.prepare_write_data"),
          "a synchronous torch_dist save passes its write results within the process through a Manager queue that "
          "the first save starts by spawning a process per rank (it imports torch): 2.5-3 s of every run's first save",
          upstream_costs.remove_results_manager_from_synchronous_saves, "e43df71eb63b"),
)

@dataclass(frozen=True)
class Dependency:
    """Upstream code this project calls, subclasses or relies on without replacing it: a version bump that changes
    its source fails the fingerprint test naming the row, and `how` says what to re-read it for."""

    name: str
    targets: tuple[str, ...]  # "pkg.module:qualname", as Patch.replaces
    how: str
    fingerprint: str  # runtime.patching.fingerprint of `targets`, at WRITTEN_FOR


_GDN = "megatron.core.ssm.gated_delta_net"
DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("gated_delta_net_base",
               (f"{_GDN}.common:_GDNBase.__init__", f"{_GDN}.common:_GDNBase.sharded_state_dict",
                f"{_GDN}.gdn:GatedDeltaNet._setup_variant_attrs", f"{_GDN}.common:_GDNBase.reset_parameters"),
               "layers/gated_delta_net.py inherits the parameters, their TP sharding, their initialisation (A_log, "
               "dt_bias, conv), the split sizes its forward reads (feat_dim_split, in_proj_split_sections) and the "
               "checkpoint layout", "91cfa3715f14"),
    Dependency("gated_delta_net_extension_points",
               (f"{_GDN}.common:_GDNBase._compute_g_and_beta", f"{_GDN}.common:_GDNBase._apply_gated_norm"),
               "the mixing core calls them: the decay and beta in fp32, the gated output norm", "28aee4b9c72b"),
    Dependency("gated_delta_net_context_parallel",
               (f"{_GDN}.common:_build_head_perm_for_split_sections", f"{_GDN}.common:get_parameter_local_cp",
                f"{_GDN}.common:tensor_a2a_cp2hp", f"{_GDN}.common:tensor_a2a_hp2cp"),
               "the forward's context -> head parallel all-to-alls and each rank's slice of conv, A_log, dt_bias",
               "c87634be4513"),
    Dependency("tp_shared_gradients_in_finalize",
               ("megatron.core.distributed.finalize_model_grads:_allreduce_non_tensor_model_parallel_grads",
                "megatron.core.distributed.finalize_model_grads:finalize_model_grads"),
               "the GDN output norm's gradient, shared by TP ranks, is reduced there (average_gradients_across_"
               "tp_domain) once per step, finalize_model_grads calling it", "b2b7a6f51fd8"),
    Dependency("gdn_output_norm_recompute", ("megatron.core.tensor_parallel.random:CheckpointWithoutOutput",),
               "layers/gated_delta_net.py recomputes the gated output norm through it, passing the config's fp8 "
               "(it reads `fp8 is not None`)", "f4ae31c073b4"),
    Dependency("load_balanced_context_parallel_split",
               ("megatron.core.utils:get_batch_on_this_cp_rank",
                "megatron.core.utils:_get_batch_on_this_cp_rank_per_document_balancing"),
               "layers/context_parallel.py splits a sequence (and each document of a packed one) over CP ranks as "
               "these do, the order megatron's and Transformer Engine's CP attention expect", "f82521cb3091"),
    Dependency("finetune_hides_loss_modules", ("megatron.training.checkpointing:load_checkpoint",),
               "under --finetune it enters the model's hide_loss_modules while building the state dict it loads: a "
               "checkpoint without MTP weights loads (model.Qwen35GPTModel)", "4f03d48a7938"),
    Dependency("mtp_embedding_of_the_vl_model",
               ("megatron.core.transformer.multi_token_prediction:roll_tensor",
                "megatron.core.transformer.multi_token_prediction:MultiTokenPredictionLayer._get_embeddings",
                "megatron.core.transformer.multi_token_prediction:MultiTokenPredictionBlock.forward",
                "megatron.core.models.gpt.gpt_model:GPTModel._postprocess",
                "megatron.core.transformer.multi_token_prediction:get_mtp_ranks"),
               "vl_mtp_inputs.py: GPTModel hands the MTP block `embedding=`, each MTP layer rolls the ids once and "
               "then calls it; the VL model swaps that callable and rolls its vision slots with the same roll; the "
               "MTP layer sits on the last stage unless a layout says otherwise", "62dde65ca604"),
    Dependency("rerun_state_machine_checks",
               ("megatron.core.rerun_state_machine:RerunStateMachine.validate_result",
                "megatron.core.rerun_state_machine:RerunStateMachine.is_unexpectedly_large"),
               "training/steps.loss_func runs pretrain_gpt's NaN / Inf / spiky-loss checks through them",
               "ead757101879"),
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
    """Apply the UPSTREAM_BUG and UPSTREAM_COST rows, and the NO_CUDA rows where CUDA is absent; idempotent. Returns
    what is applied."""
    without_cuda = not torch.cuda.is_available() if without_cuda is None else without_cuda
    rows = [p for p in PATCHES if p.kind != NO_CUDA or without_cuda]
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


def missing_patches(*, without_cuda: bool | None = None) -> list[str]:
    """The rows this machine needs (as `apply_patches` chooses them) that this process has not applied."""
    without_cuda = not torch.cuda.is_available() if without_cuda is None else without_cuda
    return [p.name for p in PATCHES if (p.kind != NO_CUDA or without_cuda) and p.name not in _APPLIED]


def applied_patches() -> list[str]:
    """Names of the patches applied in this process, in order."""
    return list(_APPLIED)


__all__ = ["NO_CUDA", "UPSTREAM_BUG", "UPSTREAM_COST", "WRITTEN_FOR", "Patch", "PATCHES", "Dependency", "DEPENDENCIES",
           "apply_patches", "applied_patches", "missing_patches", "version_mismatches"]
