"""Chat generation: a conversation's next user turn -> the prompt Qwen3.5's chat template writes for the model to
answer, and the ids that end the answer.

The prompt is the conversation (an optional system turn, its earlier turns as transformers' messages, the new user
turn with its images first) and the generation
prompt `<|im_start|>assistant\\n` with the thinking block opened (`<think>\\n`) or empty
(`<think>\\n\\n</think>\\n\\n`), as rendered by `data/chat_template.py`, or, when a Hugging Face tokenizer folder
has a chat template of its own, by transformers with that template (what `apply_chat_template` on that folder gives).
Without `enable_thinking` the template revision decides: Qwen3.5-0.8B and 2B ship the one with thinking off, 4B and
larger the one with thinking on (tests/fixtures/README.md). A reply ends at `<|im_end|>` (the end of its turn) or
`<|endoftext|>`, the two ids of the released generation_config.json's eos_token_id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_qwen35.config import Qwen35Config, qwen35_preset
from megatron_qwen35.data.chat_template import (
    IM_END,
    has_chat_template,
    render_qwen35_chat,
    render_with_tokenizer_template,
)
from megatron_qwen35.data.tokenizer import QWEN35_EOD

THINKING_OFF_SIZES = ("0.8b", "2b")  # the presets whose released chat template has thinking off by default


def qwen35_thinking_by_default(cfg: Qwen35Config) -> bool:
    """Whether the chat template revision of `cfg`'s size opens the reply's thinking when not told: off for a decoder
    of the 0.8B or 2B shape (whatever the checkpoint's name), on for every other (4B and larger, the tiny presets)."""
    def shape(c: Qwen35Config):
        return c.hidden_size, c.num_layers, c.num_experts

    return shape(cfg) not in {shape(qwen35_preset(name)) for name in THINKING_OFF_SIZES}


def qwen35_chat_messages(prompt: str, *, system: str | None = None, num_images: int = 0,
                         history: Sequence[Mapping] = ()) -> list[dict]:
    """transformers' messages of a conversation's next user turn: a system turn first when given, then `history`
    (the earlier turns as transformers' message dicts: user, assistant with reasoning_content and tool_calls, tool;
    a system turn of their own first instead of `system`), then the turn, its images as content items
    `{"type": "image"}` before the text, where the template writes them. The images are the new turn's: an earlier
    turn's image or video is refused (its pixels are not given)."""
    history = [dict(m) for m in history]
    for i, message in enumerate(history):
        items = message.get("content") if isinstance(message.get("content"), list) else []
        if any(isinstance(item, Mapping) and item.get("type") in ("image", "video") for item in items):
            raise ValueError(f"the conversation's turn {i} holds an image or video: only the new turn's images are "
                             "given (--image)")
    if system is not None and history and history[0].get("role") == "system":
        raise ValueError("the conversation begins with a system turn of its own, and a system turn was given too")
    content = ([{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]) if num_images else prompt
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + history + [{"role": "user", "content": content}]


def qwen35_chat_prompt(cfg: Qwen35Config, prompt: str, *, system: str | None = None, num_images: int = 0,
                       enable_thinking: bool | None = None, tokenizer_dir: str | Path | None = None,
                       history: Sequence[Mapping] = (), tools: Sequence | None = None) -> str:
    """The text given to the model for it to answer `prompt` after the conversation's earlier turns `history` (each
    image as the template's `<|vision_start|><|image_pad|><|vision_end|>`; `tools`: function schemas the template
    lists in the system turn): rendered by the template of `tokenizer_dir` when that folder has one, else by
    Qwen3.5's released template of `cfg`'s size. enable_thinking None: as that template does."""
    messages = qwen35_chat_messages(prompt, system=system, num_images=num_images, history=history)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if tokenizer_dir is not None and has_chat_template(tokenizer_dir):
        return render_with_tokenizer_template(tokenizer_dir, messages, tools=tools, add_generation_prompt=True,
                                              **kwargs)
    return render_qwen35_chat(messages, tools=tools, add_generation_prompt=True,
                              thinking_by_default=qwen35_thinking_by_default(cfg), **kwargs)


def with_image_placeholders(text: str, num_images: int) -> str:
    """A rendered chat prompt with each of its image slots (`<|vision_start|><|image_pad|><|vision_end|>`) as the
    processor's `<image>` placeholder, which data/vl_processor.py expands to the image's pads."""
    from megatron_qwen35.data.chat_template import IMAGE_SLOT
    from megatron_qwen35.data.vl_processor import IMAGE_PLACEHOLDER

    if text.count(IMAGE_SLOT) != num_images:
        raise ValueError(f"the chat template wrote {text.count(IMAGE_SLOT)} image slots for {num_images} images")
    return text.replace(IMAGE_SLOT, IMAGE_PLACEHOLDER)


def qwen35_chat_end_ids(tokenizer) -> list[int]:
    """The ids that end a reply: `<|im_end|>`, then `<|endoftext|>` (each must be one token of `tokenizer`)."""
    ids = []
    for token in (IM_END, QWEN35_EOD):
        encoded = tokenizer.encode(token)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer has no {token} token (it encodes to {encoded}): chat needs Qwen3.5's "
                             "chat markers")
        ids += encoded
    return ids


__all__ = ["THINKING_OFF_SIZES", "qwen35_thinking_by_default", "qwen35_chat_messages", "qwen35_chat_prompt",
           "with_image_placeholders", "qwen35_chat_end_ids"]
