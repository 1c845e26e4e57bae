"""Checkpoint conversion speed and memory against a plain file copy of the same bytes, on a 4b-shaped checkpoint.

    python benchmarks/convert.py [--layers 8] [--repeat 5] [--cold-source] [--workdir /tmp] [--keep]

Builds a synthetic Hugging Face checkpoint with the real names and shapes of `qwen35_preset("4b")` (random bf16, its
MTP layer included; `--layers 32` is the full ~9 GB model, the default depth runs in a few minutes), then for each
direction prints throughput / copy throughput (goal >= 0.8; the median of --repeat alternating copy / conversion
pairs, both ending in a sync; `--cold-source` makes both read the source from the disk) and the converting process's
peak RSS (goal <= 2 GB + 2 x the largest tensor, sampled with psutil every 10 ms). Each conversion runs in a fresh
process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

GB = 1024**3


def _synthetic_hf(path: Path, layers: int) -> tuple[int, int]:
    """Random bf16 tensors with the 4b preset's names and shapes; returns (total bytes, largest tensor bytes)."""
    import torch

    from megatron_qwen35.config import qwen35_config_to_hf, qwen35_preset
    from megatron_qwen35.convert.megatron_keys import MegatronLayout
    from megatron_qwen35.convert.safetensors_files import PlannedTensor, SafetensorsShardWriter, ShardPlan
    from megatron_qwen35.convert.table import HFLayout, hf_shapes

    # text-only (the figures in docs were measured so; with the preset's tower the names would need its VL layout)
    cfg = qwen35_preset("4b").replace(num_layers=layers, vision=None)
    rules = HFLayout().rules(cfg)
    shapes = hf_shapes(rules, MegatronLayout(cfg).shape, cfg)
    plan = [PlannedTensor(n, torch.bfloat16, shapes[n]) for r in rules for n in r.hf]
    path.mkdir(parents=True)
    writer = SafetensorsShardWriter(path, ShardPlan.split(plan, "5GB"))
    base = torch.randn(32 * 1024**2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 64 MB
    for p in plan:
        n = math.prod(p.shape)
        data = base[:n] if n <= base.numel() else base.repeat(math.ceil(n / base.numel()))[:n]
        writer.write(p.name, data.reshape(p.shape))
    writer.close()
    (path / "config.json").write_text(json.dumps(qwen35_config_to_hf(cfg), indent=2))
    return sum(p.nbytes for p in plan), max(p.nbytes for p in plan)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _drop_from_page_cache(path: Path) -> None:
    """Evict `path`'s files from the page cache (after writing back what is dirty), so that the next reader reads
    the disk, as it does for a checkpoint larger than memory."""
    os.sync()
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _copy_seconds(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def _convert(direction: str, src: str, dst: str, queue) -> None:
    """Child process: one conversion, timed from the call, with this process's peak RSS. Imports and the
    one-process group are set up first and timed apart: a fixed cost, not a per-byte one."""
    start = time.perf_counter()
    import megatron_qwen35.provider  # noqa: F401  (megatron-core, transformers)
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel()
    setup = time.perf_counter() - start
    if direction == "hf_to_megatron":
        from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron as convert
    else:
        from megatron_qwen35.convert.megatron_to_hf import qwen35_megatron_to_hf as convert
    import psutil

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():  # ru_maxrss would report the parent's RSS: Linux keeps it across the spawn's exec
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    convert(src, dst, progress=False)
    os.sync()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    queue.put((seconds, setup, max(peak[0], me.memory_info().rss)))


def _run(direction: str, src: Path, dst: Path) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_convert, args=(direction, str(src), str(dst), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder depth (the 4b preset has 32)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--cold-source", action="store_true",
                        help="evict the source from the page cache before each copy and each conversion (default: "
                             "both read it from the cache, where the previous step left it)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="copy / conversion pairs per direction; the median ratio is reported (noisy machines)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="qwen35-convert-bench-", dir=args.workdir))
    try:
        t = time.perf_counter()
        total, largest = _synthetic_hf(root / "hf", args.layers)
        print(f"synthetic 4b-shaped checkpoint: {args.layers} of 32 layers + MTP, bf16, {total / GB:.2f} GiB, "
              f"largest tensor {largest / GB:.2f} GiB (built in {time.perf_counter() - t:.0f} s)")
        rss_goal = 2 * GB + 2 * largest
        steps = [("hf_to_megatron", root / "hf", root / "mg"), ("megatron_to_hf", root / "mg", root / "out")]
        for direction, src, dst in steps:
            nbytes = _dir_bytes(src)
            pairs = []
            for i in range(args.repeat):  # copy and conversion alternate, so slow phases of the machine hit both
                if i:
                    shutil.rmtree(dst)
                if args.cold_source:
                    _drop_from_page_cache(src)
                copy = _copy_seconds(src, root / "copy")
                if args.cold_source:
                    _drop_from_page_cache(src)
                pairs.append((copy, *_run(direction, src, dst)))
            ratios = [copy / seconds for copy, seconds, _, _ in pairs]  # same bytes: throughput ratio == time ratio
            copy, seconds, setup, rss = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]  # the median pair
            rss = max(p[3] for p in pairs)
            ratio = copy / seconds
            print(f"{direction}: {nbytes / GB:.2f} GiB in {seconds:.1f} s ({nbytes / GB / seconds:.2f} GiB/s); "
                  f"plain copy {copy:.1f} s ({nbytes / GB / copy:.2f} GiB/s); ratio {ratio:.2f} (median of "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; goal >= 0.8, {'met' if ratio >= 0.8 else 'NOT met'}); "
                  f"peak RSS {rss / GB:.2f} GiB (goal <= {rss_goal / GB:.2f} GiB, "
                  f"{'met' if rss <= rss_goal else 'NOT met'}); start-up (imports + process group) {setup:.1f} s "
                  "before that")
    finally:
        if args.keep:
            print(f"checkpoints kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
