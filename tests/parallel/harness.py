"""Multi-process test harness: run a function on N local ranks (gloo on CPU, nccl on GPU).

    results = run_distributed(fn, 2, arg, key=value)

``fn(rank, world_size, *args, **kwargs)`` must be a module-level (picklable) function. Each child
gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT plus TORCHDYNAMO_DISABLE=1 and
OMP_NUM_THREADS=1 in its environment *before* it imports anything (set at spawn time), so
``megatron_qwen35.runtime.initialize_parallel()`` picks the job up from the env.

Return values come back by value (pickled to bytes in the child), so tensors should be small;
they are moved to CPU first. A child exception is re-raised in the parent with the child's
traceback attached; a hung rank (e.g. waiting in a collective for a dead peer) is killed after
``timeout`` seconds and reported as TimeoutError.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

# How long surviving ranks may keep running after another rank failed (to report their own error).
_GRACE_AFTER_FAILURE_S = 3.0


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback; set as __cause__ of the re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _child(fn: Callable, rank: int, world_size: int, args, kwargs, results) -> None:
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


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` spawned processes and return
    the per-rank results (index = rank). Raises the first failing rank's exception (with the
    child traceback as its cause), or TimeoutError if the ranks do not finish within ``timeout``."""
    __tracebackhide__ = True  # pytest: show the child traceback, not this function's source
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    child_env = {
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHDYNAMO_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }

    # A spawned child inherits os.environ as it is at start(); set it there so the values are
    # visible before the child imports torch (dynamo reads TORCHDYNAMO_DISABLE at import).
    saved = {k: os.environ.get(k) for k in list(child_env) + ["RANK", "LOCAL_RANK"]}
    procs = []
    try:
        for rank in range(world_size):
            os.environ.update(child_env, RANK=str(rank), LOCAL_RANK=str(rank))
            p = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, args, kwargs, results),
                name=f"rank{rank}",
                # not a daemon: dist_checkpointing (filesystem_async) starts its own helper process
                daemon=False,
            )
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

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
