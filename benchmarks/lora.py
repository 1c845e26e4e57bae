"""LoRA against full fine-tuning of the same model, as users run them (pretrain_qwen35.py -> megatron.training), CPU.

The model is a slice of a public MoE size at its real per-layer shapes (default: 35b-a3b's hidden 2048, 16 query /
2 KV heads, GDN heads, experts of 512 and a shared expert of 512), with fewer layers and experts so that it fits a
laptop, and the byte tokenizer's 512-token vocabulary (the embedding and output layer, which LoRA leaves frozen, would
otherwise dominate both runs). Full fine-tuning starts from random weights; LoRA adapts the full run's checkpoint
(--pretrained-checkpoint, as the recipes pass LOAD=), both on megatron's mock data, fp32, the distributed optimizer
(Adam), one process, the same flags but the LoRA ones.

Printed per run, from the run itself: trainable parameters (the adapters', or the whole model's), the bytes of
megatron's optimizer state in the checkpoint it saves (Adam's two moments and the fp32 master copy), peak resident
memory of the training process, median step time (megatron's log, after the first step), and the checkpoint's size
on disk (LoRA's holds the adapters and their optimizer state, not the frozen base); then the LoRA adapter's own size
as a Hugging Face PEFT adapter (megatron_to_hf.py --adapter-only) over the merged model's export. The last line is
`ratio <lora/full step time>`.

Run: python benchmarks/lora.py [--preset 35b-a3b] [--layers 4] [--experts 16] [--rank 16] [--iters 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

STEP_TIME = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
MAXRSS = "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; " \
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"


def slice_config(preset: str, layers: int, experts: int, out: Path) -> Path:
    """config.json of `preset` cut to `layers` layers (the last full attention) and `experts` experts."""
    from megatron_qwen35.config import qwen35_config_to_hf, qwen35_preset

    cfg = qwen35_preset(preset)
    changes = dict(num_layers=layers, vocab_size=512, mtp_num_layers=0, vision=None, name=f"{preset}-slice")
    if cfg.is_moe:
        changes |= dict(num_experts=experts, moe_router_topk=min(cfg.moe_router_topk, experts))
    path = out / "config.json"
    path.write_text(json.dumps(qwen35_config_to_hf(cfg.replace(**changes)), indent=2))
    return path


def train(config: Path, save: Path, iters: int, extra: list[str]) -> dict:
    """One pretrain_qwen35.py run; what it measured."""
    command = [sys.executable, "-c", MAXRSS, sys.executable, str(ROOT / "pretrain_qwen35.py"), "--hf-config",
               str(config), "--mock-data", "--tokenizer-type", "NullTokenizer", "--micro-batch-size", "1",
               "--global-batch-size", "1", "--seq-length", "256", "--train-iters", str(iters), "--lr", "1e-4",
               "--use-distributed-optimizer", "--eval-iters", "0", "--log-interval", "1", "--save", str(save),
               "--save-interval", str(iters), "--ckpt-format", "torch_dist", "--seed", "7", *extra]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stderr[-4000:]}")
    steps = [float(t) for t in STEP_TIME.findall(done.stdout)]
    return {"step_ms": statistics.median(steps[1:] or steps), "peak_rss": int(done.stderr.strip().splitlines()[-1])
            * 1024, **checkpoint_sizes(save, "--lora-rank" in extra)}


def checkpoint_sizes(save: Path, lora: bool) -> dict:
    """Trainable parameters (the adapters' tensors, or all the model's), optimizer-state bytes (read off the
    checkpoint's metadata), and its size on disk."""
    from megatron_qwen35.checkpoint import TRAINING_STATE_KEY, iteration_dir, latest_iteration
    from megatron_qwen35.convert.torch_dist import TorchDistReader

    directory = iteration_dir(save, latest_iteration(save))
    reader = TorchDistReader(directory)
    try:
        optimizer = {k: md for k, md in reader.tensors.items() if TRAINING_STATE_KEY.match(k)}
        model = {k: md for k, md in reader.tensors.items() if k not in optimizer}
        trainable = sum(_numel(md.size) for k, md in model.items() if not lora or ".lora." in k)
        assert not lora or all(".lora." in k for k in model), "a LoRA checkpoint holds the adapters alone"
        state = sum(_numel(md.size) * md.properties.dtype.itemsize for md in optimizer.values())
    finally:
        reader.close()
    return {"trainable": trainable, "optimizer_bytes": state, "checkpoint_bytes": _bytes(directory)}


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="35b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=4)
    a = p.parse_args(argv)

    from megatron_qwen35.runtime import apply_runtime_patches

    apply_runtime_patches()
    from megatron_qwen35.convert.megatron_to_hf import qwen35_adapter_to_peft, qwen35_megatron_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = slice_config(a.preset, a.layers, a.experts, tmp)
        print(f"model: {a.preset} slice ({a.layers} layers, {a.experts} experts, vocabulary 512), fp32, "
              f"seq 256, Adam (distributed optimizer), LoRA rank {a.rank} on every linear")
        runs = {"full": train(config, tmp / "full", a.iters, [])}
        runs["lora"] = train(config, tmp / "lora", a.iters, ["--lora-rank", str(a.rank), "--pretrained-checkpoint",
                                                             str(tmp / "full")])
        for name, r in runs.items():
            print(f"{name:5s} trainable {r['trainable']:>12,d}  "
                  f"optimizer state {r['optimizer_bytes'] / 2**20:9.1f} MiB  "
                  f"peak RSS {r['peak_rss'] / 2**20:8.1f} MiB  step {r['step_ms']:8.1f} ms  "
                  f"checkpoint {r['checkpoint_bytes'] / 2**20:9.1f} MiB")
        adapter = _bytes(qwen35_adapter_to_peft(tmp / "lora", tmp / "adapter"))
        merged = _bytes(qwen35_megatron_to_hf(tmp / "lora", tmp / "merged", base_dir=tmp / "full", progress=False))
        print(f"PEFT adapter {adapter / 2**20:.2f} MiB, merged export {merged / 2**20:.1f} MiB")
        full, lora = runs["full"], runs["lora"]

        def ratio(key: str) -> float:
            return lora[key] / full[key]

        print(f"ratio trainable {ratio('trainable'):.4f}  optimizer state {ratio('optimizer_bytes'):.4f}  "
              f"peak RSS {ratio('peak_rss'):.3f}  checkpoint {ratio('checkpoint_bytes'):.3f}  "
              f"adapter/merged {adapter / merged:.4f}")
        print(f"ratio {lora['step_ms'] / full['step_ms']:.3f}")


if __name__ == "__main__":
    main()
