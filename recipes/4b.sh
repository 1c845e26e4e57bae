#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus bash recipes/4b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 4.2B: TP1 keeps the GDN kernels large; bf16 params+grads 17 GB, Adam sharded over DP; micro-batch 1 with
# selective recompute of the GDN output norm keeps activations under ~40 GB at 4096 tokens.
# LoRA (LORA_RANK=16): 32.5M adapter parameters (every linear); frozen bf16 base 8.4 GB, Adam 0.4 GB.
PRESET=4b TP=${TP:-1} PP=${PP:-1} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-512} LR=${LR:-3e-4} \
  RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out} \
  source "$(dirname "$0")/common.sh" "$@"
