#!/usr/bin/env python
"""Draw the embedded vision-language demo set: coloured shapes on plain backgrounds, two short videos, captions.

usage: python tools/data/make_vl_demo.py [--out data/vl]
Writes OUT/images/*.png (18 images, 48 to 128 pixels a side), OUT/videos/<name>/NN.png (frames) and
OUT/captions.jsonl (one sample a line, in tools/data/preprocess_vl.py's format), which describe what is drawn, so a
model can learn from it. Deterministic: shapes are numpy masks (no antialiasing, nothing random), so the pixels do
not depend on the Pillow or numpy version; tests/test_vl_data.py regenerates the set and compares it with data/vl.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron_qwen35.cli import run_tool  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
           "purple": (140, 60, 180)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = ("in the middle", "on the left", "on the right", "at the top", "at the bottom")
# (width, height) of the 18 images: square, wide and tall, 48 to 128 pixels
SIZES = ((64, 64), (96, 64), (48, 48), (128, 96), (80, 112), (112, 80), (64, 128), (128, 64), (96, 96),
         (56, 72), (72, 56), (128, 128), (48, 96), (96, 48), (80, 80), (120, 72), (72, 120), (104, 104))


def shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    """[height, width] bool: the pixels whose centres lie inside the shape of half-size r centred at (cx, cy)."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # pointing up: the half-width grows from 0 at the top to r at the base
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape}")


def draw(shape, colour, background, place, large, width, height) -> np.ndarray:
    """[height, width, 3] uint8: one shape on a plain background."""
    cx = {"on the left": width / 4, "on the right": 3 * width / 4}.get(place, width / 2)
    cy = {"at the top": height / 4, "at the bottom": 3 * height / 4}.get(place, height / 2)
    return draw_at(shape, colour, background, width, height, cx, cy, min(width, height) * (0.22 if large else 0.13))


def draw_at(shape, colour, background, width, height, cx, cy, r) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    image[shape_mask(shape, width, height, cx, cy, r)] = COLOURS[colour]
    return image


def image_specs():
    """The 18 images: each combination chosen by cycling the lists with different strides (no random numbers)."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for i, (width, height) in enumerate(SIZES):
        yield dict(shape=SHAPES[i % 4], colour=colours[(i * 2) % 5], background=backgrounds[(i // 2) % 3],
                   place=PLACES[(i * 3) % 5], large=i % 3 != 1, width=width, height=height)


def caption(spec) -> str:
    size = "large" if spec["large"] else "small"
    return f"a {size} {spec['colour']} {spec['shape']} on a {spec['background']} background, {spec['place']}"


def video_frames(kind: str) -> list[np.ndarray]:
    if kind == "moving_square":  # a blue square crosses a white 64x64 frame from left to right, 6 frames
        return [draw_at("square", "blue", "white", 64, 64, 12 + 8 * k, 32, 10) for k in range(6)]
    if kind == "growing_circle":  # a red circle grows on black, 4 frames of 80x64
        return [draw_at("circle", "red", "black", 80, 64, 40, 32, 6 + 6 * k) for k in range(4)]
    raise ValueError(kind)


VIDEO_CAPTIONS = {"moving_square": "A blue square moves from left to right across a white background.",
                  "growing_circle": "A red circle grows larger in the middle of a black background."}


def make_demo(out: Path) -> list[dict]:
    """Write the set under `out`; returns the samples written to captions.jsonl."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    specs = list(image_specs())
    names = []
    for i, spec in enumerate(specs):
        name = f"images/{i:02d}_{spec['colour']}_{spec['shape']}.png"
        Image.fromarray(draw(**spec)).save(out / name)
        names.append(name)
    samples = [{"text": f"<image>This picture shows {caption(s)}.", "images": [n]}
               for s, n in zip(specs, names, strict=True)]
    for a, b in ((0, 5), (3, 10), (7, 14)):  # two pictures in one sample
        samples.append({"text": f"<image><image>Two pictures: first {caption(specs[a])}; then {caption(specs[b])}.",
                        "images": [names[a], names[b]]})
    for kind, text in VIDEO_CAPTIONS.items():
        frames = []
        for k, frame in enumerate(video_frames(kind)):
            (out / "videos" / kind).mkdir(parents=True, exist_ok=True)
            frames.append(f"videos/{kind}/{k:02d}.png")
            Image.fromarray(frame).save(out / frames[-1])
        samples.append({"text": f"<video>{text}", "videos": [frames]})
    samples.append({"text": f"<image>A still picture: {caption(specs[2])}. <video>And a video: "
                            f"{VIDEO_CAPTIONS['moving_square'][0].lower()}{VIDEO_CAPTIONS['moving_square'][1:]}",
                    "images": [names[2]], "videos": [samples[-2]["videos"][0]]})
    with (out / "captions.jsonl").open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    return samples


DRAWN = ("images", "videos", "captions.jsonl")  # what make_demo writes in OUT (its README.md stays)


def write_demo(out: Path) -> str:
    """The set drawn whole in a folder beside OUT, then moved into OUT in place of the drawn entries there (a failure
    while drawing leaves OUT as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-drawing-") as tmp:
        samples = make_demo(Path(tmp))
        out.mkdir(exist_ok=True)
        for name in DRAWN:
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
            os.replace(Path(tmp) / name, out / name)
    return f"wrote {len(samples)} samples to {out / 'captions.jsonl'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "data" / "vl")
    a = p.parse_args(argv)
    return run_tool(lambda: write_demo(a.out), doing="drawing the demo set")


if __name__ == "__main__":
    raise SystemExit(main())
