#!/usr/bin/env bash
# usage: bash recipes/tiny-sft.sh        (what `make demo-sft` runs; CPU is enough, ~6 minutes on 2 cores)
# Chat fine-tuning on the embedded default: render the demo conversations in data/sft (sums with and without
# reasoning, questions about data/vl's images, a tool call) with Qwen3.5's chat template and the real tokenizer,
# loss on what the assistant says, pack them into sequences, train the tiny VL model (ViT + GDN + gated attention +
# MoE with shared expert + MTP) on them through pretrain_qwen35.py, export to Hugging Face, and ask the model about an
# image in the chat format: Megatron (tools/generate.py --chat, streamed) and transformers on the export must answer
# token for token alike. 120 steps teach the tiny model the chat format (replies, tool calls, <|im_end|>), not yet
# what each image shows.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
OUT=${OUT:-$REPO/out/demo-sft}
ITERS=${ITERS:-120}
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}  # megatron's jit_fuser would compile on CPU for no gain
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron's deprecation notices would drown the demo's output

rm -rf "$OUT" && mkdir -p "$OUT"
# the rows name images/NAME.png in data/vl; small images (32 x 32 to 128 x 128 pixels) keep the tiny tower's
# sequences short
"$PYTHON" "$REPO/tools/data/preprocess_sft.py" --input "$REPO/data/sft/chats.jsonl" --output-dir "$OUT/data" \
  --qwen35-preset tiny-vl-demo --media-dir "$REPO/data/vl" --image-pixels 1024 16384 --seq-length 384

TRAIN_ARGS=(--qwen35-preset tiny-vl-demo
  --micro-batch-size 1 --global-batch-size 2 --seq-length 384
  --lr 5e-3 --min-lr 5e-4 --lr-decay-style cosine --lr-warmup-iters 10 --lr-decay-iters "$ITERS"
  --weight-decay 0.01 --clip-grad 1.0 --seed 1234 --train-iters "$ITERS"
  --sft-data-path "$OUT/data" --split 100,0,0 --tokenizer-type NullTokenizer --null-tokenizer-eod-id 248044
  --save "$OUT/checkpoint" --save-interval "$ITERS" --log-interval 5 --eval-iters 0
  --ckpt-format torch_dist --tensorboard-dir "$OUT/tensorboard" --tensorboard-log-interval 1)
show_steps() { tee -a "$OUT/train.log" | { grep --line-buffered -E "^ \[.*iteration +[0-9]+/|error|Error" || true; }; }
"$PYTHON" "$REPO/pretrain_qwen35.py" "${TRAIN_ARGS[@]}" 2>&1 | show_steps

"$PYTHON" "$REPO/tools/convert/megatron_to_hf.py" --megatron-dir "$OUT/checkpoint" --out-dir "$OUT/hf"
# Megatron answers from the checkpoint, streaming; the summary then requires transformers' tokens on the export.
IMAGE=${IMAGE:-$REPO/data/vl/images/05_red_square.png}
PROMPT=${PROMPT:-What shape is in this picture?}
"$PYTHON" "$REPO/tools/generate.py" --checkpoint "$OUT/checkpoint" --chat --no-thinking --image "$IMAGE" \
  --image-pixels 1024 16384 --prompt "$PROMPT" --max-new-tokens 24
"$PYTHON" -m megatron_qwen35.demo --tensorboard "$OUT/tensorboard" --checkpoint "$OUT/checkpoint" \
  --hf-export "$OUT/hf" --png "$OUT/loss.png" --chat --image "$IMAGE" --prompt "$PROMPT"
