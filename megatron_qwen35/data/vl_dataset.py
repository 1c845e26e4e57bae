"""The vision-language dataset for megatron.training: fixed-shape samples that megatron's default collate batches,
and the unpadding of a collated micro-batch back to the model's vision inputs.

Shapes: S seq_length, P / Pv the image / video patch rows of a batch slot, I / V its image / video grid rows,
D patch_dim. One sample per sequence:

    tokens [S] int64         input_ids[:-1], padded with the end-of-document id
    labels [S] int64         input_ids[1:] (the next token), padded likewise
    loss_mask [S] float32    0 where the label is a vision token (pad, start, end) or padding, else 1
    position_ids [3, S] int64  mrope_position_ids of the tokens; 0 at padding
    pixel_values [P, D] float32, image_grid_thw [I, 3] int64            zero rows past the sample's own
    pixel_values_videos [Pv, D] float32, video_grid_thw [V, 3] int64

A sample longer than S + 1 tokens is cut after S tokens when that cut drops only text after its last vision token;
one whose vision tokens reach past S is an error naming it (file and line), raised when the dataset is built. The
padding needs no attention mask: it follows the sample, and causal attention and the GDN recurrence never carry
it backwards.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.data.preprocess_vl import ARRAYS, FORMAT, INDEX, VISION_FIELDS
from megatron_qwen35.file_names import plain_file_name
from megatron_qwen35.layers.rotary import mrope_position_ids

DEFAULT_SPLIT = "969,30,1"  # megatron's --split default for --data-path
LIMITS = ("image_patches", "images", "video_patches", "videos")  # a batch slot's vision rows (P, I, Pv, V)
_SPLITS = ("train", "valid", "test")


def split_ranges(split: str, count: int) -> list[tuple[int, int] | None]:
    """(begin, end) of the train / valid / test parts of `count` samples under megatron's --split, with megatron's
    rounding; None for a part the split gives no share (megatron builds no dataset for it)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if b is None else (int(round(b[0] * count)), int(round(b[1] * count))) for b in matrix]


def _shard_arrays(path: Path, names, samples: int, writer: str) -> dict[str, np.ndarray]:
    """A shard's per-sample arrays (offsets, vision extents, sources), read whole; a cut-off or damaged shard, or one
    holding another count of samples than the index says, is a ValueError naming it."""
    from safetensors import SafetensorError

    try:
        with safe_open(path, "pt") as f:
            out = {name: f.get_tensor(name).numpy() for name in names}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable shard ({e}); preprocess again with {writer}") from None
    lengths = {name: len(a) - (name not in ("vision_extent", "source")) for name, a in out.items()}
    if set(lengths.values()) != {samples}:
        raise ValueError(f"{path}: holds {lengths} entries, where the index says {samples} samples; preprocess again "
                         f"with {writer}")
    return out


class Qwen35VLSamples:
    """A dataset directory (tools/data/preprocess_vl.py's output) read sample by sample: each shard's offsets in
    memory, the arrays sliced from the safetensors files on demand."""

    def __init__(self, data_dir: str | Path, formats: tuple[str, ...] = (FORMAT,), *,
                 kind: str = "VL dataset", writer: str = "tools/data/preprocess_vl.py"):
        """`kind` and `writer` name what the directory should be, and the tool that writes it, in refusals."""
        self.dir = Path(data_dir)
        index_file = self.dir / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not a {kind} directory: it has no {INDEX} ({writer} writes one)")
        try:
            self.index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index_file} is not JSON ({e}); preprocess again with {writer}") from None
        if not isinstance(self.index, dict) or self.index.get("format") not in formats:
            found = self.index.get("format") if isinstance(self.index, dict) else type(self.index).__name__
            raise ValueError(f"{index_file}: format {found!r}, expected one of {list(formats)} ({writer})")
        shards = self.index.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and type(e.get("samples")) is int
                and e["samples"] >= 0 for e in shards):
            raise ValueError(f"{index_file}: 'shards' is not a list of {{\"file\": name, \"samples\": count}}; "
                             f"preprocess again with {writer}")
        self.vision = self.index.get("vision")
        self.eod_id = self.index.get("eod_id")
        self.patch_dim = self.index.get("patch_dim")
        self.arrays = {k: v for k, v in ARRAYS.items() if k == "tokens" or self.vision is not None}  # text: tokens
        self.token_aligned = tuple(self.index.get("token_aligned", ()))  # e.g. the SFT samples' loss_mask
        shard, local = [], []
        per_shard = {name: [] for name in [o for o, _ in self.arrays.values()] + ["vision_extent", "source"]}
        for entry in shards:  # names read from a file are data (file_names.py)
            plain_file_name(entry["file"], source=f"{index_file} (shards)")
        for s, entry in enumerate(shards):
            for name, array in _shard_arrays(self.dir / entry["file"], per_shard, entry["samples"], writer).items():
                per_shard[name].append(array)
            shard += [s] * entry["samples"]
            local += range(entry["samples"])
        self.shard, self.local = np.array(shard, dtype=np.int64), np.array(local, dtype=np.int64)
        self.vision_extent = np.concatenate(per_shard.pop("vision_extent") or [np.zeros(0, np.int64)])
        self.source = np.concatenate(per_shard.pop("source") or [np.zeros((0, 2), np.int64)])
        self._offsets = per_shard  # offsets name -> one array per shard

    def __len__(self) -> int:
        return len(self.shard)

    @cached_property
    def sizes(self) -> dict[str, np.ndarray]:
        """Per sample: tokens, and for vision samples image_patches, images, video_patches, videos."""
        names = dict(tokens="token_offsets", image_patches="pixel_offsets", images="image_offsets",
                     video_patches="video_pixel_offsets", videos="video_offsets")
        return {k: np.concatenate([np.diff(o) for o in self._offsets[v]]) for k, v in names.items()
                if v in self._offsets}

    def where(self, i: int) -> str:
        """Sample i and its source: "sample i (file:line)"."""
        file_number, line = self.source[i]
        return f"sample {i} ({self.index['inputs'][file_number]}:{line})"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i as written: tokens (and loss_mask where stored), and for vision samples pixel_values,
        image_grid_thw, pixel_values_videos, video_grid_thw."""
        s, k = self.shard[i], self.local[i]
        out = {}
        with safe_open(self.dir / self.index["shards"][s]["file"], "pt") as f:
            for name, (offsets, _) in self.arrays.items():
                start, end = self._offsets[offsets][s][k:k + 2]
                out[name] = f.get_slice(name)[int(start):int(end)]
                if name == "tokens":
                    out.update({a: f.get_slice(a)[int(start):int(end)] for a in self.token_aligned})
        out["tokens"] = out["tokens"].long()
        return out


class Qwen35VLDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-shape samples (the module docstring) over `indices` of a dataset directory's
    samples, `num_samples` long: epoch after epoch over the indices, each epoch in its own seeded order.

    `limits` (image_patches, images, video_patches, videos) size a slot's vision rows; every split of a directory
    should share them (`build_vl_datasets` takes them from the whole directory's largest sample).
    """

    def __init__(self, samples: Qwen35VLSamples, indices: np.ndarray, seq_length: int, num_samples: int, *,
                 limits: dict[str, int], vision: Qwen35VisionConfig, seed: int = 1234, name: str = "train"):
        if len(indices) == 0:
            raise ValueError(f"the {name} split of {samples.dir} has no samples (of {len(samples)}); "
                             "change the split")
        self.samples, self.indices, self.seq_length = samples, np.asarray(indices), seq_length
        self.num_samples, self.seed, self.name = num_samples, seed, name
        self.limits = {k: int(limits[k]) for k in LIMITS}
        self.vision = vision
        self._check_fit()

    def _check_fit(self):
        """Every sample of the split fits a slot: its vision rows within the limits, its vision tokens within S."""
        sizes = {k: v[self.indices] for k, v in self.samples.sizes.items()}
        for key, limit in self.limits.items():
            over = np.nonzero(sizes[key] > limit)[0]
            if len(over):
                i = int(self.indices[over[0]])
                raise ValueError(f"{self.samples.where(i)} has {sizes[key][over[0]]} {key.replace('_', ' ')}, more "
                                 f"than the {limit} a batch slot holds ({len(over)} samples of the {self.name} split "
                                 "do not fit)")
        cut = np.nonzero(self.samples.vision_extent[self.indices] > self.seq_length)[0]
        if len(cut):
            i = int(self.indices[cut[0]])
            raise ValueError(f"{self.samples.where(i)} has vision tokens up to position "
                             f"{self.samples.vision_extent[i] - 1}, past the sequence length {self.seq_length}: "
                             f"cutting it would cut an image or video ({len(cut)} samples of the {self.name} split); "
                             "raise --seq-length or shrink the images (--image-pixels)")

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, _SPLITS.index(self.name), epoch]).permutation(
                len(self.indices))
        return self._perm

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(int(idx), len(self.indices))
        return self.slot(int(self.indices[self._order(epoch)[j]]))

    def slot(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i of the directory in its fixed-shape slot."""
        raw = self.samples[i]
        S, ids, v = self.seq_length, raw["tokens"], self.vision
        n = min(len(ids) - 1, S)  # tokens in the slot
        tokens = torch.full((S,), self.samples.eod_id, dtype=torch.long)
        labels = tokens.clone()
        tokens[:n], labels[:n] = ids[:n], ids[1:n + 1]
        loss_mask = torch.zeros(S)
        loss_mask[:n] = (~torch.isin(labels[:n], torch.tensor(v.token_ids))).float()
        position_ids = torch.zeros(3, S, dtype=torch.long)
        position_ids[:, :n] = mrope_position_ids(tokens[:n], v, raw["image_grid_thw"], raw["video_grid_thw"])
        out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        for key, rows in (("pixel_values", "image_patches"), ("image_grid_thw", "images"),
                          ("pixel_values_videos", "video_patches"), ("video_grid_thw", "videos")):
            out[key] = _pad_rows(raw[key], self.limits[rows])
        return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    padded = x.new_zeros(rows, *x.shape[1:])
    padded[:len(x)] = x
    return padded


def qwen35_vl_unpad(batch: dict[str, torch.Tensor]):
    """A collated micro-batch's vision inputs as the model takes them: (pixel_values [sum patches, D],
    image_grid_thw [n, 3], pixel_values_videos, video_grid_thw), each sample's rows in batch order (its images in
    the order their pad tokens appear). A modality absent from the whole micro-batch is (None, None)."""
    images = _unpad(batch["pixel_values"], batch["image_grid_thw"])
    videos = _unpad(batch["pixel_values_videos"], batch["video_grid_thw"])
    return (*images, *videos)


def _unpad(pixels: torch.Tensor, grids: torch.Tensor):
    """pixels [b, P, D], grids [b, I, 3] (zero rows past each sample's own) -> ([patches, D], [n, 3]) or Nones."""
    present = grids[..., 0] > 0  # [b, I]
    if not bool(present.any()):
        return None, None
    patches = (grids.prod(-1) * present).sum(-1)  # [b]: each sample's patch rows
    rows = torch.arange(pixels.shape[1], device=pixels.device) < patches[:, None]  # [b, P]
    return pixels[rows], grids[present]  # boolean indexing keeps (sample, row) order


def qwen35_vl_batch_shapes(data_dir: str | Path, seq_length: int, micro_batch_size: int,
                           limits: dict[str, int] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each key of a collated micro-batch: (shape, dtype), from the directory's index alone (for the receive
    buffers of ranks that do not read data). Note position_ids collate to [b, 3, S]: the model takes [3, b, S]."""
    index = json.loads((Path(data_dir) / INDEX).read_text())
    rows = dict(limits) if limits is not None else {k: index["max"][k] for k in LIMITS}
    b, S, D = micro_batch_size, seq_length, index["patch_dim"]
    return {"tokens": ((b, S), torch.long), "labels": ((b, S), torch.long), "loss_mask": ((b, S), torch.float32),
            "position_ids": ((b, 3, S), torch.long),
            "pixel_values": ((b, rows["image_patches"], D), torch.float32),
            "image_grid_thw": ((b, rows["images"], 3), torch.long),
            "pixel_values_videos": ((b, rows["video_patches"], D), torch.float32),
            "video_grid_thw": ((b, rows["videos"], 3), torch.long)}


def build_vl_datasets(data_dir: str | Path, seq_length: int, train_valid_test_num_samples, *,
                      vision: Qwen35VisionConfig,
                      split: str = DEFAULT_SPLIT, seed: int = 1234, limits: dict[str, int] | None = None):
    """(train, valid, test) datasets of a preprocessed directory for megatron.training's
    `train_valid_test_datasets_provider`: the samples split in order by `split` (Megatron's --split, e.g.
    "98,2,0"), each dataset as long as megatron asks (None where it asks for none or the split gives the part no
    share: megatron asks for test samples whenever evaluation is on). `vision` is the model's
    Qwen35VisionConfig: the directory must have been made for the same token ids and patch sizes.
    `limits` default to the directory's largest sample, so every split batches to the same shapes."""
    samples = Qwen35VLSamples(data_dir)
    differ = {f: (samples.vision[f], getattr(vision, f)) for f in VISION_FIELDS
              if samples.vision[f] != getattr(vision, f)}
    if differ:
        raise ValueError(f"{data_dir} was preprocessed for model '{samples.index['model']}', whose vision config "
                         f"differs from this model's (field: data, model): {differ}")
    limits = dict(limits) if limits is not None else {k: samples.index["max"][k] for k in LIMITS}
    datasets = []
    for name, part, wanted in zip(_SPLITS, split_ranges(split, len(samples)), train_valid_test_num_samples,
                                  strict=True):
        datasets.append(None if not wanted or part is None else Qwen35VLDataset(
            samples, np.arange(*part), seq_length, int(wanted), limits=limits, vision=vision, seed=seed, name=name))
    return datasets
