"""Runtime setup: the register of run-time patches, device selection, torch.distributed + megatron model-parallel state.

Public API:
    apply_runtime_patches()  the register's patches: upstream-bug fixes everywhere, the no-CUDA adaptations of
                             megatron-core and megatron.training where CUDA is absent (idempotent; register.py);
                             only entry points and library callers apply them, never an import or a build
    check_runtime_patches(doing)  raise, naming that call, where a needed patch is missing
    initialize_parallel(...) torch.distributed + parallel_state + RNG tracker (tests, load_model, converters)
    destroy_parallel()       tear down parallel_state (and the process group we created)
    one_rank_world()         a one-rank parallel state for a meta build, gone afterwards (launch checks)
    compute_device()         cuda current device, else cpu
    transformer_engine_available()  whether Transformer Engine imports here (GPU nodes with TE installed)
    transformer_engine_import_error()  why it does not (the error a run that chose TE reports)
    free_local_port()        a free port for a local rendezvous, outside the kernel's ephemeral range
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

from megatron_qwen35.runtime import no_cuda, register

__all__ = [
    "apply_runtime_patches",
    "check_runtime_patches",
    "initialize_parallel",
    "destroy_parallel",
    "one_rank_world",
    "compute_device",
    "transformer_engine_available",
    "transformer_engine_import_error",
    "free_local_port",
    "no_cuda",
    "register",
]

# The (layout, seed) that initialize_parallel last set up, or None.
_CURRENT_LAYOUT: tuple | None = None
# True when initialize_parallel created the default process group (so destroy_parallel owns it).
_OWNS_PROCESS_GROUP = False


def apply_runtime_patches() -> list[str]:
    """Apply the register's patches for this machine (see register.apply_patches); safe to call repeatedly."""
    return register.apply_patches()


def check_runtime_patches(doing: str) -> None:
    """Raise, naming the call to make, when this process lacks a register row this machine needs for `doing`.
    Nothing in the package applies the register on its own (a program that embeds it keeps megatron as it was):
    the entry points (pretrain_qwen35.py, the tools, load_model, initialize_parallel) do, and so does a library
    caller, once, with `apply_runtime_patches()`."""
    missing = register.missing_patches()
    if missing:
        raise RuntimeError(f"{doing} needs megatron_qwen35's run-time patches on this machine ({', '.join(missing)}); "
                           "call megatron_qwen35.runtime.apply_runtime_patches() once first (the project's entry "
                           "points do)")


def compute_device() -> torch.device:
    """The device tensors should live on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def transformer_engine_import_error() -> Exception | None:
    """Why Transformer Engine does not import on this machine, or None when it does (it raises its own errors, not
    only ImportError, where CUDA or its libraries are missing)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the failure is the answer
        return e
    return None


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports on this machine."""
    return transformer_engine_import_error() is None


def free_local_port() -> int:
    """A free TCP port on 127.0.0.1 for a rendezvous (MASTER_PORT), below the kernel's ephemeral range.

    The usual trick, binding port 0 and closing the socket, hands out a port from the ephemeral range, which the kernel
    gives again to any outgoing connection (gloo's pair connections, another run's store clients) before the
    launcher binds it: EADDRINUSE, seen in this suite with two workers. Ports below the range are only ever taken by
    an explicit bind, so a random one that binds now stays free unless another launcher draws the same one."""
    import random

    low = 32768  # Linux's default, where /proc does not say
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # drawn from the OS's entropy: the random module's own state is seeded alike in every rank and test worker
    candidates = random.SystemRandom().sample(range(10000, low), min(100, low - 10000)) if low > 10000 else []
    for port in [*candidates, 0]:  # 0: the kernel's choice, where nothing below the range binds
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


def _init_process_group() -> None:
    """Create the default process group from env (RANK/WORLD_SIZE/MASTER_*), or as a single
    process with an in-process store when the env does not describe a job."""
    global _OWNS_PROCESS_GROUP
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size
        )
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        # a one-rank world needs no rendezvous: an in-process store, no port to race for
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                             world_size=1)
    _OWNS_PROCESS_GROUP = True


def initialize_parallel(
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    context_parallel: int = 1,
    seed: int = 1234,
) -> None:
    """Initialise torch.distributed and megatron's model-parallel state and RNG tracker.

    Same layout and seed as the previous call: no-op. Same layout, other seed: only re-seeds.
    Other layout: destroys and re-creates the model-parallel state (the process group stays).
    """
    global _CURRENT_LAYOUT
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp

    apply_runtime_patches()
    _init_process_group()

    layout = (
        tensor_parallel,
        pipeline_parallel,
        virtual_pipeline_parallel,
        expert_parallel,
        expert_tensor_parallel,
        context_parallel,
    )
    initialized = parallel_state.model_parallel_is_initialized()
    if initialized and _CURRENT_LAYOUT is not None and _CURRENT_LAYOUT[0] == layout:
        if _CURRENT_LAYOUT[1] != seed:
            mtp.model_parallel_cuda_manual_seed(seed)
            _CURRENT_LAYOUT = (layout, seed)
        return
    from megatron_qwen35.parallel_layout import check_world_size

    check_world_size(torch.distributed.get_world_size(), tensor_parallel=tensor_parallel,
                     pipeline_parallel=pipeline_parallel, context_parallel=context_parallel,
                     expert_parallel=expert_parallel, expert_tensor_parallel=expert_tensor_parallel)
    if initialized:
        parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    # Looked up on the package at call time so the CPU wrapper (if applied) is used.
    mtp.model_parallel_cuda_manual_seed(seed)
    _CURRENT_LAYOUT = (layout, seed)


@contextlib.contextmanager
def one_rank_world(seed: int = 1234):
    """megatron's model-parallel state for a one-process build (a model on the meta device whose keys and shapes are
    read, e.g. by the launch check), gone afterwards. Where a one-rank state already exists it is used as it is.
    Otherwise a one-rank gloo group on an in-memory store (no port, no file; a torchrun job's environment is not
    read) is created and destroyed with megatron's state, so a later `initialize_megatron` sets up the job's own; the
    process's random streams and megatron's RNG tracker are left as they were."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp

    check_runtime_patches("a one-rank model build")
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size())
        if sizes != (1, 1, 1, 1):
            raise RuntimeError(f"a one-rank build needs one-rank parallel state; TP, PP, EP, CP = {sizes} is set up")
        yield
        return
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError("a one-rank build inside a job of several ranks needs its model-parallel state set up")
    parallel_state.initialize_model_parallel()
    tracker = mtp.get_cuda_rng_tracker()
    tracker_states = tracker.get_states() if tracker.is_initialized() else None
    try:
        # the build's seed stays the build's: the caller's random streams (CPU, CUDA) and megatron's RNG tracker
        # come back as they were
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            mtp.model_parallel_cuda_manual_seed(seed)
            yield
    finally:
        if tracker_states is None:
            tracker.reset()
        else:
            tracker.set_states(tracker_states)
        parallel_state.destroy_model_parallel()
        if owns_group:
            torch.distributed.destroy_process_group()


def destroy_parallel() -> None:
    """Destroy megatron's model-parallel state, and the default process group if we created it."""
    global _CURRENT_LAYOUT, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _CURRENT_LAYOUT = None
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
