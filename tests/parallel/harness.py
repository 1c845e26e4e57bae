"""Multi-process test harness: run a function on N local ranks (gloo on CPU, nccl on GPU).

    results = run_distributed(fn, 2, arg, key=value)

``fn(rank, world_size, *args, **kwargs)`` must be a module-level (picklable) function. Each child
gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment before ``fn`` runs,
so ``megatron_qwen35.runtime.initialize_parallel()`` picks the job up from the env, and one CPU thread.

Children are forked from multiprocessing's forkserver, which imported torch, megatron-core and the
package once (_PRELOAD): a spawned child spent ~5 s of CPU importing them before its function ran,
for every rank of every test. Nothing is initialised in the server (no process group, no patch, no
torch thread pool): each child starts from imported modules only, as a fresh process would after
its imports. TORCHDYNAMO_DISABLE=1, which dynamo reads at import, is set by tests/conftest.py before
the server starts. ``fresh_interpreter=True`` spawns new interpreters instead, for a test that must
set something up before the first import (Triton's interpreter).

Return values come back by value (pickled to bytes in the child), so tensors should be small;
they are moved to CPU first. A child exception is re-raised in the parent with the child's
traceback attached; a hung rank (e.g. waiting in a collective for a dead peer) is killed after
``timeout`` seconds and reported as TimeoutError.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_qwen35.runtime import free_local_port

# How long surviving ranks may keep running after another rank failed (to report their own error).
_GRACE_AFTER_FAILURE_S = 3.0

# What the forkserver imports once for every child (a module that fails to import is skipped by multiprocessing).
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.dist_checkpointing", "transformers",
            "megatron_qwen35.runtime", "megatron_qwen35.provider", "megatron_qwen35.checkpoint",
            "megatron_qwen35.convert.model_state", "tests.parallel.harness"]
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(_PRELOAD)


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback; set as __cause__ of the re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _child(fn: Callable, rank: int, world_size: int, args, kwargs, results, env: dict) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        value = _to_cpu(fn(rank, world_size, *args, **kwargs))
        # Plain pickle (not the ForkingPickler the queue would use) so tensors travel by value
        # and stay valid after this process exits.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # noqa: BLE001 - report everything, incl. SystemExit/KeyboardInterrupt
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
        except Exception:  # unpicklable exception type: send the text only
            payload = None
        results.put((rank, "error", (tb, payload)))
    finally:
        try:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300, fresh_interpreter: bool = False,
                    **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` forked processes and return
    the per-rank results (index = rank). Raises the first failing rank's exception (with the
    child traceback as its cause), or TimeoutError if the ranks do not finish within ``timeout``.
    ``fresh_interpreter``: spawn each rank as a new interpreter that has imported nothing yet (Triton's
    interpreter must be switched on before triton's first import, which megatron-core makes)."""
    __tracebackhide__ = True  # pytest: show the child traceback, not this function's source
    context = mp.get_context("spawn") if fresh_interpreter else _CONTEXT
    results = context.Queue()
    job_env = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_local_port()),
               "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world_size):
        env = {**job_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        # not a daemon: a daemon may not start processes of its own (an asynchronous checkpoint save does)
        p = context.Process(target=_child, args=(fn, rank, world_size, args, kwargs, results, env),
                             name=f"rank{rank}", daemon=False)
        p.start()
        procs.append(p)

    outputs: list[Any] = [None] * world_size
    done = set()
    failure = None  # (rank, tb, payload)
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.5, deadline - now))
            except queue_mod.Empty:
                # A rank that died without reporting (segfault, os._exit, OOM kill).
                for rank, p in enumerate(procs):
                    if rank not in done and not p.is_alive() and p.exitcode not in (0, None):
                        if failure is None:
                            failure = (rank, f"rank {rank} exited with code {p.exitcode}", None)
                        done.add(rank)
                continue
            done.add(rank)
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            elif failure is None:
                failure = (rank, *payload)
                # Peers are probably blocked in a collective with the dead rank: give them a
                # short grace period to report, then stop waiting.
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        for p in procs:
            p.join(timeout=5 if failure is None else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()

    if failure is not None:
        rank, tb, payload = failure
        exc = None
        if payload is not None:
            try:
                exc = pickle.loads(payload)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RuntimeError(f"rank {rank} failed")
        raise exc from RemoteTraceback(f"\n[rank {rank}] child traceback:\n{tb}")
    if len(done) < world_size:
        missing = sorted(set(range(world_size)) - done)
        raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (killed)")
    return outputs
