"""`make demo`: the model's life cycle on whatever machine this is (CPU included), in about a minute.

Builds the tiny hybrid Qwen3.5 (Gated DeltaNet + gated attention, MoE with a gated shared expert, MTP) through the
same specs and provider as the real sizes, trains it with Adam on a short text (bytes as tokens) until the loss
falls, saves a Megatron distributed checkpoint, reloads it with `load_model`, exports the weights to Hugging Face
names and checks that transformers' Qwen3.5 gives the same logits. The full pretraining entry point, real
tokenizer data and recipes are separate (see README).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch

TEXT = (b"Qwen3.5 mixes Gated DeltaNet layers with gated attention; Megatron-Core scales it with tensor, "
        b"sequence, expert, pipeline, context and data parallelism. ") * 4


def main(steps: int = 60, out_dir: str | None = None) -> None:
    from megatron_qwen35.checkpoint import save_checkpoint
    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.convert.model_state import export_hf_state_dict
    from megatron_qwen35.inference import load_model
    from megatron_qwen35.provider import qwen35_gpt_model
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(seed=1234)
    cfg = qwen35_preset("tiny-moe")
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32))
    tokens = torch.tensor(list(TEXT), dtype=torch.long) % cfg.vocab_size
    seq = 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses, start = [], time.time()
    for step in range(steps):
        offsets = torch.randint(0, len(tokens) - seq - 1, (4,), generator=g)
        batch = torch.stack([tokens[o:o + seq + 1] for o in offsets])
        ids, labels = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(seq).unsqueeze(0).expand_as(ids)
        loss = model(ids, pos, None, labels=labels).mean()  # MTP and MoE aux losses ride on the graph
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)

    ckpt = Path(out_dir or tempfile.mkdtemp(prefix="qwen35_demo_")) / "checkpoint"
    save_checkpoint(model, cfg, ckpt, iteration=steps)
    reloaded = load_model(ckpt)
    ids = tokens[None, :48]
    ours = reloaded(ids)

    from megatron_qwen35.hf_reference import modeling, reference_config

    hf = modeling(cfg.is_moe).Qwen3_5MoeForCausalLM(reference_config(cfg)).float().eval()
    hf.load_state_dict(export_hf_state_dict(reloaded.model, cfg, include_mtp=False), strict=True)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    delta = (ours - theirs).abs().max().item()
    print(f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.time() - start:.0f}s; checkpoint {ckpt}; "
          f"transformers logits max |delta| {delta:.2e}")


if __name__ == "__main__":
    main()
