#!/usr/bin/env bash
# usage: bash recipes/tiny-vl.sh         (what `make demo-vl` runs; CPU is enough, a few minutes on 2 cores)
# Vision-language on the embedded default: preprocess the generated images and videos in data/vl with the real
# Qwen3.5 tokenizer and transformers' Qwen3.5 processor, train the tiny VL model (ViT + GDN + gated attention + MoE
# with shared expert + MTP) on them through pretrain_qwen35.py, export to Hugging Face, and let Megatron and
# transformers describe an image from the two checkpoints (they must agree token for token).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
OUT=${OUT:-$REPO/out/demo-vl}
ITERS=${ITERS:-60}
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}  # megatron's jit_fuser would compile on CPU for no gain
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron's deprecation notices would drown the demo's output

rm -rf "$OUT" && mkdir -p "$OUT"
# small images (32 x 32 to 128 x 128 pixels) keep the tiny tower's sequences short
"$PYTHON" "$REPO/tools/data/preprocess_vl.py" --input "$REPO/data/vl/captions.jsonl" --output-dir "$OUT/data" \
  --qwen35-preset tiny-vl-demo --image-pixels 1024 16384 --video-pixels 4096 65536

TRAIN_ARGS=(--qwen35-preset tiny-vl-demo
  --micro-batch-size 4 --global-batch-size 8 --seq-length 80
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --lr-decay-iters "$ITERS"
  --weight-decay 0.01 --clip-grad 1.0 --seed 1234 --train-iters "$ITERS"
  --vl-data-path "$OUT/data" --split 100,0,0 --tokenizer-type NullTokenizer --null-tokenizer-eod-id 248044
  --save "$OUT/checkpoint" --save-interval "$ITERS" --log-interval 5 --eval-iters 0
  --ckpt-format torch_dist --tensorboard-dir "$OUT/tensorboard" --tensorboard-log-interval 1)
show_steps() { tee -a "$OUT/train.log" | { grep --line-buffered -E "^ \[.*iteration +[0-9]+/|error|Error" || true; }; }
"$PYTHON" "$REPO/pretrain_qwen35.py" "${TRAIN_ARGS[@]}" 2>&1 | show_steps

"$PYTHON" "$REPO/tools/convert/megatron_to_hf.py" --megatron-dir "$OUT/checkpoint" --out-dir "$OUT/hf"
"$PYTHON" -m megatron_qwen35.demo --tensorboard "$OUT/tensorboard" --checkpoint "$OUT/checkpoint" \
  --hf-export "$OUT/hf" --png "$OUT/loss.png" --image "$REPO/data/vl/images/00_red_circle.png" \
  --prompt "${PROMPT:-This picture shows a}"
