#!/usr/bin/env bash
# usage: bash recipes/tiny.sh            (what `make demo` runs; CPU is enough, ~5 minutes on 2 cores)
# The whole life cycle on the embedded default: tokenize the corpus that ships in data/ with the real Qwen3.5
# tokenizer, train the tiny hybrid model (GDN + gated attention + MoE with shared expert + MTP) half-way, save,
# resume from the checkpoint to the end, export to Hugging Face, and generate a line in Megatron (streamed) and with
# transformers from the export (the two must agree token for token).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
OUT=${OUT:-$REPO/out/demo}
ITERS=${ITERS:-80}
HALF=$((ITERS / 2))
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}  # megatron's jit_fuser would compile on CPU for no gain
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron's deprecation notices would drown the demo's output

rm -rf "$OUT" && mkdir -p "$OUT"
"$PYTHON" "$REPO/tools/data/preprocess.py" --input "$REPO/data/tiny_corpus.txt" --output-prefix "$OUT/data/corpus" \
  --workers 2

TRAIN_ARGS=(--qwen35-preset tiny-demo
  --micro-batch-size 4 --global-batch-size 4 --seq-length 64
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 --lr-decay-iters "$ITERS"
  --weight-decay 0.01 --clip-grad 1.0 --seed 1234 --train-iters "$ITERS"
  --data-path "$OUT/data/corpus" --split 100,0,0 --tokenizer-type NullTokenizer --null-tokenizer-eod-id 248044
  --save "$OUT/checkpoint" --load "$OUT/checkpoint" --save-interval "$HALF" --log-interval 5 --eval-iters 0
  --ckpt-format torch_dist --tensorboard-dir "$OUT/tensorboard" --tensorboard-log-interval 1)
# First half, then a separate process resumes from the saved checkpoint (optimizer, scheduler and data position).
# megatron.training's whole log goes to train.log; the terminal shows its step lines.
show_steps() { tee -a "$OUT/train.log" | { grep --line-buffered -E "^ \[.*iteration +[0-9]+/|error|Error" || true; }; }
"$PYTHON" "$REPO/pretrain_qwen35.py" "${TRAIN_ARGS[@]}" --exit-interval "$HALF" 2>&1 | show_steps
"$PYTHON" "$REPO/pretrain_qwen35.py" "${TRAIN_ARGS[@]}" 2>&1 | show_steps

"$PYTHON" "$REPO/tools/convert/megatron_to_hf.py" --megatron-dir "$OUT/checkpoint" --out-dir "$OUT/hf"
# Megatron generates from the checkpoint, streaming; the summary then requires transformers' tokens on the export.
PROMPT=${PROMPT:-The small model}
"$PYTHON" "$REPO/tools/generate.py" --checkpoint "$OUT/checkpoint" --prompt "$PROMPT" --max-new-tokens 24 \
  --min-new-tokens 12
"$PYTHON" -m megatron_qwen35.demo --tensorboard "$OUT/tensorboard" --resumed-at "$HALF" --checkpoint "$OUT/checkpoint" \
  --hf-export "$OUT/hf" --png "$OUT/loss.png" --prompt "$PROMPT"
