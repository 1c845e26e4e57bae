"""The conversion's shared machinery: lanes under a memory budget, the NaN / Inf screen, and the safetensors files
(byte-identical to safetensors' own, written in any order, checked complete)."""

import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import MetadataIndex

from megatron_qwen35.convert.pipeline import deal, non_finite_note, run_in_lanes
from megatron_qwen35.convert.safetensors_files import (
    PlannedTensor,
    SafetensorsCheckpoint,
    SafetensorsShardWriter,
    ShardPlan,
)
from megatron_qwen35.convert.torch_dist import TorchDistReader, TorchDistWriter


def test_jobs_are_dealt_by_size_the_same_way_every_time():
    assert deal([5, 1, 1, 1, 4, 2], lanes=2) == [[0, 5], [1, 2, 3, 4]]
    assert deal([1, 1], lanes=8) == [[0], [1]]  # no idle lanes


def test_lanes_respect_the_memory_budget_and_run_every_job_once():
    held, peak, done, lock = [0], [0], [], threading.Lock()

    def work(job, lane):
        with lock:
            held[0] += job
            peak[0] = max(peak[0], held[0])
        time.sleep(0.01)
        with lock:
            held[0] -= job
            done.append(job)

    jobs = [3, 3, 3, 3, 9, 1, 1]  # 9 is larger than the budget: it runs alone
    run_in_lanes(jobs, jobs, work, lanes=4, memory_budget=6)
    assert sorted(done) == sorted(jobs)
    assert peak[0] <= 9


def test_the_first_error_stops_the_lanes_and_is_raised():
    started = []

    def work(job, lane):
        started.append(job)
        if job == 2:
            raise OSError("disk full")
        time.sleep(0.02)

    with pytest.raises(OSError, match="disk full"):
        run_in_lanes(list(range(40)), [1] * 40, work, lanes=2)
    assert len(started) < 40


def test_notes_are_warned_in_job_order():
    with pytest.warns(UserWarning) as record:
        run_in_lanes([0, 1, 2, 3], [1, 1, 1, 1], lambda job, lane: [f"note {job}"], lanes=3)
    assert [str(w.message) for w in record] == ["note 0", "note 1", "note 2", "note 3"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values_are_counted_and_huge_finite_ones_are_not(dtype):
    t = torch.ones(1000, dtype=dtype)
    assert non_finite_note("w", t, "here") is None
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # the sum overflows; the values are finite
    assert non_finite_note("w", big, "here") is None
    t[3], t[7] = float("nan"), float("-inf")
    assert non_finite_note("w", t, "here") == "here: tensor 'w' holds 2 NaN / Inf value(s) of 1000; carried as they are"


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a.A_log": torch.randn(4, generator=g),
            "c.norm": torch.randn(7, generator=g).half(), "a.bias": torch.randn(2, 2, generator=g).bfloat16()}


def test_a_shard_written_in_any_order_is_byte_identical_to_safetensors_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"format": "pt"})
    plan = ShardPlan({"got.safetensors": [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]},
                     None)
    writer = SafetensorsShardWriter(tmp_path, plan)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def test_the_shard_writer_refuses_a_stray_a_repeated_or_a_missing_tensor(tmp_path):
    tensors = _tensors()
    plan = ShardPlan.split([PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 40)
    assert plan.index_text is not None and len(plan.files) > 1
    writer = SafetensorsShardWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="'x' is not in the export plan"):
        writer.write("x", torch.zeros(1))
    with pytest.raises(ValueError, match="plan expected"):
        writer.write("a.A_log", torch.zeros(4, dtype=torch.bfloat16))
    writer.write("a.A_log", tensors["a.A_log"])
    with pytest.raises(ValueError, match="'a.A_log' twice"):
        writer.write("a.A_log", tensors["a.A_log"])
    with pytest.raises(ValueError, match="export stopped before tensor"):
        writer.close()


def test_a_truncated_shard_is_named_with_the_tensor_it_cuts(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(Exception, match=r"model.safetensors: truncated safetensors file \(tensor '[\w.]+' ends"):
        SafetensorsCheckpoint(tmp_path)


def test_torch_dist_records_are_read_straight_into_the_callers_tensor(tmp_path, monkeypatch):
    """Each data file written by its own thread; every chunk read back exactly, into a given tensor or a new one;
    a record that is not one plain tensor (here a transposed one, as another writer might store) is still read,
    through torch.load."""
    from megatron_qwen35.convert import torch_dist

    monkeypatch.setattr(torch_dist, "_own_storage", lambda t: t)  # store `b` transposed, as it is
    writer = TorchDistWriter(tmp_path, files=2)
    a, b = torch.randn(6, 4), torch.randn(5, 3).t()
    threads = [threading.Thread(target=writer.write_chunk, args=(k, t), kwargs=dict(
        global_shape=t.shape, offsets=(0, 0), file=i)) for i, (k, t) in enumerate([("a", a), ("b", b)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.finish(expected={"a": (6, 4), "b": (3, 5)})
    reader = TorchDistReader(tmp_path)
    assert reader._record_data(MetadataIndex("a", torch.Size((0, 0))), "a") is not None
    assert reader._record_data(MetadataIndex("b", torch.Size((0, 0))), "b") is None
    out = torch.empty(6, 4)
    assert reader.read("a", out=out) is out and torch.equal(out, a)
    assert torch.equal(reader.read("b"), b)
    assert torch.equal(reader.read("a", (2, 1), (3, 2)), a[2:5, 1:3])
    reader.close()


def test_writeback_is_started_through_libc_where_linux_has_it(tmp_path):
    """start_writeback calls sync_file_range (not in Python's os module) through ctypes: found on Linux, and it
    accepts a written range of a regular file."""
    import sys

    from megatron_qwen35.convert import output_dir

    if not sys.platform.startswith("linux"):
        assert output_dir._SYNC_FILE_RANGE is None
        return
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.pwrite(fd, b"x" * 65536, 0)
        assert output_dir._SYNC_FILE_RANGE(fd, 0, 65536, output_dir.SYNC_FILE_RANGE_WRITE) == 0
        output_dir.start_writeback(fd, 0, 65536)
    finally:
        os.close(fd)
