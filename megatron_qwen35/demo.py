"""The last step of `make demo` (recipes/tiny.sh): the loss plot, the export checked by generation, the summary.

    python -m megatron_qwen35.demo --tensorboard DIR --resumed-at N --checkpoint DIR --hf-export DIR --png PATH

Reads the per-step losses megatron.training wrote to TensorBoard (its text log averages over each log interval),
plots them with the resume point marked, greedily continues a prompt twice -- with transformers' own
AutoModelForCausalLM on the Hugging Face export, and with megatron_qwen35's `generate` on the Megatron checkpoint --
requires the same tokens from both (fp32 both; exit 1 if not), and prints one line:
`demo: loss <first> -> <last>; checkpoint <dir>; hf export <dir>; megatron and transformers generated: <text>`.
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
              mtp_losses: dict[int, float] | None = None) -> None:
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
    ax.set_title("tiny Qwen3.5 (GDN + gated attention + MoE + MTP) on CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Greedy, up to 24 new tokens, ending at <|endoftext|> but not within the first 12 (a tiny model ends early).
GENERATION = dict(max_new_tokens=24, min_new_tokens=12)


def generate_with_transformers(hf_dir: Path, prompt_ids: list[int], eod_id: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by transformers' AutoModelForCausalLM loaded from the export."""
    from transformers import AutoModelForCausalLM

    from megatron_qwen35.hf_reference import use_torch_paths

    use_torch_paths()  # transformers may have bound FLA's GPU kernels; this is a CPU run
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, eos_token_id=eod_id, pad_token_id=eod_id, **GENERATION)
    return out[0, ids.shape[1]:].tolist()


def generate_with_megatron(checkpoint: Path, prompt_ids: list[int], eod_id: int) -> list[int]:
    """The same continuation by megatron_qwen35's `generate` on the Megatron checkpoint (fp32, as the export)."""
    from megatron_qwen35.inference import generate, load_model

    out = generate(load_model(checkpoint), torch.tensor([prompt_ids]), GENERATION["max_new_tokens"],
                   eos_token_id=eod_id, min_new_tokens=GENERATION["min_new_tokens"])
    return out[0, len(prompt_ids):].tolist()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="summarise the CPU demo")
    p.add_argument("--tensorboard", type=Path, required=True, help="megatron.training's --tensorboard-dir")
    p.add_argument("--resumed-at", type=int, default=None, help="the step after which a new process resumed")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--hf-export", type=Path, required=True)
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--prompt", default="The small model")
    a = p.parse_args(argv)
    losses = tensorboard_scalars(a.tensorboard, "lm loss")
    if not losses:
        raise SystemExit(f"error: no 'lm loss' scalars in {a.tensorboard}")
    plot_loss(losses, a.png, resumed_at=a.resumed_at, mtp_losses=tensorboard_scalars(a.tensorboard, "mtp_1 loss"))
    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    tokenizer = Qwen35Tokenizer()
    prompt_ids = tokenizer.encode(a.prompt)
    by_transformers = generate_with_transformers(a.hf_export, prompt_ids, tokenizer.eod_id)
    by_megatron = generate_with_megatron(a.checkpoint, prompt_ids, tokenizer.eod_id)
    if by_megatron != by_transformers:
        raise SystemExit(f"error: megatron generated {by_megatron} from {a.checkpoint}, transformers "
                         f"{by_transformers} from its export {a.hf_export}: the export or generation is wrong")
    text = " ".join(tokenizer.decode(by_transformers).split())
    first, last = losses[min(losses)], losses[max(losses)]
    print(f"demo: loss {first:.3f} -> {last:.3f}; checkpoint {a.checkpoint}; hf export {a.hf_export}; "
          f"megatron and transformers generated: {a.prompt} {text}")


if __name__ == "__main__":
    main()
