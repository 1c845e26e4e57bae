"""The inputs the checks feed: seeded normal samples, token batches, and a VL batch holding images and a video.

Every sample is drawn on the CPU from its own seed (the same numbers on any device), then moved to DEVICE.
"""

from __future__ import annotations

import torch

from .environment import DEVICE
from .shapes import SHAPES


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Normal samples drawn on the CPU (the same numbers on any device), then moved to DEVICE."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def token_batch(cfg, *, seed: int):
    """Token ids, positions and next-token labels [2, model_tokens] on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, SHAPES.model_tokens + 1), generator=gen).to(DEVICE)
    pos = torch.arange(SHAPES.model_tokens, device=DEVICE).expand(2, -1)
    return ids[:, :-1], pos, ids[:, 1:]


def packed_token_batch(cfg, *, seed: int):
    """One packed (THD) sequence of three documents of unequal length, [1, model_tokens]: token ids, positions
    restarting at each document, next-token labels within each document, and cu_seqlens (int32) on DEVICE."""
    total = SHAPES.model_tokens
    lengths = [total // 2 + 3, total // 3 - 5]
    lengths.append(total - sum(lengths))
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=gen) for n in lengths]
    ids = torch.cat([d[:-1] for d in docs]).unsqueeze(0).to(DEVICE)
    labels = torch.cat([d[1:] for d in docs]).unsqueeze(0).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEVICE)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return ids, pos, labels, cu_seqlens


def vl_batch(cfg, *, seed: int) -> dict:
    """Two rows: text, image 0, text, the video's frames (each its own run, text between them), text; and text,
    image 1, text; the same length, as `Qwen35VLModel.forward` takes them (ids, mRoPE positions, labels, pixels and
    grids on DEVICE)."""
    from megatron_qwen35.layers.rotary import mrope_position_ids

    v, gen = cfg.vision, torch.Generator().manual_seed(seed)
    tokens = lambda t, h, w: t * h * w // v.spatial_merge_size ** 2  # noqa: E731 - merged tokens of a grid
    text = lambda n: torch.randint(0, v.image_token_id - 8, (n,), generator=gen).tolist()  # noqa: E731

    def span(token: int, n: int) -> list[int]:
        return [v.vision_start_token_id, *[token] * n, v.vision_end_token_id]

    t, h, w = SHAPES.video
    frames = [token for _ in range(t) for token in span(v.video_token_id, tokens(1, h, w)) + text(2)]
    rows = [text(5) + span(v.image_token_id, tokens(*SHAPES.images[0])) + text(4) + frames,
            text(3) + span(v.image_token_id, tokens(*SHAPES.images[1]))]
    length = max(map(len, rows)) + 4
    ids = torch.tensor([row + text(length + 1 - len(row)) for row in rows])  # one more for the labels
    images, videos = torch.tensor(SHAPES.images), torch.tensor([SHAPES.video])
    patches = lambda grids: int(grids.prod(-1).sum())  # noqa: E731 - rows of pixel values
    return dict(input_ids=ids[:, :-1].to(DEVICE), labels=ids[:, 1:].to(DEVICE),
                position_ids=mrope_position_ids(ids[:, :-1], v, images, videos).to(DEVICE),
                pixel_values=randn(patches(images), v.patch_dim, seed=seed + 1), image_grid_thw=images.to(DEVICE),
                pixel_values_videos=randn(patches(videos), v.patch_dim, seed=seed + 2),
                video_grid_thw=videos.to(DEVICE))
