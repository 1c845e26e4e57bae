"""Needless costs of megatron-core 0.19.2 that change no result: removed on every machine (register.py's UPSTREAM_COST
rows), each the smallest change that keeps the upstream function's outputs as they were.
"""

from __future__ import annotations

import functools
import queue


def _save_with_results_in_process(save):
    @functools.wraps(save)
    def save_with_results_in_process(self, sharded_state_dict, checkpoint_dir):
        """A synchronous save writes and collects its results in this process: they pass through a plain queue.

        megatron's writer hands its results over a `multiprocessing.Manager().Queue()` (filesystem_async.
        get_write_results_queue), made for asynchronous saves whose writer runs in another process. The first save of
        a process, synchronous ones included, starts that manager with 'spawn': a server process per rank that imports
        torch to unpickle the results. Measured on CPU, tiny model at TP2: the first save-checkpoint 3.1-3.8 s with the
        manager, 0.45-0.65 s without. Asynchronous saves (`async_save`, a separate method) keep the manager.
        """
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        shared = filesystem_async._results_queue
        filesystem_async._results_queue = queue.Queue()  # what get_write_results_queue hands the writer
        try:
            return save(self, sharded_state_dict, checkpoint_dir)
        finally:
            filesystem_async._results_queue = shared

    return save_with_results_in_process


def remove_results_manager_from_synchronous_saves() -> None:
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_qwen35.runtime.patching import replace

    if not hasattr(TorchDistSaveShardedStrategy.save, "__wrapped__"):
        replace(TorchDistSaveShardedStrategy, "save", _save_with_results_in_process(TorchDistSaveShardedStrategy.save))


__all__ = ["remove_results_manager_from_synchronous_saves"]
