"""The model-parallel RNG tracker (megatron.core.tensor_parallel.random) on the CPU generator.

All layer initialisation and dropout run inside ``get_cuda_rng_tracker().fork()``, whose named states live on the CUDA
generator; here they are kept, forked and seeded on the CPU one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megatron_qwen35.runtime.patching import replace as _replace


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
