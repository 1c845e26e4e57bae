"""Qwen3.5's chat template (data/chat_template.py) and the chat preprocessing (data/preprocess_sft.py).

- The renderer equals the released templates (tests/fixtures: the 4B-and-larger and the 0.8B / 2B revisions)
  rendered by transformers' Jinja environment, token for token with the real tokenizer, over conversations covering
  system prompts, multi-turn, thinking on and off, reasoning dropped from earlier turns, tool calls and tool
  responses, images and videos; and refuses what the template refuses, with its messages.
- The loss mask is exactly the template's assistant turns: the learned tokens decode back to the assistant text, and
  to less under each option (last turn only, thinking out, empty thinking out).
- The command line: bad input is one error line naming file and line, exit 2, no output.
"""

import dataclasses
import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_qwen35.config import qwen35_preset
from megatron_qwen35.data.chat_template import (
    ChatTemplateError,
    assistant_spans,
    render_qwen35_chat,
    render_qwen35_turns,
    render_with_tokenizer_template,
)
from megatron_qwen35.data.preprocess_sft import LossPolicy, learned_tokens, qwen35_preprocess_sft
from megatron_qwen35.data.tokenizer import Qwen35Tokenizer
from megatron_qwen35.data.vl_dataset import Qwen35VLSamples

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = {"large": FIXTURES / "qwen3_5_chat_template.jinja", "small": FIXTURES / "qwen3_5_small_chat_template.jinja"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]

CONVERSATIONS = {
    "plain": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]),
    "system_reasoning": dict(messages=[
        {"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."}]),
    "multi_turn_reasoning_dropped_earlier": dict(messages=[
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": " add "}]),
    "images_and_video_with_ids": dict(messages=[
        {"role": "system", "content": "Look closely."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"},
                                     {"type": "video", "video": ["f0.png", "f1.png"]}]},
        {"role": "assistant", "content": "A red circle, then a moving square."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "A blue square."}], add_vision_id=True),
    "tool_calls_and_responses": dict(messages=[
        {"role": "system", "content": "You help with the weather."}, {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {
                "city": "Paris", "days": [1, 2], "units": {"t": "C"}, "n": 3, "exact": True, "note": "é"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Paris is sunny, Rome rainy.", "reasoning_content": "Combine both."}],
        tools=TOOLS),
    "tool_call_without_content": dict(messages=[
        {"role": "user", "content": "search"}, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "search", "arguments": {}}}]}, {"role": "tool", "content": "nothing"}],
        tools=TOOLS, add_generation_prompt=True),
    "generation_prompt": dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True),
    "generation_prompt_thinking_off": dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           enable_thinking=False),
    "generation_prompt_thinking_on": dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          enable_thinking=True),
    # the templates test enable_thinking by identity (`is false` / `is true`): neither 0, 1 nor "false" is a boolean
    **{f"generation_prompt_thinking_{value!r}": dict(messages=[{"role": "user", "content": "Hi"}],
                                                     add_generation_prompt=True, enable_thinking=value)
       for value in (0, 1, "false")},
}


def jinja(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(TEMPLATES[template].read_text())


def reference(template: str, case: dict) -> str:
    kwargs = {k: v for k, v in case.items() if k not in ("messages", "tools")}
    return jinja(template).render(messages=case["messages"], tools=case.get("tools"), **kwargs)


def ours(template: str, case: dict) -> str:
    kwargs = {k: v for k, v in case.items() if k not in ("messages", "tools")}
    return render_qwen35_chat(case["messages"], tools=case.get("tools"), thinking_by_default=template == "large",
                              **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return Qwen35Tokenizer()


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_renderer_equals_the_released_template_token_for_token(template, case, tokenizer):
    want, got = reference(template, CONVERSATIONS[case]), ours(template, CONVERSATIONS[case])
    assert tokenizer.encode(got) == tokenizer.encode(want)
    assert got == want


@pytest.mark.parametrize("messages,message", [
    ([], "No messages provided."),
    ([{"role": "system", "content": [{"type": "image", "image": "a.png"}]}, {"role": "user", "content": "x"}],
     "System message cannot contain images."),
    ([{"role": "assistant", "content": "x"}], "No user query found in messages."),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
     "System message must be at the beginning."),
    ([{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}], "Unexpected message role."),
    ([{"role": "user", "content": [{"type": "audio"}]}], "Unexpected item type in content."),
])
def test_renderer_refuses_what_the_template_refuses(messages, message):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=message):
        jinja("large").render(messages=messages)
    with pytest.raises(ChatTemplateError, match=message):
        render_qwen35_chat(messages)


@pytest.mark.parametrize("function", [None, "get_weather"])
def test_a_tool_call_whose_function_is_not_an_object_is_refused_as_the_template_refuses_it(function):
    """It ended in an AttributeError traceback out of the chat preprocessing instead of its one error line."""
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "x", "tool_calls": [{"function": function}]}]
    with pytest.raises(TemplateError):
        jinja("large").render(messages=messages)
    with pytest.raises(ChatTemplateError, match=r"tool_calls\[0\].function must be an object"):
        render_qwen35_chat(messages)


def test_tools_given_as_a_string_are_refused():
    """The template iterates a string's characters as tool schemas (a tools block of quoted letters); ours wrote no
    tools block at all. Refused, naming the field."""
    with pytest.raises(ChatTemplateError, match="tools must be a list of tool schemas, found str"):
        render_qwen35_chat([{"role": "user", "content": "q"}], tools="ab")


def test_a_token_across_a_turns_edge_is_learned(tokenizer):
    """A reply that starts with spaces and a newline (the template strips only newlines after '</think>', and keeps
    an earlier turn's content after its dropped reasoning as it is): the tokenizer merges the header's newline with
    them into one token ('\n \n'), as it merges the end of '</think>\n\n' with them where thinking is left out of
    the loss. That token holds the reply's first characters, so it is learned (as transformers' assistant-token
    mask maps a turn's first character to the token holding it); learning only the tokens that start inside a turn
    lost them. The learned text is the assistant turns plus the straddling token's other bytes, nothing else."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think> \nA"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>r</think>    \nB"}]
    text = ours("large", dict(messages=messages))
    ids = tokenizer.encode(text)
    assert b"\n \n" in tokenizer.token_bytes(ids)  # 'assistant', '\n \n', 'A': across the first turn's edge
    turns = _assistant_text(dict(messages=messages))
    assert turns == [" \nA<|im_end|>", "<think>\nr\n</think>\n\n    \nB<|im_end|>"]

    def learned(policy: LossPolicy) -> str:
        mask = learned_tokens(tokenizer, ids, text, policy.ranges(assistant_spans(text)), where="x")
        return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])

    assert learned(LossPolicy()) == "\n" + "".join(turns)
    assert learned(LossPolicy(thinking=False)) == "\n \nA<|im_end|>" + "\n\n    \nB<|im_end|>"


def test_a_tool_calls_string_is_refused_as_the_template_refuses_it():
    """The template iterates a string's characters as calls and fails on the first; ours names the field (it used to
    render the turn without its calls)."""
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "tool_calls": "oops"}]
    with pytest.raises(TemplateError):
        jinja("large").render(messages=messages)
    with pytest.raises(ChatTemplateError, match=r"tool_calls\[0\] must be an object"):
        render_qwen35_chat(messages)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_the_turns_recorded_while_rendering_are_the_turns_in_the_text(case):
    kwargs = {k: v for k, v in CONVERSATIONS[case].items() if k != "messages"}
    text, spans = render_qwen35_turns(CONVERSATIONS[case]["messages"], **kwargs)
    assert text == render_qwen35_chat(CONVERSATIONS[case]["messages"], **kwargs)
    assert spans == assistant_spans(text)
    assert len(spans) == sum(m["role"] == "assistant" for m in CONVERSATIONS[case]["messages"])


QUOTING_CHATML = "Explain this: <|im_start|>assistant\nSECRET<|im_end|> ok?"  # a user quoting a turn's markup


def _assistant_text(case: dict) -> list[str]:
    """Each assistant turn's text as the template writes it after its header, <|im_end|> included."""
    text = ours("large", case)
    return [text[s.start:s.end] for s in assistant_spans(text)]


@pytest.mark.parametrize("case", [c for c in CONVERSATIONS if "generation" not in c])
def test_learned_tokens_decode_to_exactly_the_assistant_turns(case, tokenizer):
    conversation = CONVERSATIONS[case]
    text = ours("large", conversation)
    ids = tokenizer.encode(text)
    turns = _assistant_text(conversation)
    assert turns and all(t.endswith("<|im_end|>") for t in turns)

    def learned(policy: LossPolicy) -> str:
        mask = learned_tokens(tokenizer, ids, text, policy.ranges(assistant_spans(text)), where="x")
        return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])

    assert learned(LossPolicy()) == "".join(turns)
    assert learned(LossPolicy(last_turn_only=True)) == turns[-1]
    without_thinking = "".join(t.split("</think>\n\n")[-1] for t in turns)
    assert learned(LossPolicy(thinking=False)) == without_thinking
    without_empty = "".join(t.split("</think>\n\n")[-1] if "<think>\n\n</think>" in t else t for t in turns)
    assert learned(LossPolicy(empty_thinking=False)) == without_empty
    assert "<|im_start|>" not in learned(LossPolicy())  # headers, system, user and tool turns are not learned


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


PREPROCESS = runpy.run_path(str(REPO / "tools/data/preprocess_sft.py"), run_name="cli")["main"]


@pytest.fixture
def chats(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes((REPO / "data/vl/images/00_red_circle.png").read_bytes())
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "<image> What is it?"},
                          {"role": "assistant", "content": "A red circle."}], "images": ["a.png"]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "Red.", "reasoning_content": "It is red."}],
             "chat_template_kwargs": {"enable_thinking": True}}]
    return _write(tmp_path / "chats.jsonl", rows)


def test_preprocessing_writes_the_rendered_conversations_and_their_masks(chats, tmp_path, capsys):
    out = tmp_path / "out"
    assert PREPROCESS(["--input", str(chats), "--output-dir", str(out), "--qwen35-preset", "tiny-vl-demo",
                       "--image-pixels", "1024", "16384"]) == 0
    assert "3 conversations" in capsys.readouterr().out
    samples = Qwen35VLSamples(out, formats=("qwen35-sft-samples/1",))
    tokenizer = Qwen35Tokenizer()
    decoded = [tokenizer.decode(samples[i]["tokens"][samples[i]["loss_mask"].bool()].tolist())
               for i in range(len(samples))]
    assert decoded == ["<think>\n\n</think>\n\nHello!<|im_end|>", "<think>\n\n</think>\n\nA red circle.<|im_end|>",
                       "<think>\nIt is red.\n</think>\n\nRed.<|im_end|>"]
    image_pads = (samples[1]["tokens"] == qwen35_preset("tiny-vl-demo").vision.image_token_id).sum()
    assert int(image_pads) == int(samples[1]["image_grid_thw"].prod(-1).sum()) // 4 > 0


def test_videos_as_items_and_placeholders_preprocess_alike_with_workers(tmp_path, capsys):
    """A video as a content item (frames and fps) and as a `<video>` placeholder with the row's `videos` list: the
    template's video slot, expanded to the processor's pads for the frames' grid; with --workers 2 (and the folder
    named by --output-prefix) the same bytes."""
    frames = [f"videos/moving_square/{i:02d}.png" for i in range(4)]  # in data/vl, the --media-dir
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": {"frames": frames, "fps": 2}},
                                                       {"type": "text", "text": "Where does it go?"}]},
                          {"role": "assistant", "content": "Right."}]},
            {"messages": [{"role": "user", "content": "<video>Where does it go?"},
                          {"role": "assistant", "content": "Right."}], "videos": [frames]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    chats = _write(tmp_path / "videos.jsonl", rows)
    for workers, output in (("1", "--output-dir"), ("2", "--output-prefix")):  # megatron's name for it, too
        assert PREPROCESS(["--input", str(chats), output, str(tmp_path / workers), "--qwen35-preset",
                           "tiny-vl-demo", "--video-pixels", "4096", "65536", "--workers", workers,
                           "--media-dir", str(REPO / "data/vl")]) == 0
    assert "2 videos" in capsys.readouterr().out
    samples = Qwen35VLSamples(tmp_path / "1", formats=("qwen35-sft-samples/1",))
    video = qwen35_preset("tiny-vl-demo").vision.video_token_id
    for i in (0, 1):
        grid = samples[i]["video_grid_thw"]
        assert int((samples[i]["tokens"] == video).sum()) == int(grid.prod(-1).sum()) // 4 > 0
    assert torch.equal(samples[0]["tokens"], samples[1]["tokens"])
    assert torch.equal(samples[0]["pixel_values_videos"], samples[1]["pixel_values_videos"])
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in (p.name for p in (tmp_path / "1").iterdir() if p.suffix == ".safetensors"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_an_image_or_video_in_an_assistant_turn_is_read_not_learned(chats, tmp_path, capsys):
    """The template renders an assistant's images and videos as it renders a user's; their pads and delimiters are
    inputs, as in a VL sample (data/vl_dataset.py), not targets: the rest of the turn is learned, they are not (they
    were, four vision tokens per image). A video's timestamps are text ('<0.2 seconds>') and learned with it."""
    rows = [{"messages": [{"role": "user", "content": "Draw it"}, {"role": "assistant", "content": "Here: <image>"}],
             "images": ["a.png"]},
            {"messages": [{"role": "user", "content": "And as a clip?"},
                          {"role": "assistant", "content": [{"type": "text", "text": "Here:"},
                                                            {"type": "video", "video": ["a.png", "a.png"]}]}]}]
    out = tmp_path / "out"
    assert PREPROCESS(["--input", str(_write(tmp_path / "assistant_media.jsonl", rows)), "--output-dir", str(out),
                       "--qwen35-preset", "tiny-vl-demo", "--image-pixels", "1024", "16384", "--video-pixels",
                       "1024", "16384"]) == 0
    samples = Qwen35VLSamples(out, formats=("qwen35-sft-samples/1",))
    vision = torch.tensor(qwen35_preset("tiny-vl-demo").vision.token_ids)
    tokenizer = Qwen35Tokenizer()
    for i, reply in enumerate(["Here: ", "Here:<0.2 seconds>"]):
        tokens, learned = samples[i]["tokens"], samples[i]["loss_mask"].bool()
        assert torch.isin(tokens, vision).sum() > 2 and not torch.isin(tokens[learned], vision).any()
        assert tokenizer.decode(tokens[learned].tolist()) == f"<think>\n\n</think>\n\n{reply}<|im_end|>"


def test_a_user_quoting_chatml_markup_is_not_learned(chats, tmp_path, capsys):
    """A user turn holding `<|im_start|>assistant ... <|im_end|>` (text and image chats): the loss is on the real
    assistant turns only, where reading the rendered text put the quoted one in it."""
    image_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                           {"type": "text", "text": QUOTING_CHATML}]},
                              {"role": "assistant", "content": "A quote."},
                              {"role": "user", "content": "<image> And this?"},
                              {"role": "assistant", "content": "A red circle."}], "images": ["a.png"]}
    rows = [{"messages": [{"role": "user", "content": QUOTING_CHATML}, {"role": "assistant", "content": "Sure."}]},
            image_row]
    out = tmp_path / "out"
    assert PREPROCESS(["--input", str(_write(tmp_path / "quoting.jsonl", rows)), "--output-dir", str(out),
                       "--qwen35-preset", "tiny-vl-demo", "--image-pixels", "1024", "16384"]) == 0
    samples = Qwen35VLSamples(out, formats=("qwen35-sft-samples/1",))
    tokenizer = Qwen35Tokenizer()
    learned = [tokenizer.decode(samples[i]["tokens"][samples[i]["loss_mask"].bool()].tolist()) for i in (0, 1)]
    assert learned == ["<think>\n\n</think>\n\nSure.<|im_end|>",
                       "A quote.<|im_end|><think>\n\n</think>\n\nA red circle.<|im_end|>"]
    assert "SECRET" in tokenizer.decode(samples[0]["tokens"].tolist())


@pytest.mark.parametrize("row,says", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}, "has the role 'bot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                   {"role": "assistant", "content": "x"}]}, "image 0 'missing.png' does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                   {"role": "assistant", "content": "x"}]}, "'broken.png' is not a readable image"),
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]},
     "more <image> placeholders than the row's 'images' list"),
    ({"messages": [{"role": "user", "content": "Hi " * 200}, {"role": "assistant", "content": "x"}]},
     "longer than --seq-length 64"),
    ("{not json", "not valid JSON"),
    ({"messages": "Hi"}, "'messages' is a JSON str, not a list"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": ["a.png", "small.png"]}]},
                   {"role": "assistant", "content": "x"}]}, "video 0's frames differ in size ([(16, 32), (64, 64)]"),
    ('{"messages": [{"role": "user", "content": "x\\ud800"}, {"role": "assistant", "content": "y"}]}',
     "holds a lone UTF-16 surrogate ('\\ud800')"),
])
def test_bad_rows_are_one_error_line_naming_file_and_line(chats, tmp_path, capsys, row, says):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (16, 32)).save(tmp_path / "small.png")
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"},
                                                        {"role": "assistant", "content": "ok"}]}, row])
    out = tmp_path / "out"
    assert PREPROCESS(["--input", str(bad), "--output-dir", str(out), "--qwen35-preset", "tiny-vl-demo",
                       "--seq-length", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar's line, then the error
    assert err[-1].startswith(f"error: {bad}:2: ") and says in err[-1], err
    assert sum(line.startswith("error:") for line in err) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_output_under_a_file_is_named_as_such(chats, tmp_path, capsys):
    assert PREPROCESS(["--input", str(chats), "--output-dir", str(chats / "out"), "--qwen35-preset",
                       "tiny-vl-demo"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: output {chats / 'out'}: {chats} is a file, " \
        "not a folder"


@pytest.mark.parametrize("flag,value", [("--seq-length", "0"), ("--seq-length", "-10"), ("--workers", "0"),
                                        ("--shard-mb", "0")])
def test_counts_and_lengths_below_one_are_refused_by_the_flag(chats, tmp_path, capsys, flag, value):
    """--seq-length -10 used to cut 10 tokens off every conversation and report success."""
    with pytest.raises(SystemExit) as e:
        PREPROCESS(["--input", str(chats), "--output-dir", str(tmp_path / "out"), "--qwen35-preset", "tiny-vl-demo",
                    "--too-long", "truncate", flag, value])
    assert e.value.code == 2 and f"argument {flag}: {value} is not a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_too_long_conversations_are_truncated_or_skipped_only_when_asked_and_counted(tmp_path, capsys, mode):
    """Truncated: cut at --seq-length, unless that cuts off every assistant token (then skipped: nothing to learn)."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "long " * 100}]},
            {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "ok"}]}]
    counts = qwen35_preprocess_sft([_write(tmp_path / "c.jsonl", rows)], tmp_path / "out", qwen35_preset("tiny-demo"),
                                   seq_length=64, too_long=mode)
    assert (counts["truncated"], counts["skipped"]) == {"truncate": (1, 1), "skip": (0, 2)}[mode]
    samples = Qwen35VLSamples(tmp_path / "out", formats=("qwen35-sft-samples/1",))
    assert len(samples) == {"truncate": 2, "skip": 1}[mode]
    assert max(len(samples[i]["tokens"]) for i in range(len(samples))) <= 64
    assert all(samples[i]["loss_mask"].any() for i in range(len(samples)))


def test_a_tokenizer_folders_own_template_renders_the_same_conversations(tmp_path, tokenizer):
    """--tokenizer-dir: transformers renders with the folder's chat template (here the released one, byte-level BPE
    trained on the spot so no download is needed) and its tokenizer; the text equals our renderer's and the loss
    decodes to the assistant turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                "<tool_response>", "</tool_response>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [ours("large", c) for c in CONVERSATIONS.values()]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>").save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATES["large"].read_text())
    case = CONVERSATIONS["tool_calls_and_responses"]
    text = render_with_tokenizer_template(folder, case["messages"], tools=case["tools"])
    assert text == ours("large", case)
    theirs = Qwen35Tokenizer(folder)
    ids = theirs.encode(text)
    mask = learned_tokens(theirs, ids, text, LossPolicy().ranges(assistant_spans(text)), where="x")
    assert theirs.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(_assistant_text(case))
    assert torch.tensor(mask).sum() > 0
    # a message quoting a turn's markup cannot be told from a turn in the folder template's text: refused by name
    quoting = _write(tmp_path / "quoting.jsonl", [{"messages": [{"role": "user", "content": QUOTING_CHATML},
                                                                {"role": "assistant", "content": "Sure."}]}])
    real_vocab = dataclasses.replace(qwen35_preset("tiny"), vocab_size=248320)
    with pytest.raises(ValueError, match=f"{quoting}:1: .* wrote 2 assistant turns for 1 assistant messages"):
        qwen35_preprocess_sft([quoting], tmp_path / "out", real_vocab, tokenizer_dir=str(folder))
    assert not (tmp_path / "out").exists()
