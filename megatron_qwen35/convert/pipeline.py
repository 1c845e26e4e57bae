"""The path every tensor of a conversion takes, in both directions: jobs (one table rule each) run in parallel lanes
under a memory budget, each tensor is checked for NaN / Inf, and a bar counts the bytes.

Why lanes: a conversion is bound by the disk and by copying bytes. One thread leaves the disk idle while it transforms
and the CPU idle while it writes. Each lane is a thread that works through its share of the rules in order (on import
it appends to its own data file), so reading, transforming and writing overlap and several files stream at once.
Rules are dealt to lanes by size alone, so the output does not depend on timing.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

GiB = 1024**3
DEFAULT_LANES = max(2, min(8, os.cpu_count() or 1))  # disk waits leave a core free, so at least two
SPARE_MEMORY = GiB  # bytes of other rules in flight beside the largest one

class _MemoryBudget:
    """At most `capacity` bytes held by running jobs; a job larger than that waits until it can run alone."""

    def __init__(self, capacity: int):
        self._capacity, self._held, self.failed = capacity, 0, False
        self._room = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        with self._room:
            self._room.wait_for(lambda: self.failed or self._held == 0 or self._held + nbytes <= self._capacity)
            if self.failed:
                return False
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._room:
            self._held -= nbytes
            self._room.notify_all()

    def fail(self) -> None:
        with self._room:
            self.failed = True
            self._room.notify_all()


def deal(costs: Sequence[int], lanes: int) -> list[list[int]]:
    """Job indices per lane: each job, in order, to the lane with the fewest bytes so far."""
    out: list[list[int]] = [[] for _ in range(max(1, min(lanes, len(costs))))]
    load = [0] * len(out)
    for i, c in enumerate(costs):
        lane = load.index(min(load))
        out[lane].append(i)
        load[lane] += c
    return out


def run_in_lanes[Job](jobs: Sequence[Job], costs: Sequence[int], work: Callable[[Job, int], list[str] | None], *,
                 lanes: int = DEFAULT_LANES, memory_budget: int | None = None) -> None:
    """`work(job, lane)` for every job; `costs[i]` is the memory job i holds while it runs, and at most
    `memory_budget` bytes of jobs run at once (default: the largest job and SPARE_MEMORY more, so that the largest
    never runs alone and peak memory stays within 2 x the largest tensor plus a constant). The first error stops
    every lane before its next job and is raised here. The notes the jobs return are issued as warnings, in job
    order, once every lane has stopped."""
    budget = _MemoryBudget(memory_budget if memory_budget is not None else max(costs, default=0) + SPARE_MEMORY)
    errors: list[BaseException] = []
    notes: dict[int, list[str]] = {}

    def lane(index: int, share: list[int]) -> None:
        for i in share:
            if not budget.acquire(costs[i]):
                return
            try:
                notes[i] = work(jobs[i], index) or []
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                errors.append(e)
                budget.fail()
                return
            finally:
                budget.release(costs[i])

    threads = [threading.Thread(target=lane, args=(k, share), name=f"convert-lane-{k}", daemon=True)
               for k, share in enumerate(deal(costs, lanes))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timeout keeps Ctrl-C deliverable to this thread
    except BaseException:
        budget.fail()
        for t in threads:
            t.join()
        raise
    for i in sorted(notes):
        for note in notes[i]:
            warnings.warn(note, stacklevel=3)
    if errors:
        raise errors[0]


def non_finite_note(name: str, tensor: torch.Tensor | Sequence[torch.Tensor], where: object) -> str | None:
    """A note naming `tensor` (or the parts it is stored in) if it holds NaN / Inf. Such weights are carried as they
    are (transformers loads such files too), but a diverged run or a corrupt file should not pass unnoticed."""
    parts = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
    if not all(t.is_floating_point() for t in parts):
        return None
    if all(t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) and torch.isfinite(t.sum())
           for t in parts):
        return None  # NaN and Inf survive a sum; a sum that overflows only costs the exact count below
    bad = sum(int((~torch.isfinite(t.float())).sum()) for t in parts)
    if not bad:
        return None
    numel = sum(t.numel() for t in parts)
    return f"{where}: tensor '{name}' holds {bad} NaN / Inf value(s) of {numel}; carried as they are"


class Progress:
    """A tqdm bar over bytes with a running tensor count, safe to update from several lanes; silent when disabled."""

    def __init__(self, total_bytes: int, desc: str, *, enabled: bool = True):
        from tqdm import tqdm

        self.tensors = 0
        self._lock = threading.Lock()
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, dynamic_ncols=True)

    def update(self, nbytes: int, tensors: int = 1) -> None:
        with self._lock:
            self.tensors += tensors
            self._bar.update(nbytes)
            self._bar.set_postfix(tensors=self.tensors, refresh=False)

    def close(self) -> None:
        self._bar.close()
