"""Chat generation: one user turn -> the prompt Qwen3.5's chat template writes for the model to answer, and the ids
that end the answer.

The prompt is the conversation (an optional system turn, the user turn with its images first) and the generation
prompt `<|im_start|>assistant\\n` with the thinking block opened (`<think>\\n`) or empty
(`<think>\\n\\n</think>\\n\\n`), as rendered by `data/chat_template.py`, or, when a Hugging Face tokenizer folder
has a chat template of its own, by transformers with that template (what `apply_chat_template` on that folder gives).
Without `enable_thinking` the template revision decides: Qwen3.5-0.8B and 2B ship the one with thinking off, 4B and
larger the one with thinking on (tests/fixtures/README.md). A reply ends at `<|im_end|>` (the end of its turn) or
`<|endoftext|>`, the two ids of the released generation_config.json's eos_token_id.
"""

from __future__ import annotations

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


def qwen35_chat_messages(prompt: str, *, system: str | None = None, num_images: int = 0) -> list[dict]:
    """transformers' messages of one user turn: a system turn first when given; the images as content items
    `{"type": "image"}` before the text, where the template writes them."""
    content = ([{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]) if num_images else prompt
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": content}]


def qwen35_chat_prompt(cfg: Qwen35Config, prompt: str, *, system: str | None = None, num_images: int = 0,
                       enable_thinking: bool | None = None, tokenizer_dir: str | Path | None = None) -> str:
    """The text given to the model for it to answer `prompt` (each image as the template's
    `<|vision_start|><|image_pad|><|vision_end|>`): rendered by the template of `tokenizer_dir` when that folder has
    one, else by Qwen3.5's released template of `cfg`'s size. enable_thinking None: as that template does."""
    messages = qwen35_chat_messages(prompt, system=system, num_images=num_images)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if tokenizer_dir is not None and has_chat_template(tokenizer_dir):
        return render_with_tokenizer_template(tokenizer_dir, messages, add_generation_prompt=True, **kwargs)
    return render_qwen35_chat(messages, add_generation_prompt=True, thinking_by_default=qwen35_thinking_by_default(cfg),
                              **kwargs)


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
