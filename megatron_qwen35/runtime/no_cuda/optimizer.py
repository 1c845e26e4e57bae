"""The optimizers (megatron.core.optimizer) beyond their ``device="cuda"`` literals (literals.py).

The distributed and fp16/bf16 optimizers and clip_grads check ``param.type() == 'torch.cuda.FloatTensor'``: within
exactly those functions a CPU tensor names the CUDA type. The distributed optimizer over torch Adam (no TE/apex)
mishandles Adam's per-parameter "step" before the first step and on load: its state_dict / load_state_dict fix that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megatron_qwen35.runtime.patching import replace as _replace

# --------------------------------------------------------------------------------------
# type() == 'torch.cuda.FloatTensor' checks
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# The distributed optimizer over torch.optim.Adam: its per-parameter "step"
# --------------------------------------------------------------------------------------


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


def _make_distopt_set_states(orig: Callable) -> Callable:
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        # The fully reshardable format's loader hands over every state but torch Adam's "step" (kept as a tensor in
        # the param's state only without TE/apex), then copies each state tensor the param holds: keep its step
        # (load_state_dict above sets it to the checkpoint's).
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if isinstance(step, torch.Tensor):
                tensors = {**tensors, "step": step.clone()}
        return orig(self, model_param, tensors)

    set_main_param_and_optimizer_states.__wrapped__ = orig
    return set_main_param_and_optimizer_states


def patch_distopt_torch_adam_step() -> None:
    # The distributed optimizer's state_dict / load_state_dict handle torch.optim.Adam's "step"
    # (the no-TE/no-apex fallback) wrongly before the first step and after a load, and its fully reshardable loader
    # has no step to hand over; see above.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if not hasattr(setter, "__wrapped__"):
        _replace(DistributedOptimizer, "_set_main_param_and_optimizer_states", _make_distopt_set_states(setter))

    if not hasattr(DistributedOptimizer.state_dict, "__wrapped__"):
        _replace(DistributedOptimizer, "state_dict", _make_distopt_state_dict(DistributedOptimizer.state_dict))
    if not hasattr(DistributedOptimizer.load_state_dict, "__wrapped__"):
        _replace(DistributedOptimizer, "load_state_dict",
                 _make_distopt_load_state_dict(DistributedOptimizer.load_state_dict))
