#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus bash recipes/0.8b.sh [extra Megatron flags]   (one 8x H100 80GB node)
# 0.75B LM parameters: pure data parallelism; bf16 weights+grads+fp32 Adam ~ 16 B/param = 12 GB, activations fit
# at micro-batch 4 x 4096 tokens, so no TP/PP/recompute is needed.
# LoRA (LORA_RANK=16): 10.8M adapter parameters (every linear); frozen bf16 base 1.5 GB, Adam 0.13 GB.
PRESET=0.8b TP=${TP:-1} PP=${PP:-1} MICRO_BATCH=${MICRO_BATCH:-4} GLOBAL_BATCH=${GLOBAL_BATCH:-512} LR=${LR:-6e-4} \
  source "$(dirname "$0")/common.sh" "$@"
