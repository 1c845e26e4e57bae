"""megatron-core 0.19.2 on a machine without CUDA: the adaptations of its CUDA assumptions (megatron.training's are in
training_patches.py; the table of all of them, with their kinds and fingerprints, is register.py).

megatron-core allocates on ``torch.cuda.current_device()``, keeps its RNG streams on the CUDA generator, writes
``device="cuda"`` literals, and uses CUDA streams/events. None of that exists on a CPU-only host, where each of those
calls raises. The functions below redirect exactly those spots to the CPU; each is idempotent and replaces attributes
through `patching.replace` (site-packages is never edited).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from megatron_qwen35.runtime.patching import replace as _replace

_CPU = torch.device("cpu")


def _cpu_if_cuda(device: Any) -> Any:
    """Map any CUDA device spec ("cuda", "cuda:0", torch.device("cuda"), an int) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):  # a bare int means a CUDA ordinal to torch factories
        return _CPU
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


class CpuTorchProxy:
    """Stand-in for the ``torch`` module inside one megatron module: factory functions given
    ``device="cuda"`` allocate on the CPU instead, ``torch.cuda`` is `cuda` when one is given (megatron.training's
    modules get a CPU stand-in, training_patches.CPU_CUDA); everything else is the real ``torch``."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self, real_torch, cuda=None):
        self._real = real_torch
        self._cuda = cuda

    def __getattr__(self, name):
        if name == "cuda" and self._cuda is not None:
            return self._cuda
        attr = getattr(self._real, name)
        if name in self._FACTORIES:

            def factory(*args, _f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_if_cuda(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        return attr


# --------------------------------------------------------------------------------------
# torch.cuda entry points that megatron calls unconditionally
# --------------------------------------------------------------------------------------


def _cpu_current_device():
    return _CPU


def patch_torch_cuda_current_device() -> None:
    # megatron allocates with device=torch.cuda.current_device() in ~100 places (mappings, layers,
    # rotary, p2p, global memory buffer, router, ...); without CUDA that raises, so resolve to CPU.
    _replace(torch.cuda, "current_device", _cpu_current_device)


def _noop(*args, **kwargs):
    return None


def patch_torch_cuda_synchronize() -> None:
    # p2p_communication, dist_checkpointing (filesystem_async, fully_parallel, async_utils) and
    # parallel_state call torch.cuda.synchronize(); on CPU every op is already synchronous.
    _replace(torch.cuda, "synchronize", _noop)


class _CpuStream:
    """What torch.cuda.current_stream() returns on CPU: every wait/sync is already satisfied."""

    device = _CPU

    def wait_event(self, event=None):
        return None

    def wait_stream(self, stream=None):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return None

    def query(self):
        return True


_CPU_STREAM = _CpuStream()


def _cpu_current_stream(device=None):
    return _CPU_STREAM


def patch_torch_cuda_current_stream() -> None:
    # DDP's grad sync (param_and_grad_buffer.start_grad_sync) waits on
    # torch.cuda.current_stream() for CUDA-graph events every step; on CPU there is one stream.
    _replace(torch.cuda, "current_stream", _cpu_current_stream)


# --------------------------------------------------------------------------------------
# RNG tracker (tensor_parallel.random): keep the "CUDA" RNG streams on the CPU generator
# --------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add, drawing the named state from the CPU generator."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig_rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig_rng_state)


@contextlib.contextmanager
def _cpu_tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator. Same bookkeeping as upstream, minus the
    'CPU RNG state changed within GPU RNG context' warning, which on CPU fires on every fork."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_state_name = self._current_state_name
    if orig_state_name != "default-rng":
        self.states_[orig_state_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the desired "
                f"state name {name}."
            )
        self.states_[name] = torch.get_rng_state()
        if orig_state_name != "default-rng":
            orig_state = self.states_[orig_state_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_state_name


def _make_cpu_model_parallel_seed(orig: Callable) -> Callable:
    def model_parallel_cuda_manual_seed(seed, *args, **kwargs):
        # Upstream seeds the default CUDA generator with `seed`; on CPU seed the CPU one instead
        # (the tracker's add() saves/restores it, so this is the state left after the call).
        torch.manual_seed(seed)
        return orig(seed, *args, **kwargs)

    model_parallel_cuda_manual_seed.__wrapped__ = orig
    return model_parallel_cuda_manual_seed


def patch_rng_tracker() -> None:
    # All layer init (use_cpu_initialization included) and dropout run inside
    # get_cuda_rng_tracker().fork(); its states live on the CUDA generator, which does not exist.
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
    _replace(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
    _replace(mrandom.CudaRNGStatesTracker, "add", _cpu_tracker_add)
    _replace(mrandom.CudaRNGStatesTracker, "fork", _cpu_tracker_fork)
    if not hasattr(mrandom.model_parallel_cuda_manual_seed, "__wrapped__"):
        wrapped = _make_cpu_model_parallel_seed(mrandom.model_parallel_cuda_manual_seed)
        _replace(mrandom, "model_parallel_cuda_manual_seed", wrapped)
        # re-exported by name from megatron.core.tensor_parallel
        _replace(tensor_parallel, "model_parallel_cuda_manual_seed", wrapped)


# --------------------------------------------------------------------------------------
# "cuda" string literals
# --------------------------------------------------------------------------------------


def patch_cuda_literals() -> None:
    # These modules build tensors with a literal device="cuda": schedules (total_num_tokens),
    # transformer.utils (default causal / sliding-window masks used by the local softmax),
    # dist_checkpointing's state_dict_saver (plan-reuse check). Give each a torch proxy.
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    for module in (schedules, transformer_utils, state_dict_saver):
        if not isinstance(module.torch, CpuTorchProxy):
            _replace(module, "torch", CpuTorchProxy(torch))


# --------------------------------------------------------------------------------------
# MoE alltoall token dispatcher
# --------------------------------------------------------------------------------------


class _NoStream:
    """Placeholder for MoEAlltoAllTokenDispatcher.cuda_dtoh_stream (a class attribute that its
    __init__ would otherwise fill with torch.cuda.Stream())."""


def _as_host(value, as_numpy=False):
    # Upstream moves split sizes with .to('cpu', non_blocking=True).numpy() only if they are CUDA
    # tensors; on CPU they stay tensors, which all_to_all_single rejects as split sizes.
    if torch.is_tensor(value) and as_numpy:
        return value.numpy()
    return value


def _cpu_maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA streams/events."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _as_host(self.input_splits, as_numpy=True)
        self.output_splits = _as_host(self.output_splits, as_numpy=True)
        self.output_splits_tp = _as_host(self.output_splits_tp, as_numpy=True)
    return tokens_per_expert


def patch_moe_alltoall_dispatcher() -> None:
    # The alltoall dispatcher creates a CUDA stream in __init__ and moves split sizes to host on
    # that stream; on CPU skip the stream and turn the split tensors into numpy like upstream.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        _replace(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _NoStream())
    _replace(
        MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", _cpu_maybe_dtoh_and_synchronize
    )


# --------------------------------------------------------------------------------------
# Uneven first-dim collectives (gloo)
# --------------------------------------------------------------------------------------


def _make_uneven_gather(orig: Callable) -> Callable:
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        # gloo's all_gather needs equal shapes; pad every rank to the largest split, gather, trim.
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        chunks = gathered.split(longest, dim=0)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)], dim=0)

    _gather_along_first_dim.__wrapped__ = orig
    return _gather_along_first_dim


def _make_uneven_reduce_scatter(orig: Callable) -> Callable:
    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        # gloo's reduce_scatter needs equal shapes; all-reduce the whole tensor, keep our slice.
        if input_split_sizes is None or group.size() == 1:
            return orig(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        reduced = input_.contiguous().clone()
        torch.distributed.all_reduce(reduced, group=group)
        start = sum(sizes[: group.rank()])
        return reduced[start : start + sizes[group.rank()]].contiguous()

    _reduce_scatter_along_first_dim.__wrapped__ = orig
    return _reduce_scatter_along_first_dim


def patch_uneven_first_dim_collectives() -> None:
    # MoE alltoall with TP>1 gathers/reduce-scatters variable token counts over the TP group
    # (output_split_sizes / input_split_sizes); gloo rejects unequal tensor lists.
    from megatron.core.tensor_parallel import mappings

    if not hasattr(mappings._gather_along_first_dim, "__wrapped__"):
        _replace(
            mappings, "_gather_along_first_dim", _make_uneven_gather(mappings._gather_along_first_dim)
        )
    if not hasattr(mappings._reduce_scatter_along_first_dim, "__wrapped__"):
        _replace(
            mappings,
            "_reduce_scatter_along_first_dim",
            _make_uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim),
        )


# --------------------------------------------------------------------------------------
# jit_fuser == torch.compile
# --------------------------------------------------------------------------------------


def patch_disable_dynamo() -> None:
    # megatron.core.jit.jit_fuser is torch.compile and was bound at import time in many modules;
    # compiling on CPU needs a C toolchain and is slow, so turn dynamo off (same as
    # TORCHDYNAMO_DISABLE=1, which tests also export before importing torch).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo

    torch._dynamo.config.disable = True


# --------------------------------------------------------------------------------------
# Optimizers (megatron.core.optimizer): FP32/mixed-precision, distributed, grad clipping
# --------------------------------------------------------------------------------------


def patch_optimizer_cuda_literals() -> None:
    # The optimizers allocate their scale / found-inf / overflow flags, clip_grads its norm and
    # zero-count accumulators, and the grad scaler its factors with a literal device="cuda".
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as optimizer_module

    for module in (optimizer_module, clip_grads, grad_scaler):
        if not isinstance(module.torch, CpuTorchProxy):
            _replace(module, "torch", CpuTorchProxy(torch))


def _cpu_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron.core.utils.local_multi_tensor_l2_norm (the no-TE/no-apex fallback) without its
    device="cuda" result: the l2 norm of the per-tensor l2 norms, as a 1-element fp32 tensor."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros([])
    return total.reshape(1).to(torch.float), None


def patch_grad_norm_fallback() -> None:
    # Without Transformer Engine and apex, clip_grads uses megatron's local l2-norm fallback,
    # which returns its result on device="cuda"; give clip_grads a CPU one.
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        _replace(clip_grads, "l2_norm_impl", _cpu_multi_tensor_l2_norm)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_report_cuda_type_names():
    """Within the block, ``tensor.type()`` (no argument) of a CPU tensor names the CUDA type."""
    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = real_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real_type


def _with_cuda_type_names(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with _cpu_tensors_report_cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    return wrapper


def patch_cuda_type_name_checks() -> None:
    # The distributed optimizer sorts params by `param.type() == 'torch.cuda.FloatTensor'` (and
    # Half/BFloat16) in __init__ and raises TypeError for anything else; the fp16/bf16 optimizer
    # does the same; clip_grads asserts it. CPU tensors report 'torch.FloatTensor', so within
    # exactly those functions type() names the CUDA type.
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        init = cls.__dict__["__init__"]
        if not hasattr(init, "__wrapped__"):
            _replace(cls, "__init__", _with_cuda_type_names(init))
    clip = clip_grads.clip_grad_by_total_norm_fp32
    if not hasattr(clip, "__wrapped__"):
        clip = _with_cuda_type_names(clip)
        _replace(clip_grads, "clip_grad_by_total_norm_fp32", clip)
        _replace(optimizer_module, "clip_grad_by_total_norm_fp32", clip)  # imported there by name


def _make_distopt_state_dict(orig: Callable) -> Callable:
    def state_dict(self):
        # Without TE/apex the distributed optimizer wraps torch.optim.Adam and reads the iteration
        # from its per-parameter "step" entries, asserting there is exactly one. Before the first
        # step (a fresh optimizer about to load a checkpoint) there are none: report step 0.
        from megatron.core.optimizer import distrib_optimizer

        inner = self.optimizer
        if distrib_optimizer.HAVE_APEX_OR_TE or any("step" in s for s in inner.state.values()):
            return orig(self)
        real_state_dict = inner.state_dict

        def with_step_zero():
            sd = real_state_dict()
            sd["state"] = {0: {"step": torch.tensor(0.0)}}  # read for the step only, then dropped
            return sd

        inner.state_dict = with_step_zero
        try:
            return orig(self)
        finally:
            del inner.state_dict

    state_dict.__wrapped__ = orig
    return state_dict


def _make_distopt_load_state_dict(orig: Callable) -> Callable:
    def load_state_dict(self, state_dict):
        # Without TE/apex, upstream (a) gives every parameter's torch Adam state the *same* "step"
        # tensor, which torch Adam then increments once per parameter, and (b) with the
        # dp_reshardable format copies the loading template's step (0) back over it. Re-set each
        # parameter's step to its own tensor holding the checkpoint's iteration.
        # no_grad: with fp32 params the main params are views of the model params, and the
        # loader's in-place copy_ into them raises under autograd.
        from megatron.core.optimizer import distrib_optimizer

        with torch.no_grad():
            out = orig(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return out
        groups = (state_dict.get("optimizer") or {}).get("param_groups", [])
        steps = {float(g["step"]) for g in groups if g.get("step") is not None}
        if len(steps) == 1:
            step = steps.pop()
            for param_state in self.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = torch.tensor(step, dtype=torch.float32)
        return out

    load_state_dict.__wrapped__ = orig
    return load_state_dict


def patch_distopt_torch_adam_step() -> None:
    # The distributed optimizer's state_dict / load_state_dict handle torch.optim.Adam's "step"
    # (the no-TE/no-apex fallback) wrongly before the first step and after a load; see above.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not hasattr(DistributedOptimizer.state_dict, "__wrapped__"):
        _replace(DistributedOptimizer, "state_dict", _make_distopt_state_dict(DistributedOptimizer.state_dict))
    if not hasattr(DistributedOptimizer.load_state_dict, "__wrapped__"):
        _replace(DistributedOptimizer, "load_state_dict",
                 _make_distopt_load_state_dict(DistributedOptimizer.load_state_dict))


# --------------------------------------------------------------------------------------
# Pipeline parallelism: the embedding copy on the last stage
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, ``tensor.cuda()`` returns the (CPU) tensor itself."""
    real_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda


def patch_pipeline_embedding_copy() -> None:
    # With PP > 1 the last stage holds a copy of the word embeddings (tied output layer, or the
    # MTP block's embedding); LanguageModule.setup_embeddings_and_output_layer moves it with
    # `weight.data.cuda()` before the all-reduce that syncs it with the first stage.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer
    if not hasattr(setup, "__wrapped__"):
        def setup_embeddings_and_output_layer(self):
            with tensor_cuda_is_identity():
                return setup(self)

        setup_embeddings_and_output_layer.__wrapped__ = setup
        _replace(LanguageModule, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)


# --------------------------------------------------------------------------------------
# Context parallelism: this rank's slice of the rotary table
# --------------------------------------------------------------------------------------


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """rope_utils.get_pos_emb_on_this_cp_rank without its pinned index tensor and ``.cuda()`` copy: the rows of
    this rank's load-balanced chunks (r and 2CP-1-r), from the one place that computes that split."""
    from megatron_qwen35.layers.context_parallel import load_balanced_positions

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    positions = load_balanced_positions(pos_emb.size(seq_dim), cp_group.size(), device=pos_emb.device)
    return pos_emb.index_select(seq_dim, positions[cp_group.rank()])


def patch_rope_context_parallel_slice() -> None:
    # With CP > 1 the rotary table is cut to this rank's chunks through an index tensor built with
    # pin_memory=True and moved with .cuda(): both need a CUDA driver. The function is imported by name into the
    # rotary modules, so each binding is replaced.
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        _replace(module, "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank)


# --------------------------------------------------------------------------------------
# megatron.training's argument check: the GPU generation
# --------------------------------------------------------------------------------------


def _no_stream_ordering_arch() -> int:
    """What validate_args may know of the CPU: no CUDA streams, so none of Hopper's ordering requirements (10 is
    the first generation without them)."""
    return 10


def patch_training_device_arch() -> None:
    # validate_args asks torch.cuda for the GPU generation when TP > 1 or CP > 1, to demand
    # CUDA_DEVICE_MAX_CONNECTIONS=1 before Blackwell (kernel ordering on CUDA streams); without CUDA that raises.
    from megatron.training import arguments

    _replace(arguments, "get_device_arch_version", _no_stream_ordering_arch)
