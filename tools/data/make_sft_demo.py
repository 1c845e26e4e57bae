#!/usr/bin/env python
"""Write the embedded chat demo set: conversations in tools/data/preprocess_sft.py's format, some about data/vl's
images, so that a tiny model can learn to answer in Qwen3.5's chat format.

usage: python tools/data/make_sft_demo.py [--out data/sft] [--media-dir data/vl]
Writes OUT/chats.jsonl: arithmetic questions (with reasoning, multi-turn, a system prompt in some), questions about
the shapes drawn in data/vl/images (content items naming `images/NAME.png`: preprocess with --media-dir data/vl), a
tool call and its response. Every
answer follows from the question, so a model can learn it. Deterministic (a seeded generator); tests/test_sft_demo.py
regenerates the file and compares it with data/sft.
"""

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron_qwen35.cli import run_tool  # noqa: E402

IMAGES = "images"  # in the media folder (data/vl): the images tools/data/make_vl_demo.py draws
SYSTEM = "You are a helpful assistant. Answer briefly."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = {"Paris": "sunny", "Rome": "rainy", "Oslo": "snowy", "Lima": "cloudy"}


def arithmetic(g: random.Random) -> dict:
    turns = [{"role": "system", "content": SYSTEM}] if g.random() < 0.3 else []
    for _ in range(g.choice((1, 1, 2))):
        a, b = g.randint(1, 20), g.randint(1, 20)
        turns.append({"role": "user", "content": f"What is {a} plus {b}?"})
        answer = {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}
        if g.random() < 0.5:
            answer["reasoning_content"] = f"{a} + {b} = {a + b}."
        turns.append(answer)
    return {"messages": turns}


def about_image(g: random.Random, name: str) -> dict:
    """A question about one of data/vl's images (named like 00_red_circle.png): its shape or colour."""
    _, colour, shape = Path(name).stem.split("_")
    asks_shape = g.random() < 0.5
    question = "What shape is in this picture?" if asks_shape else "What colour is the shape?"
    answer = f"It is a {shape}." if asks_shape else f"It is {colour}."
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": f"{IMAGES}/{name}"},
                                                       {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def weather(g: random.Random) -> dict:
    city = g.choice(sorted(CITIES))
    return {"messages": [{"role": "user", "content": f"What is the weather in {city}?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
                         {"role": "tool", "content": CITIES[city]},
                         {"role": "assistant", "content": f"It is {CITIES[city]} in {city} today."}],
            "tools": [WEATHER_TOOL]}


def conversations(images: list[str]) -> list[dict]:
    g = random.Random(35)
    rows = [arithmetic(g) for _ in range(96)]
    rows += [about_image(g, name) for name in images for _ in range(2)]
    rows += [weather(g) for _ in range(12)]
    g.shuffle(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(__file__).resolve().parents[2] / "data"
    p.add_argument("--out", type=Path, default=data / "sft")
    p.add_argument("--media-dir", type=Path, default=data / "vl", help="the folder holding images/")
    a = p.parse_args(argv)
    return run_tool(lambda: write_demo(a.out, a.media_dir), doing="writing the chat demo set")


def write_demo(out: Path, media_dir: Path) -> str:
    """OUT/chats.jsonl, written whole beside OUT and then moved in (a failure leaves OUT as it was)."""
    folder = media_dir / IMAGES
    images = sorted(f.name for f in folder.glob("*.png"))
    if not images:
        raise ValueError(f"no images in {folder} (run tools/data/make_vl_demo.py first)")
    rows = conversations(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-chats-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out.mkdir(exist_ok=True)
        os.replace(tmp, out / "chats.jsonl")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return f"wrote {out / 'chats.jsonl'}: {len(rows)} conversations"


if __name__ == "__main__":
    raise SystemExit(main())
