"""CPU chat fine-tuning speed: packed sequences against one conversation per (padded) sequence, same conversations.

The conversations are data/sft/chats.jsonl's text rows (its image rows need a vision tower), preprocessed by
`qwen35_preprocess_sft` for the model; the first --conversations of them that fit a --seq-length sequence are
trained (the arithmetic ones are 111-300 tokens; the tool-call ones, ~1470 tokens, fit from --seq-length 1470).
`Qwen35SFTDataset` lays the same conversations out twice: packed (first-fit, several per sequence: what
--sft-data-path trains) and one per sequence (--no-sft-packing), every sequence padded to --seq-length.

A pass over them is one training step short of the optimizer, run as pretrain_qwen35.py runs it: megatron DDP
around the model, `get_forward_backward_func()` over the sequences as micro-batches of one (collated as the data
loader does), our `forward_step` (its get_batch hands each sequence's boundaries to the model as THD
PackedSeqParams), per-token loss, `finalize_model_grads`. No optimizer step: its cost is per step, not per token
(with the same --global-batch-size in sequences, packed training also takes fewer steps per epoch).

The model is a 4-layer slice of the 0.8b preset (hidden 1024: 3 Gated DeltaNet layers and 1 gated attention layer
at the real head sizes, dense MLP 3584), text only, no MTP, fp32, random weights, with the byte tokenizer's 512-token
vocabulary, so that the layers, not the output layer, carry the cost. Both layouts give the same loss per token (the
objective does not depend on packing; checked to 1e-5). Passes are interleaved, best of --repeats (background load
would otherwise favour one side; where other processes share the cores, --threads 1 keeps OpenMP from waiting on a
descheduled thread, which otherwise slows passes ten-fold at random). Speed is real tokens (the conversations',
padding not counted) trained per second.
The last line is `ratio <packed/padded>` of real tokens per second.

Run: python benchmarks/packing.py [--seq-length 1024] [--conversations 8] [--layers 4] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser would compile on the CPU: same numbers

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config  # noqa: E402
from megatron_qwen35.data.preprocess_sft import qwen35_preprocess_sft  # noqa: E402
from megatron_qwen35.data.sft_dataset import Qwen35SFTDataset, sft_samples  # noqa: E402
from megatron_qwen35.data.vl_processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER  # noqa: E402
from megatron_qwen35.provider import qwen35_gpt_model  # noqa: E402
from megatron_qwen35.runtime import initialize_parallel  # noqa: E402
from megatron_qwen35.training.steps import forward_step  # noqa: E402

CHATS = ROOT / "data" / "sft" / "chats.jsonl"
MODES = {"packed": True, "padded": False}  # name -> Qwen35SFTDataset's pack
LOSS_RTOL = 1e-5  # fp32 sums over the same tokens in another order


def text_chats(src: Path, dst: Path) -> int:
    """Copy `src`'s rows without images or videos to `dst` (a text model's preprocessing refuses those, and would
    name a row this filter misses); returns how many. The rows are not parsed with their files: only their text is
    trained here, so a missing image does not matter."""

    def text(content) -> bool:  # a string without <image> / <video> placeholders, or a list of text items
        if isinstance(content, list):
            return all(isinstance(i, dict) and i.get("type") == "text" and set(i) == {"type", "text"} for i in content)
        return content is None or (IMAGE_PLACEHOLDER not in content and VIDEO_PLACEHOLDER not in content)

    rows = [line for line in src.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if not (row := json.loads(line)).get("images") and not row.get("videos")
            and all(text(m.get("content")) for m in row["messages"])]
    dst.write_text("".join(line + "\n" for line in keep))
    return len(keep)


def build_model(cfg):
    """The model as pretrain_qwen35.py trains it on one rank: DDP around it, megatron's grad finalisation hooked in."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    logging.getLogger("megatron.core.distributed").setLevel(logging.WARNING)  # not its every parameter's name
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, calculate_per_token_loss=True)
    tc.finalize_model_grads_func = finalize_model_grads  # as megatron.training's setup sets it
    model = DistributedDataParallel(tc, DistributedDataParallelConfig(), qwen35_gpt_model(cfg, tc, backend="local"))
    return model.train()


def set_training_args(cfg, data_dir: Path, seq_length: int) -> None:
    """The megatron.training args that forward_step / get_batch read (this process runs no megatron.training)."""
    from megatron.training import global_vars

    global_vars.set_args(Namespace(
        sft_data_path=str(data_dir), seq_length=seq_length, micro_batch_size=1, padded_vocab_size=cfg.vocab_size,
        mtp_num_layers=cfg.mtp_num_layers or None, create_attention_mask_in_dataloader=False, data_path=None,
        qwen35_preset=cfg.name, hf_config=None, check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=False))


def train_pass(model, batches: list[dict]) -> tuple[float, float]:
    """One step's forward and backward over `batches` (micro-batches of one sequence); (seconds, loss per token)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    start = time.perf_counter()
    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].shape[-1], micro_batch_size=1)
    seconds = time.perf_counter() - start
    total = torch.stack([d["lm loss"] for d in losses]).sum(0)  # each micro-batch's [loss sum, loss tokens]
    return seconds, (total[0] / total[1]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--conversations", type=int, default=8,
                        help="the first N text conversations that fit a sequence (108 text rows in all)")
    parser.add_argument("--layers", type=int, default=4, help="decoder depth of the 0.8b slice (the preset has 24)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    initialize_parallel()
    torch.manual_seed(0)
    cfg = qwen35_preset("0.8b").replace(num_layers=args.layers, vocab_size=512, vision=None, mtp_num_layers=0,
                                        name=f"0.8b-{args.layers}l-text")
    with tempfile.TemporaryDirectory(prefix="qwen35-packing-bench-") as tmp:
        text_rows = text_chats(CHATS, Path(tmp) / "chats.jsonl")
        qwen35_preprocess_sft([Path(tmp) / "chats.jsonl"], Path(tmp) / "sft", cfg)
        samples = sft_samples(Path(tmp) / "sft")
        lengths = samples.sizes["tokens"]
        indices = np.nonzero(lengths <= args.seq_length)[0][:args.conversations]
        datasets = {mode: Qwen35SFTDataset(samples, indices, args.seq_length, 1, pack=pack)
                    for mode, pack in MODES.items()}
        batches = {mode: [torch.utils.data.default_collate([d.sequence(s)]) for s in d.sequences]
                   for mode, d in datasets.items()}  # the data loader's micro-batches of one
        set_training_args(cfg, Path(tmp) / "sft", args.seq_length)
        real = datasets["packed"].real_tokens
        print(f"model {cfg.name}: hidden {cfg.hidden_size}, layers {cfg.layer_types}, vocab {cfg.vocab_size}, fp32, "
              f"DDP, forward + backward, no optimizer step, threads={torch.get_num_threads()}; "
              f"{len(indices)} conversations ({real} tokens, {int(lengths[indices].min())}-"
              f"{int(lengths[indices].max())} each) of {text_rows} text rows, {args.seq_length}-token sequences")
        model = build_model(cfg)
        train_pass(model, batches["packed"][:1])  # warm-up (first-call allocations), not timed
        best = dict.fromkeys(MODES, float("inf"))
        loss = {}
        for _ in range(args.repeats):
            for mode in MODES:
                seconds, loss[mode] = train_pass(model, batches[mode])
                best[mode] = min(best[mode], seconds)
    same = abs(loss["packed"] - loss["padded"]) <= LOSS_RTOL * abs(loss["padded"])
    print(f"loss per token: packed {loss['packed']:.6f}, padded {loss['padded']:.6f}; the same: {same}")
    speed = {}
    for mode, d in datasets.items():
        n = len(d.sequences)
        speed[mode] = real / best[mode]
        print(f"{mode:>7}: {n} sequences per pass, real tokens {real / (n * args.seq_length):.1%} of "
              f"{n * args.seq_length}, {best[mode]:.2f} s, {speed[mode]:.0f} real tokens/s")
    print(f"ratio {speed['packed'] / speed['padded']:.2f}")


if __name__ == "__main__":
    main()
