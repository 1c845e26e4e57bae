"""The last step of `make demo` (recipes/tiny.sh) and `make demo-vl` (recipes/tiny-vl.sh): the loss plot, the export
checked by generation, the summary.

    python -m megatron_qwen35.demo --tensorboard DIR --resumed-at N --checkpoint DIR --hf-export DIR --png PATH
                                   [--image PNG]

Reads the per-step losses megatron.training wrote to TensorBoard (its text log averages over each log interval),
plots them with the resume point marked, greedily continues a prompt twice -- with transformers' own
AutoModelForCausalLM on the Hugging Face export, and with megatron_qwen35's `generate` on the Megatron checkpoint --
requires the same tokens from both (fp32 both; exit 1 if not), and prints one line:
`demo: loss <first> -> <last>; checkpoint <dir>; hf export <dir>; megatron and transformers generated: <text>`.

With `--image`, the prompt follows the image (`<image>` + prompt, through the data pipeline's processor), and
transformers runs its Qwen3_5(Moe)ForConditionalGeneration.
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


# Greedy, up to 24 new tokens, ending at <|endoftext|> but not within the first 12 (a tiny model ends early).
GENERATION = dict(max_new_tokens=24, min_new_tokens=12)


def generate_with_transformers(hf_dir: Path, prompt: dict, eod_id: int) -> list[int]:
    """Greedy continuation of `prompt` (input_ids [1, s], and the vision inputs of an image prompt) by transformers'
    own model class loaded from the export."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from megatron_qwen35.hf_reference import use_torch_paths

    use_torch_paths()  # transformers may have bound FLA's GPU kernels; this is a CPU run
    auto = AutoModelForImageTextToText if "pixel_values" in prompt else AutoModelForCausalLM
    model = auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=False, eos_token_id=eod_id, pad_token_id=eod_id, **GENERATION)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def generate_with_megatron(checkpoint: Path, prompt: dict, eod_id: int) -> list[int]:
    """The same continuation by megatron_qwen35's `generate` on the Megatron checkpoint (fp32, as the export)."""
    from megatron_qwen35.inference import generate, load_model

    ids = prompt["input_ids"]
    vision = {k: v for k, v in prompt.items() if k in ("pixel_values", "image_grid_thw")}
    out = generate(load_model(checkpoint), ids, GENERATION["max_new_tokens"], eos_token_id=eod_id,
                   min_new_tokens=GENERATION["min_new_tokens"], **vision)
    return out[0, ids.shape[1]:].tolist()


def _prompt(checkpoint: Path, text: str, image: Path | None) -> tuple[dict, object]:
    """The prompt's model inputs and the tokenizer: plain tokens, or the data pipeline's processor on an image."""
    from megatron_qwen35.checkpoint import read_config
    from megatron_qwen35.data.tokenizer import qwen35_tokenizer_for

    cfg, _ = read_config(checkpoint)
    tokenizer = qwen35_tokenizer_for(cfg)
    if image is None:
        return {"input_ids": torch.tensor([tokenizer.encode(text)])}, tokenizer
    from PIL import Image

    from megatron_qwen35.data.vl_processor import IMAGE_PLACEHOLDER, Qwen35VLProcessor
    from megatron_qwen35.layers.rotary import token_types

    processor = Qwen35VLProcessor(cfg.vision, tokenizer, image_pixels=DEMO_IMAGE_PIXELS)
    inputs = processor(IMAGE_PLACEHOLDER + text, images=[Image.open(image).convert("RGB")])
    ids = inputs["input_ids"][:-1].unsqueeze(0)  # without the end-of-document id a sample ends with
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
            "mm_token_type_ids": token_types(ids, cfg.vision)}, tokenizer


DEMO_IMAGE_PIXELS = (1024, 16384)  # recipes/tiny-vl.sh's --image-pixels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="summarise the CPU demo")
    p.add_argument("--tensorboard", type=Path, required=True, help="megatron.training's --tensorboard-dir")
    p.add_argument("--resumed-at", type=int, default=None, help="the step after which a new process resumed")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--hf-export", type=Path, required=True)
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--prompt", default="The small model")
    p.add_argument("--image", type=Path, default=None, help="an image the prompt follows (a VL model)")
    a = p.parse_args(argv)
    losses = tensorboard_scalars(a.tensorboard, "lm loss")
    if not losses:
        raise SystemExit(f"error: no 'lm loss' scalars in {a.tensorboard}")
    title = "tiny Qwen3.5-VL (ViT + GDN + gated attention + MoE + MTP) on CPU" if a.image else None
    plot_loss(losses, a.png, resumed_at=a.resumed_at, mtp_losses=tensorboard_scalars(a.tensorboard, "mtp_1 loss"),
              **({"title": title} if title else {}))
    prompt, tokenizer = _prompt(a.checkpoint, a.prompt, a.image)
    by_transformers = generate_with_transformers(a.hf_export, prompt, tokenizer.eod_id)
    by_megatron = generate_with_megatron(a.checkpoint, prompt, tokenizer.eod_id)
    if by_megatron != by_transformers:
        raise SystemExit(f"error: megatron generated {by_megatron} from {a.checkpoint}, transformers "
                         f"{by_transformers} from its export {a.hf_export}: the export or generation is wrong")
    text = " ".join(tokenizer.decode(by_transformers).split())
    first, last = losses[min(losses)], losses[max(losses)]
    seen = f" (after the image {a.image.name})" if a.image else ""
    print(f"demo: loss {first:.3f} -> {last:.3f}; checkpoint {a.checkpoint}; hf export {a.hf_export}; "
          f"megatron and transformers generated{seen}: {a.prompt} {text}")


if __name__ == "__main__":
    main()
