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
import random
from pathlib import Path

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
    folder = a.media_dir / IMAGES
    images = sorted(f.name for f in folder.glob("*.png"))
    if not images:
        raise SystemExit(f"error: no images in {folder} (run tools/data/make_vl_demo.py first)")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = conversations(images)
    (a.out / "chats.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {a.out / 'chats.jsonl'}: {len(rows)} conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
