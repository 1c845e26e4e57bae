"""The last step of `make demo` (recipes/tiny.sh), `make demo-vl` (recipes/tiny-vl.sh) and `make demo-sft`
(recipes/tiny-sft.sh): the loss plot, the export checked by generation, the summary.

    python -m megatron_qwen35.demo --tensorboard DIR --resumed-at N --checkpoint DIR --hf-export DIR --png PATH
                                   [--image PNG] [--chat]

Reads the per-step losses megatron.training wrote to TensorBoard (its text log averages over each log interval),
plots them with the resume point marked, greedily continues a prompt twice -- with transformers' own
AutoModelForCausalLM on the Hugging Face export, and with megatron_qwen35's `generate` on the Megatron checkpoint --
requires the same tokens from both (fp32 both; exit 1 if not), and prints one line:
`demo: loss <first> -> <last>; checkpoint <dir>; hf export <dir>; megatron and transformers generated: <text>`.

With `--image`, the prompt follows the image (`<image>` + prompt, through the data pipeline's processor), and
transformers runs its Qwen3_5(Moe)ForConditionalGeneration. With `--chat`, the prompt is the user's turn in Qwen3.5's
chat template (megatron_qwen35/chat.py, thinking off: the reply follows an empty thinking block), the image in it, and
both generate the reply up to `<|im_end|>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def tensorboard_scalars(tensorboard_dir: Path | str, tag: str) -> dict[int, float]:
    """{step: value} of one scalar over every event file in a TensorBoard directory (a resumed run adds a file; the
    newest value of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(tensorboard_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def plot_loss(losses: dict[int, float], path: Path, *, resumed_at: int | None = None,
              mtp_losses: dict[int, float] | None = None,
              title: str = "tiny Qwen3.5 (GDN + gated attention + MoE + MTP) on CPU") -> None:
    """The LM loss per step (and the MTP head's), with the step the second process resumed after marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(list(losses), list(losses.values()), label="LM loss", color="tab:red")
    if mtp_losses:
        ax.plot(list(mtp_losses), list(mtp_losses.values()), label="MTP loss (next-but-one token)",
                color="tab:blue", alpha=0.6)
    if resumed_at is not None:
        ax.axvline(resumed_at + 0.5, color="gray", linestyle="--", label=f"resumed from checkpoint (step {resumed_at})")
    ax.set_xlabel("training step (global batch)")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Greedy, up to 24 new tokens, ending at <|endoftext|> but not within the first 12 (a tiny model ends early); a chat
# reply ends at its <|im_end|> whenever it comes.
GENERATION = dict(max_new_tokens=24, min_new_tokens=12)
CHAT_GENERATION = dict(max_new_tokens=24, min_new_tokens=0)


def generate_with_transformers(hf_dir: Path, prompt: dict, eod_id: int | list[int],
                               generation: dict = GENERATION) -> list[int]:
    """Greedy continuation of `prompt` (input_ids [1, s], and the vision inputs of an image prompt) by transformers'
    own model class loaded from the export."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from megatron_qwen35.hf_reference import use_torch_paths

    use_torch_paths()  # transformers may have bound FLA's GPU kernels; this is a CPU run
    auto = AutoModelForImageTextToText if "pixel_values" in prompt else AutoModelForCausalLM
    model = auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        pad = eod_id[0] if isinstance(eod_id, list) else eod_id
        out = model.generate(**prompt, do_sample=False, eos_token_id=eod_id, pad_token_id=pad, **generation)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def generate_with_megatron(checkpoint: Path, prompt: dict, eod_id: int | list[int],
                           generation: dict = GENERATION) -> list[int]:
    """The same continuation by megatron_qwen35's `generate` on the Megatron checkpoint (fp32, as the export)."""
    from megatron_qwen35.inference import generate, load_model

    ids = prompt["input_ids"]
    vision = {k: v for k, v in prompt.items() if k in ("pixel_values", "image_grid_thw")}
    out = generate(load_model(checkpoint), ids, generation["max_new_tokens"], eos_token_id=eod_id,
                   min_new_tokens=generation["min_new_tokens"], **vision)
    return out[0, ids.shape[1]:].tolist()


def _prompt(checkpoint: Path, text: str, image: Path | None, chat: bool = False) -> tuple[dict, object]:
    """The prompt's model inputs and the tokenizer: plain tokens, or the data pipeline's processor on an image; with
    `chat`, the chat template's rendering of the user's turn (thinking off) first."""
    from megatron_qwen35.chat import qwen35_chat_prompt, with_image_placeholders
    from megatron_qwen35.checkpoint import read_config
    from megatron_qwen35.data.tokenizer import qwen35_tokenizer_for

    cfg, _ = read_config(checkpoint)
    tokenizer = qwen35_tokenizer_for(cfg)
    if chat:
        rendered = qwen35_chat_prompt(cfg, text, num_images=int(image is not None), enable_thinking=False)
        text = with_image_placeholders(rendered, int(image is not None))
    if image is None:
        return {"input_ids": torch.tensor([tokenizer.encode(text)])}, tokenizer
    from PIL import Image

    from megatron_qwen35.data.vl_processor import IMAGE_PLACEHOLDER, Qwen35VLProcessor
    from megatron_qwen35.layers.rotary import token_types

    processor = Qwen35VLProcessor(cfg.vision, tokenizer, image_pixels=DEMO_IMAGE_PIXELS)
    inputs = processor(text if chat else IMAGE_PLACEHOLDER + text, images=[Image.open(image).convert("RGB")])
    ids = inputs["input_ids"][:-1].unsqueeze(0)  # without the end-of-document id a sample ends with
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
            "mm_token_type_ids": token_types(ids, cfg.vision)}, tokenizer


DEMO_IMAGE_PIXELS = (1024, 16384)  # recipes/tiny-vl.sh's --image-pixels


def main(argv=None) -> None:
    from megatron_qwen35.chat import qwen35_chat_end_ids

    p = argparse.ArgumentParser(description="summarise the CPU demo")
    p.add_argument("--tensorboard", type=Path, required=True, help="megatron.training's --tensorboard-dir")
    p.add_argument("--resumed-at", type=int, default=None, help="the step after which a new process resumed")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--hf-export", type=Path, required=True)
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--prompt", default="The small model")
    p.add_argument("--image", type=Path, default=None, help="an image the prompt follows (a VL model)")
    p.add_argument("--chat", action="store_true", help="the prompt is the user's turn in the chat template")
    a = p.parse_args(argv)
    losses = tensorboard_scalars(a.tensorboard, "lm loss")
    if not losses:
        raise SystemExit(f"error: no 'lm loss' scalars in {a.tensorboard}")
    title = "tiny Qwen3.5-VL (ViT + GDN + gated attention + MoE + MTP) on CPU" if a.image else None
    if a.chat:
        title = f"{title or 'tiny Qwen3.5 on CPU'}: chat fine-tuning (loss on the assistant's tokens)"
    plot_loss(losses, a.png, resumed_at=a.resumed_at, mtp_losses=tensorboard_scalars(a.tensorboard, "mtp_1 loss"),
              **({"title": title} if title else {}))
    prompt, tokenizer = _prompt(a.checkpoint, a.prompt, a.image, a.chat)
    end, generation = ((qwen35_chat_end_ids(tokenizer), CHAT_GENERATION) if a.chat else
                       (tokenizer.eod_id, GENERATION))
    by_transformers = generate_with_transformers(a.hf_export, prompt, end, generation)
    by_megatron = generate_with_megatron(a.checkpoint, prompt, end, generation)
    if by_megatron != by_transformers:
        raise SystemExit(f"error: megatron generated {by_megatron} from {a.checkpoint}, transformers "
                         f"{by_transformers} from its export {a.hf_export}: the export or generation is wrong")
    if a.chat:  # the reply, without the end of its turn
        by_transformers = [t for t in by_transformers if t not in end]
    text = " ".join(tokenizer.decode(by_transformers).split())
    first, last = losses[min(losses)], losses[max(losses)]
    seen = f" (after the image {a.image.name})" if a.image else ""
    said = f"{seen}: {a.prompt} {text}"
    if a.chat:
        said = f" the reply{' about ' + a.image.name if a.image else ''} to '{a.prompt}': {text}"
    print(f"demo: loss {first:.3f} -> {last:.3f}; checkpoint {a.checkpoint}; hf export {a.hf_export}; "
          f"megatron and transformers generated{said}")


if __name__ == "__main__":
    main()
