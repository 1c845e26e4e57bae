"""Bytes that only move are copied file to file: where each output row comes from (found by running the transform on
labels) must be where the transform itself puts it, for every rule of the table; the copies must be the bytes
torch.save and the safetensors writer would have written from memory, also where the kernel cannot copy."""

import errno
import os

import pytest
import torch

from megatron_qwen35.checkpoint import CheckpointFileError
from megatron_qwen35.config import qwen35_preset
from megatron_qwen35.convert import file_bytes
from megatron_qwen35.convert.file_bytes import FileRange, covering, laid_out, mapped, vector_ranges
from megatron_qwen35.convert.megatron_keys import MegatronLayout
from megatron_qwen35.convert.table import HFLayout, hf_shapes
from megatron_qwen35.convert.torch_dist import TorchDistReader, TorchDistWriter
from megatron_qwen35.convert.transforms import GATE_UP, IDENTITY, PLUS_ONE, Transform


def _assembled(runs, inputs, shape):
    """An output made of `runs` of the inputs' last-dimension vectors, as moved_vectors describes it."""
    rows = [inputs[i].reshape(-1, inputs[i].shape[-1])[first:first + count] for i, first, count in runs]
    return torch.cat(rows).reshape(shape)


@pytest.mark.parametrize("preset,experts", [("tiny", "per_expert"), ("tiny-moe", "packed"),
                                            ("tiny-vl-moe", "per_expert")])
def test_moved_vectors_place_every_row_where_the_transform_puts_it(preset, experts):
    """Every rule of the table, both ways, on random data: either the transform is not a pure move (arithmetic, or
    the 1-D vision qkv bias, whose regrouping splits its one vector) or the runs rebuild its outputs exactly."""
    cfg = qwen35_preset(preset)
    keys = MegatronLayout(cfg)
    rules = HFLayout(decoder_experts=experts).rules(cfg)
    shapes = hf_shapes(rules, keys.shape, cfg)
    moved = {"to_megatron": 0, "to_hf": 0}
    for rule in rules:
        for direction, names, shape_of in (("to_megatron", rule.hf, shapes.__getitem__),
                                           ("to_hf", rule.megatron, keys.shape)):
            inputs = [torch.randn(shape_of(n)) for n in names]
            found = rule.transform.moved_vectors(direction, [t.shape for t in inputs], cfg)
            fn = rule.transform.to_megatron if direction == "to_megatron" else rule.transform.to_hf
            if found is None:
                assert rule.transform.arithmetic or inputs[0].dim() == 1, (rule, direction)
                continue
            moved[direction] += 1
            real = fn(inputs, cfg)
            assert len(found) == len(real)
            for (shape, runs), want in zip(found, real, strict=True):
                assert shape == tuple(want.shape)
                assert torch.equal(_assembled(runs, inputs, shape), want), (rule, direction)
    assert moved["to_megatron"] == moved["to_hf"] > 0.8 * len(rules)


def _flip_last(t, cfg):
    return [x.flip(-1) for x in t]


def _transpose(t, cfg):
    return [x.t().contiguous() for x in t]


@pytest.mark.parametrize("transform", [Transform("flip", _flip_last, _flip_last),
                                       Transform("transpose", _transpose, _transpose), PLUS_ONE])
def test_transforms_that_change_vectors_are_not_taken_for_moves(transform):
    assert transform.moved_vectors("to_megatron", [(6, 4)], qwen35_preset("tiny")) is None


def test_runs_follow_inputs_and_ranges_split_across_files(tmp_path):
    cfg = qwen35_preset("tiny")
    [(shape, runs)] = GATE_UP.moved_vectors("to_megatron", [(3, 4), (3, 4)], cfg)
    assert shape == (6, 4) and runs == [(0, 0, 3), (1, 0, 3)]
    assert IDENTITY.moved_vectors("to_megatron", [(5,)], cfg) == [((5,), [(0, 0, 1)])]
    a, b = FileRange(tmp_path / "a", 100, 8), FileRange(tmp_path / "b", 0, 16)  # input 0 lies in two files
    assert vector_ranges([(0, 1, 2)], [[a, b]], vector_bytes=4) == [FileRange(a.path, 104, 4), FileRange(b.path, 0, 4)]
    assert vector_ranges([(0, 0, 1), (0, 1, 1)], [[b]], 4) == [FileRange(b.path, 0, 8)]  # adjacent runs merge
    with pytest.raises(ValueError, match="input 0 has 8 bytes"):
        vector_ranges([(0, 0, 3)], [[a]], 4)
    memory = torch.empty(6, 4)
    placed = laid_out([FileRange(a.path, 0, 40), FileRange(b.path, 8, 56)], memory)
    assert covering(placed, memory[2:4]) == [FileRange(a.path, 32, 8), FileRange(b.path, 8, 24)]
    assert covering(placed[:1], memory[2:4]) is None and covering(placed, memory[:, :2]) is None
    with pytest.raises(ValueError, match="file ranges of 40 bytes"):
        laid_out(placed[:1], memory)


def _source_file(path, t: torch.Tensor, lead: int = 24) -> FileRange:
    path.write_bytes(b"x" * lead + t.numpy().tobytes())
    return FileRange(path, lead, t.numel() * t.element_size())


@pytest.mark.parametrize("kernel_copies", [True, False])
def test_a_placeholder_written_from_file_ranges_is_the_record_torch_save_writes(tmp_path, monkeypatch, kernel_copies):
    """A chunk whose memory was never filled, described by the file ranges of its rows (two files, rows
    interleaved), gives the data file torch.save gives from the real tensor; also where copy_file_range fails
    (another file system), through reading the files, never the memory. A chunk the ranges do not cover is refused."""
    if not kernel_copies:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    top, bottom = torch.randn(3, 5), torch.randn(2, 5)
    want = torch.cat([bottom[:1], top, bottom[1:]])
    a, b = _source_file(tmp_path / "a.bin", top), _source_file(tmp_path / "b.bin", bottom, lead=8)
    ranges = vector_ranges([(1, 0, 1), (0, 0, 3), (1, 1, 1)], [[a], [b]], vector_bytes=20)

    def data_file(name, chunk, **source):
        writer = TorchDistWriter(tmp_path / name)
        writer.write_chunk("w", chunk, global_shape=(5, 5), offsets=(0, 0), **source)
        writer.finish()
        return (tmp_path / name / "__0_0.distcp").read_bytes()

    placeholder = torch.full((5, 5), float("nan"))  # what the memory holds must not matter
    copied = data_file("copied", placeholder, source=laid_out(ranges, placeholder), placeholder=True)
    assert copied == data_file("saved", want)
    reader = TorchDistReader(tmp_path / "copied")
    assert torch.equal(reader.read("w"), want)
    [found] = reader.file_ranges("w", (0, 0), (5, 5))
    assert torch.equal(mapped(found, torch.float32).view(5, 5), want)
    reader.close()
    with pytest.raises(ValueError, match="placeholder that its file ranges do not cover"):
        data_file("uncovered", placeholder, source=laid_out(ranges, placeholder)[:2], placeholder=True)


def test_a_source_file_shorter_than_its_ranges_is_named(tmp_path, monkeypatch):
    t = torch.randn(4, 4)
    r = _source_file(tmp_path / "short.bin", t)
    cut = FileRange(r.path, r.offset, r.nbytes + 64)
    with pytest.raises(CheckpointFileError, match="short.bin: the file ends before byte"):
        mapped(cut, torch.float32)
    out = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(CheckpointFileError, match="short.bin: cannot copy bytes"):
            file_bytes.copy_ranges([cut], out, 0)
    finally:
        os.close(out)


def test_file_ranges_follow_records_split_along_the_leading_dimension(tmp_path):
    """Blocks saved by several ranks: rows split (tensor parallel columns, experts) give one range per record, in
    order; a block split along its rows' length (row-parallel), or asked across a record's edge, has none."""
    w, v = torch.randn(2, 4, 6), torch.randn(4, 6)
    writer = TorchDistWriter(tmp_path)
    for e in (1, 0):  # out of order: ranges follow the block, not the file
        for half in (1, 0):
            writer.write_chunk("w", w[e:e + 1, 2 * half:2 * half + 2], global_shape=(2, 4, 6),
                               offsets=(e, 2 * half, 0))
    for half in (0, 1):
        writer.write_chunk("v", v[:, 3 * half:3 * half + 3], global_shape=(4, 6), offsets=(0, 3 * half))
    writer.finish()
    reader = TorchDistReader(tmp_path)
    for offsets, shape in (((0, 0, 0), (2, 4, 6)), ((1, 0, 0), (1, 4, 6)), ((1, 2, 0), (1, 2, 6))):
        ranges = reader.file_ranges("w", offsets, shape)
        got = torch.cat([mapped(r, torch.float32) for r in ranges])
        block = w[offsets[0]:offsets[0] + shape[0], offsets[1]:offsets[1] + shape[1]]
        assert torch.equal(got, block.reshape(-1)), (offsets, shape)
    assert len(reader.file_ranges("w", (0, 0, 0), (2, 4, 6))) == 4
    assert reader.file_ranges("v", (0, 0), (4, 6)) is None  # columns split: not runs of the block's bytes
    assert reader.file_ranges("w", (0, 1, 0), (1, 2, 6)) is None  # across a record's edge
    assert reader.file_ranges("absent", (0,), (1,)) is None
    reader.close()
