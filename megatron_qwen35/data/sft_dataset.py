"""Chat fine-tuning samples for megatron.training: conversations (tools/data/preprocess_sft.py's directory) packed
into fixed-shape THD sequences.

Each sample is one `seq_length` sequence holding whole conversations (data/packing.py: deterministic first-fit over the
split's conversations in their order; or one conversation per sequence without packing), each padded at its end to a
multiple of `align` (2 x context parallel), and a padding document filling the rest:

    tokens [S], labels [S] (the next token within the conversation), loss_mask [S] float (1 where the label is a token
    the assistant says), padding_mask [S] bool (padding: no loss, and no place in the MoE router's counts),
    position_ids [S] (restarting at every conversation) or, for a vision-language model, mRoPE's [3, S] (transformers'
    rope index of each conversation), cu_seqlens [D + 1] int32 (the aligned boundaries, then repeated to the fixed
    length D + 1 of the dataset), num_documents (the boundaries in use: cu_seqlens[:num_documents + 1]),
    and for a vision-language model the vision slots of data/vl_dataset.py (every conversation's images in order).

The sequences of a split are visited epoch after epoch, each epoch in its own seeded order. The model separates the
conversations through megatron's PackedSeqParams: attention, the Gated DeltaNet conv and recurrence, rope and MTP
restart at every boundary, so a packed conversation computes as it does alone (tests/test_sft.py,
tests/parallel/test_sft_matrix.py).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.data.packing import PackedLayout, aligned, first_fit
from megatron_qwen35.data.vl_dataset import (
    _SPLITS,
    DEFAULT_SPLIT,
    LIMITS,
    Qwen35VLSamples,
    _pad_rows,
    split_ranges,
)
from megatron_qwen35.layers.rotary import mrope_position_ids

SFT_FORMAT = "qwen35-sft-samples/1"  # data/preprocess_sft.py's FORMAT (not imported: that module loads the processor)


def sft_samples(data_dir) -> Qwen35VLSamples:
    """A preprocessed chat directory's conversations, read sample by sample."""
    return Qwen35VLSamples(data_dir, formats=(SFT_FORMAT,), kind="chat dataset", writer="tools/data/preprocess_sft.py")


class Qwen35SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed sequences over `indices` of a chat directory's conversations, `num_samples` long."""

    def __init__(self, samples: Qwen35VLSamples, indices: np.ndarray, seq_length: int, num_samples: int, *,
                 pack: bool = True, align: int = 1, vision: Qwen35VisionConfig | None = None, seed: int = 1234,
                 name: str = "train"):
        if len(indices) == 0:
            raise ValueError(f"the {name} split of {samples.dir} has no conversations (of {len(samples)}); change "
                             "the split")
        self.samples, self.indices, self.seq_length = samples, np.asarray(indices), seq_length
        self.num_samples, self.seed, self.name, self.align, self.vision = num_samples, seed, name, align, vision
        lengths = samples.sizes["tokens"][self.indices]
        over = np.nonzero(np.array([aligned(int(n), align) for n in lengths]) > seq_length)[0]
        if len(over):
            i = int(self.indices[over[0]])
            raise ValueError(f"{samples.where(i)} is {lengths[over[0]]} tokens, more than a {seq_length}-token "
                             f"sequence holds{f' (aligned to {align})' if align > 1 else ''} ({len(over)} "
                             f"conversations of the {name} split); raise --seq-length, or preprocess with "
                             "--seq-length and --too-long truncate / skip")
        self.sequences = first_fit(lengths.tolist(), seq_length, align=align) if pack else \
            [[k] for k in range(len(lengths))]
        self.max_documents = max(len(s) for s in self.sequences) + 1  # the padding document
        if vision is not None:  # every sequence's vision rows fit the dataset's slots
            sizes = {k: samples.sizes[k][self.indices] for k in LIMITS}
            self.limits = {k: max(int(sum(v[j] for j in s)) for s in self.sequences) for k, v in sizes.items()}

    def __len__(self) -> int:
        return self.num_samples

    @cached_property
    def real_tokens(self) -> int:
        """Tokens of conversations in all the split's sequences (its packing efficiency: / sequences x length)."""
        return int(self.samples.sizes["tokens"][self.indices].sum())

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, _SPLITS.index(self.name), epoch]).permutation(
                len(self.sequences))
        return self._perm

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(int(idx), len(self.sequences))
        return self.sequence(self.sequences[self._order(epoch)[j]])

    def sequence(self, members: list[int]) -> dict[str, torch.Tensor]:
        """The packed sequence of the split's conversations `members` (positions in `indices`)."""
        S = self.seq_length
        docs = [self.samples[int(self.indices[k])] for k in members]
        layout = PackedLayout.of([len(d["tokens"]) for d in docs], S, align=self.align)
        tokens = torch.full((S,), self.samples.eod_id, dtype=torch.long)
        labels = tokens.clone()
        loss_mask = torch.zeros(S)
        padding = torch.ones(S, dtype=torch.bool)
        positions = torch.zeros(3 if self.vision is not None else 1, S, dtype=torch.long)
        for doc, start, end in zip(docs, layout.starts, layout.cu_seqlens[1:], strict=False):
            ids, n = doc["tokens"], len(doc["tokens"])
            tokens[start:start + n] = ids
            labels[start:start + n - 1] = ids[1:]
            loss_mask[start:start + n - 1] = doc["loss_mask"][1:].float()  # the next token is the assistant's
            padding[start:start + n] = False
            if self.vision is None:
                positions[0, start:end] = torch.arange(end - start)
            else:
                rope = mrope_position_ids(ids, self.vision, doc["image_grid_thw"], doc["video_grid_thw"])
                positions[:, start:start + n] = rope
                positions[:, start + n:end] = rope.max() + 1 + torch.arange(end - start - n)  # the pads continue
        cu = list(layout.cu_seqlens)
        out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "padding_mask": padding,
               "position_ids": positions if self.vision is not None else positions[0],
               "cu_seqlens": torch.tensor(cu + [cu[-1]] * (self.max_documents + 1 - len(cu)), dtype=torch.int32),
               "num_documents": torch.tensor(len(cu) - 1)}
        if self.vision is not None:
            for key, rows in (("pixel_values", "image_patches"), ("image_grid_thw", "images"),
                              ("pixel_values_videos", "video_patches"), ("video_grid_thw", "videos")):
                out[key] = _pad_rows(torch.cat([d[key] for d in docs]), self.limits[rows])
        return out


def build_sft_datasets(data_dir, seq_length: int, train_valid_test_num_samples, *, vision: Qwen35VisionConfig | None,
                       split: str = DEFAULT_SPLIT, seed: int = 1234, pack: bool = True, align: int = 1):
    """(train, valid, test) datasets of a preprocessed chat directory for megatron.training: the conversations split
    in order by `split` (megatron's --split), each split packed on its own; None where megatron asks for none or the
    split gives the part no share (megatron asks for test samples whenever evaluation is on)."""
    samples = sft_samples(data_dir)
    if (samples.vision is None) != (vision is None):
        raise ValueError(f"{data_dir} was preprocessed for a {'text' if samples.vision is None else 'vision-language'} "
                         f"model ('{samples.index['model']}'); this model is "
                         f"{'text' if vision is None else 'vision-language'}")
    if vision is not None:
        differ = {f: (v, getattr(vision, f)) for f, v in samples.vision.items() if v != getattr(vision, f)}
        if differ:
            raise ValueError(f"{data_dir} was preprocessed for model '{samples.index['model']}', whose vision config "
                             f"differs from this model's (field: data, model): {differ}")
    datasets = []
    for name, part, wanted in zip(_SPLITS, split_ranges(split, len(samples)), train_valid_test_num_samples,
                                  strict=True):
        datasets.append(None if not wanted or part is None else Qwen35SFTDataset(
            samples, np.arange(*part), seq_length, int(wanted), pack=pack, align=align, vision=vision, seed=seed,
            name=name))
    return datasets


def qwen35_sft_unpad(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A collated micro-batch's (batch size 1) document boundaries as the model takes them: cu_seqlens [n + 1]."""
    if batch["cu_seqlens"].shape[0] != 1:
        raise ValueError(f"packed sequences are one per micro-batch (--micro-batch-size 1), got "
                         f"{batch['cu_seqlens'].shape[0]}")
    return batch["cu_seqlens"][0, :int(batch["num_documents"][0]) + 1]


__all__ = ["SFT_FORMAT", "sft_samples", "Qwen35SFTDataset", "build_sft_datasets", "qwen35_sft_unpad"]
